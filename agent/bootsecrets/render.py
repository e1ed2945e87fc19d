"""Templates to per-unit files: pure, no I/O.

Templates are Jinja2 in an immutable sandbox with StrictUndefined. They see one variable,
`secrets`, a mapping of secret name to that secret's key/value data. Which secrets a template
uses is found statically when the config is loaded, so only those paths are read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox

from bootsecrets.config import EnvFrom, Service, Template
from bootsecrets.envfile import ENV_NAME, encode, value_bytes
from bootsecrets.errors import EncodeError, RenderError, SecretMissing

MAX_CREDENTIAL_BYTES = 1024 * 1024


class TemplateProblem(Exception):
    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


@dataclasses.dataclass(frozen=True)
class SecretData:
    """One secret as read from Vault. `data` holds values: never log or repr it."""

    name: str
    path: str
    data: Mapping[str, Any] = dataclasses.field(repr=False)
    version: int | None = None
    lease_id: str | None = None
    lease_duration: int | None = None


@dataclasses.dataclass(frozen=True)
class RenderedUnit:
    """What one unit gets: its env file bytes and credential files, plus provenance."""

    unit: str
    env_file: bytes | None = dataclasses.field(repr=False)
    credentials: Mapping[str, bytes] = dataclasses.field(repr=False, default_factory=dict)
    secret_paths: tuple[str, ...] = ()


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    return jinja2.sandbox.ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        auto_reload=False,
        cache_size=0,
    )


def analyze(source: str) -> frozenset[str]:
    """The secret names a template uses. Raises TemplateProblem on syntax errors or on a
    use of `secrets` that cannot be resolved statically (`secrets[x]`, loops over it)."""
    env = _environment()
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateProblem(f"template syntax error: {err.message}", err.lineno) from None
    undeclared = jinja2.meta.find_undeclared_variables(tree) - {"secrets"}
    if undeclared:
        raise TemplateProblem(
            f"template uses `{sorted(undeclared)[0]}`; only `secrets.<name>.<key>` is available"
        )
    used: set[str] = set()
    resolved: set[int] = set()
    for node in tree.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem)):
        assert isinstance(node, jinja2.nodes.Getattr | jinja2.nodes.Getitem)
        target = node.node
        if isinstance(target, jinja2.nodes.Name) and target.name == "secrets":
            if isinstance(node, jinja2.nodes.Getattr):
                used.add(node.attr)
            elif isinstance(node.arg, jinja2.nodes.Const) and isinstance(node.arg.value, str):
                used.add(node.arg.value)
            else:
                raise TemplateProblem(
                    "write secrets.<name> or secrets['name'] with a literal name", node.lineno)
            resolved.add(id(target))
    for name_node in tree.find_all(jinja2.nodes.Name):
        if name_node.name == "secrets" and id(name_node) not in resolved:
            raise TemplateProblem(
                "use `secrets` only as secrets.<name>.<key>", name_node.lineno)
    return frozenset(used)


def _render_template(
    unit: str, template: Template, secrets: Mapping[str, SecretData]
) -> str:
    env = _environment()
    context = {name: dict(secrets[name].data) for name in template.secrets}
    try:
        return env.from_string(template.source).render(secrets=context)
    except jinja2.UndefinedError:
        # Jinja's own message names the missing attribute, which for `secrets.a[secrets.b.k]`
        # would be a value: find the missing key in the template source instead.
        missing = _missing_key(template, secrets)
        if missing is None:
            raise RenderError(unit, template.name,
                              "template refers to something the secrets do not have") from None
        raise SecretMissing(missing[0], missing[1], f"{unit} {template.name}") from None
    except jinja2.TemplateError as err:
        raise RenderError(unit, template.name, f"template error: {type(err).__name__}") from None
    except Exception as err:  # a filter or test failing on a value: name the type only
        raise RenderError(unit, template.name, f"template failed: {type(err).__name__}") from None


def _missing_key(
    template: Template, secrets: Mapping[str, SecretData]
) -> tuple[str, str] | None:
    """(path, key) of a `secrets.<name>.<key>` in the template that the secret lacks."""
    tree = _environment().parse(template.source)
    for node in tree.find_all(jinja2.nodes.Getattr):
        inner = node.node
        if isinstance(inner, jinja2.nodes.Getattr) and isinstance(inner.node, jinja2.nodes.Name) \
                and inner.node.name == "secrets" and inner.attr in secrets \
                and node.attr not in secrets[inner.attr].data:
            return secrets[inner.attr].path, node.attr
    return None


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
