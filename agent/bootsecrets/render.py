"""Templates to per-unit files: pure, no I/O.

Templates are Jinja2 in an immutable sandbox with StrictUndefined. They see one variable,
`secrets`, a mapping of secret name to that secret's key/value data. Which secrets a template
uses is found statically when the config is loaded, so only those paths are read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from bootsecrets.config import EnvFrom, Service, Template
from bootsecrets.envfile import ENV_NAME, encode, value_bytes
from bootsecrets.errors import EncodeError, SecretMissing
from bootsecrets.model import RenderedUnit, SecretData

MAX_CREDENTIAL_BYTES = 1024 * 1024


class TemplateProblem(Exception):
    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


#: `{{ secrets.<name>.<key> }}` and nothing else: resolved without Jinja2 (whose import and
#: compile cost is most of a small bootstrap), with the same result Jinja2 would give.
_PLAIN_LOOKUP = re.compile(
    r"\{\{\s*secrets\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\Z")


def analyze(source: str) -> frozenset[str]:
    """The secret names a template uses. Raises TemplateProblem on syntax errors or on a
    use of `secrets` that cannot be resolved statically (`secrets[x]`, loops over it)."""
    plain = _PLAIN_LOOKUP.match(source)
    if plain:
        return frozenset({plain.group(1)})
    from bootsecrets import templates  # noqa: PLC0415 (Jinja2 only when a template needs it)

    return templates.analyze(source)


def _render_template(
    unit: str, template: Template, secrets: Mapping[str, SecretData]
) -> str:
    plain = _PLAIN_LOOKUP.match(template.source)
    if plain:
        secret = secrets[plain.group(1)]
        if plain.group(2) not in secret.data:
            raise SecretMissing(secret.path, plain.group(2), f"{unit} {template.name}")
        return str(secret.data[plain.group(2)])  # what Jinja2's {{ }} does with a value
    from bootsecrets import templates  # noqa: PLC0415

    return templates.render(unit, template, secrets)


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
                unit, name,
                f"key of {secret.path} does not make a valid variable name; rename the key",
            )
        out.append((name, _scalar(unit, name, value)))
    return out


def render_service(service: Service, secrets: Mapping[str, SecretData]) -> RenderedUnit:
    """Render one unit's files. Raises SecretMissing/RenderError/EncodeError; pure."""
    for name in sorted(service.secrets):
        if name not in secrets:
            raise SecretMissing(name, unit=service.unit)
    env_file = None
    if service.uses_environment:
        assignments: list[tuple[str, str]] = []
        for spec in service.environment_from:
            assignments.extend(_from_secret(service.unit, spec, secrets[spec.secret]))
        for template in service.environment:
            assignments.append((template.name, _render_template(service.unit, template, secrets)))
        env_file = encode(service.unit, assignments)
    credentials = {}
    for template in service.credentials:
        text = _render_template(service.unit, template, secrets)
        raw = value_bytes(service.unit, template.name, text)
        if len(raw) > MAX_CREDENTIAL_BYTES:
            raise EncodeError(service.unit, template.name, "credential is larger than 1 MiB")
        credentials[template.name] = raw
    paths = tuple(sorted(secrets[name].path for name in service.secrets))
    return RenderedUnit(service.unit, env_file, credentials, paths)
