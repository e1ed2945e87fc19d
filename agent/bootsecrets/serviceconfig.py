"""The `services:` section of the image config: each unit that receives secrets, with its
environment (Jinja2 templates and whole secrets), credentials, owner, mode and what a change
does to it; validated once, into frozen dataclasses (config.py reads the rest).

Unit names follow systemd's grammar; template sources are analysed statically (templates.py)
for the secrets they use, which must be declared under `secrets`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import yaml

from bootsecrets.envfile import ENV_NAME, PROTECTED_PREFIXES
from bootsecrets.model import TemplateProblem
from bootsecrets.templates import analyze
from bootsecrets.yamldoc import Node

if TYPE_CHECKING:
    from bootsecrets.config import SecretRef

#: systemd's unit-name grammar (unit_name_is_valid() in src/basic/unit-name.c), for the only
#: type we manage (EnvironmentFile=/LoadCredential= are [Service] settings): a plain name or
#: a template *instance* (`app@blue.service`); a bare template (`app@.service`) cannot run.
UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\@-]+)?\.service\Z")
UNIT_NAME_MAX = 255
#: The agent's own units: a drop-in making one of them Require bootsecrets.service would be a
#: dependency loop (or a unit restarting the agent that renders it).
OWN_UNITS = frozenset(
    {"bootsecrets.service", "bootsecrets-refresh.service", "bootsecrets-store.service"}
)
CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?\Z|[0-9]+\Z")


def owner(fields: Mapping[str, Node]) -> dict[str, str]:
    """The `user` and `group` of a service, directory or volume (root when not given)."""
    return {
        "user": fields["user"].matching(USER_NAME, "a user name or uid")
        if "user" in fields
        else "root",
        "group": fields["group"].matching(USER_NAME, "a group name or gid")
        if "group" in fields
        else "root",
    }


class OnChange(enum.Enum):
    RESTART = "restart"
    RELOAD = "reload"
    NONE = "none"


@dataclasses.dataclass(frozen=True)
class EnvFrom:
    """Every key of one secret as a variable: `<prefix><KEY>`."""

    secret: str
    prefix: str = ""
    uppercase: bool = False


@dataclasses.dataclass(frozen=True)
class Template:
    """A Jinja2 template from the config, with the secrets it refers to (found statically)."""

    name: str
    source: str
    secrets: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Service:
    unit: str
    environment: tuple[Template, ...] = ()
    environment_from: tuple[EnvFrom, ...] = ()
    credentials: tuple[Template, ...] = ()
    user: str = "root"
    group: str = "root"
    mode: int = 0o600
    on_change: OnChange = OnChange.RESTART
    required: bool = True

    @property
    def secrets(self) -> frozenset[str]:
        used: set[str] = {e.secret for e in self.environment_from}
        for template in (*self.environment, *self.credentials):
            used |= template.secrets
        return frozenset(used)

    @property
    def uses_environment(self) -> bool:
        return bool(self.environment or self.environment_from)


SERVICE_FIELDS = frozenset(
    {
        "environment",
        "environment_from",
        "credentials",
        "user",
        "group",
        "mode",
        "on_change",
        "required",
    }
)


def _unit_name(at: Node, unit: str) -> str:
    if not UNIT_NAME.match(unit) or len(unit) > UNIT_NAME_MAX:
        problem = "must be a systemd service unit name like `app.service`"
        if unit.endswith("@.service"):
            problem = (
                "is a template: name an instance (`app@blue.service`), a template cannot be started"
            )
        raise at.error(problem)
    if unit in OWN_UNITS:
        raise at.error("is one of bootsecrets' own units; it cannot receive secrets")
    return unit


def parse_service(at: Node, unit: str, secrets: Mapping[str, SecretRef]) -> Service:
    """One entry of `services:`, its templates analysed and checked against `secrets`."""
    _unit_name(at, unit)
    fields = at.mapping(frozenset(), SERVICE_FIELDS)
    environment = tuple(
        _template(child, name, secrets, ENV_NAME, "a variable name ([A-Za-z_][A-Za-z0-9_]*)")
        for name, child in (
            fields["environment"].mapping().items() if "environment" in fields else ()
        )
    )
    environment_from = tuple(
        _env_from(child, secrets)
        for child in (fields["environment_from"].sequence() if "environment_from" in fields else ())
    )
    credentials = tuple(
        _template(child, name, secrets, CREDENTIAL_NAME, "a credential name ([A-Za-z0-9_.-])")
        for name, child in (
            fields["credentials"].mapping().items() if "credentials" in fields else ()
        )
    )
    if not (environment or environment_from or credentials):
        raise at.error("gets no secrets: give `environment`, `environment_from` or `credentials`")
    prefixes = [e.prefix for e in environment_from]
    if len(environment_from) > 1 and "" in prefixes:
        raise fields["environment_from"].error(
            "several secrets without a prefix would collide; give each a `prefix`"
        )
    mode = 0o400 if credentials and not (environment or environment_from) else 0o600
    if "mode" in fields:
        mode = _file_mode(fields["mode"])
    on_change = fields["on_change"].choice(OnChange) if "on_change" in fields else OnChange.RESTART
    in_env = {e.secret for e in environment_from}.union(*(t.secrets for t in environment))
    leased_in_env = sorted(n for n in in_env if secrets[n].leased)
    leased_in_credentials = sorted(n for t in credentials for n in t.secrets if secrets[n].leased)
    if leased_in_env or leased_in_credentials:
        from bootsecrets.leasespec import check_on_change  # noqa: PLC0415 (see imports)

        check_on_change(
            fields.get("on_change", at), on_change.value, leased_in_env, leased_in_credentials
        )
    return Service(
        unit=unit,
        environment=environment,
        environment_from=environment_from,
        credentials=credentials,
        **owner(fields),
        mode=mode,
        on_change=on_change,
        required=fields["required"].boolean() if "required" in fields else True,
    )


def _file_mode(at: Node) -> int:
    node = at.node
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith((":str", ":int")):
        text = str(node.value)
        if re.fullmatch(r"0?[0-7]{3}", text):
            mode = int(text, 8)
            if mode & 0o077 & ~0o040:
                raise at.error("must not give write or any access to others (at most 0640)")
            if not mode & 0o400:
                raise at.error("must let the owner read (0400 or 0600)")
            return mode
    raise at.error('must be an octal file mode such as "0600" or "0400"')


def _env_from(at: Node, secrets: Mapping[str, SecretRef]) -> EnvFrom:
    fields = at.mapping(frozenset({"secret"}), frozenset({"prefix", "uppercase"}))
    name = fields["secret"].string()
    if name not in secrets:
        raise fields["secret"].error("refers to a secret not declared under `secrets`")
    prefix = fields["prefix"].text() if "prefix" in fields else ""
    if prefix and not ENV_NAME.match(prefix):
        raise fields["prefix"].error("must start a variable name ([A-Za-z_][A-Za-z0-9_]*)")
    if prefix.startswith(PROTECTED_PREFIXES):
        raise fields["prefix"].error(
            "would make variables that change how programs are loaded (LD_*, BASH_FUNC_*); "
            "name such a variable under `environment` instead"
        )
    return EnvFrom(
        secret=name,
        prefix=prefix,
        uppercase=fields["uppercase"].boolean() if "uppercase" in fields else False,
    )


def _template(
    at: Node,
    name: str,
    secrets: Mapping[str, SecretRef],
    pattern: re.Pattern[str],
    what: str,
) -> Template:
    if not pattern.match(name) or len(name) > 255:
        raise at.error(f"must be {what}")
    source = at.text("a template string")
    try:
        used = analyze(source)
    except TemplateProblem as problem:
        # A block scalar (`|`, `>`) starts on the line after its indicator.
        first = at.line + (1 if getattr(at.node, "style", None) in ("|", ">") else 0)
        line = first + (problem.line - 1 if problem.line else 0)
        raise at.error_type(at.source, line, at.field, problem.message) from None
    unknown = sorted(used - secrets.keys())
    if unknown:
        raise at.error(f"refers to secrets.{unknown[0]}, which is not declared under `secrets`")
    return Template(name, source, used)
