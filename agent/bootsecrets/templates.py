"""Jinja2 templates: static analysis at config load, rendering in an immutable sandbox with
StrictUndefined. Imported only when a template is more than `{{ secrets.<name>.<key> }}`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox

from bootsecrets.config import Template
from bootsecrets.errors import RenderError, SecretMissing
from bootsecrets.model import SecretData
from bootsecrets.render import TemplateProblem


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


def render(
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
