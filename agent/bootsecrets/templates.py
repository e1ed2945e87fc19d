"""Templates: which secrets a config template uses (at config load), and its text (at
render time).

Templates are Jinja2 over one variable, `secrets` (secret name -> that secret's key/value
data). A template that is exactly `{{ secrets.<name>.<key> }}` is resolved here, without
Jinja2, whose import and compile cost is most of a small bootstrap (docs/performance.md);
anything else goes to `bootsecrets.jinja`, imported on first use, which analyses and
compiles it at config load (so every template problem is a config error, found before the
wrapped secret-id is spent) and renders it in a bounded sandbox.

This module imports neither Jinja2 nor the config (the Template type only for checking),
so `config` can import it at the top.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bootsecrets.errors import SecretMissing
from bootsecrets.model import SecretData

if TYPE_CHECKING:
    from bootsecrets import jinja
    from bootsecrets.serviceconfig import Template

#: `{{ secrets.<name>.<key> }}` and nothing else: the same result Jinja2 would give.
_PLAIN_LOOKUP = re.compile(
    r"\{\{\s*secrets\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\Z"
)


def analyze(source: str) -> frozenset[str]:
    """The secret names a template uses. Raises model.TemplateProblem for a template that
    cannot work whatever the secrets hold (see jinja.prepare, which also compiles it)."""
    plain = _PLAIN_LOOKUP.match(source)
    if plain:
        return frozenset({plain.group(1)})
    from bootsecrets import jinja  # noqa: PLC0415 (Jinja2 only when a template needs it)

    return jinja.prepare(source)


class UnitRenderer:
    """Renders the templates of one unit; Jinja2 templates share one evaluation budget."""

    def __init__(self, unit: str, secrets: Mapping[str, SecretData]) -> None:
        self.unit = unit
        self.secrets = secrets
        self._jinja: jinja.Renderer | None = None

    def render(self, template: Template) -> str:
        """The template's text. Raises SecretMissing or RenderError; pure."""
        plain = _PLAIN_LOOKUP.match(template.source)
        if plain:
            secret = self.secrets[plain.group(1)]
            if plain.group(2) not in secret.data:
                raise SecretMissing(secret.path, plain.group(2), f"{self.unit} {template.name}")
            return str(secret.data[plain.group(2)])  # what Jinja2's {{ }} does with a value
        if self._jinja is None:
            from bootsecrets import jinja  # noqa: PLC0415

            self._jinja = jinja.Renderer(self.unit, self.secrets)
        return self._jinja.render(template)
