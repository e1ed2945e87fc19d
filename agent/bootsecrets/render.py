"""Secrets to per-unit files: pure, no I/O.

Each unit gets one env file (its `environment` templates and `environment_from` secrets,
encoded by `envfile`) and one file per credential. Which secrets a template uses was found
when the config was loaded, so only those paths are read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from bootsecrets.envfile import ENV_NAME, check_credentials, encode, is_protected, value_bytes
from bootsecrets.errors import EncodeError, SecretMissing
from bootsecrets.model import RenderedUnit, SecretData
from bootsecrets.serviceconfig import EnvFrom, Service
from bootsecrets.templates import UnitRenderer


def _scalar(unit: str, variable: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return json.dumps(value)
    raise EncodeError(unit, variable, f"value is a {type(value).__name__}, not a string")


def _from_secret(unit: str, spec: EnvFrom, secret: SecretData) -> list[tuple[str, str]]:
    out = []
    for key, value in secret.data.items():
        name = spec.prefix + (key.upper() if spec.uppercase else key)
        if not ENV_NAME.match(name):
            raise EncodeError(
                unit,
                name,
                f"key of {secret.path} does not make a valid variable name; rename the key",
            )
        if is_protected(name):
            raise EncodeError(
                unit,
                name,
                f"key of {secret.path} would set a variable that changes how programs are "
                "loaded or found; environment_from may not (set it under `environment`)",
            )
        out.append((name, _scalar(unit, name, value)))
    return out


def render_service(service: Service, secrets: Mapping[str, SecretData]) -> RenderedUnit:
    """Render one unit's files. Raises SecretMissing/RenderError/EncodeError; pure."""
    for name in sorted(service.secrets):
        if name not in secrets:
            raise SecretMissing(name, unit=service.unit)
    renderer = UnitRenderer(service.unit, secrets)
    env_file = None
    if service.uses_environment:
        assignments: list[tuple[str, str]] = []
        for spec in service.environment_from:
            assignments.extend(_from_secret(service.unit, spec, secrets[spec.secret]))
        for template in service.environment:
            assignments.append((template.name, renderer.render(template)))
        env_file = encode(service.unit, assignments)
    credentials = {
        template.name: value_bytes(service.unit, template.name, renderer.render(template))
        for template in service.credentials
    }
    check_credentials(service.unit, credentials)
    paths = tuple(sorted(secrets[name].path for name in service.secrets))
    return RenderedUnit(service.unit, env_file, credentials, paths)
