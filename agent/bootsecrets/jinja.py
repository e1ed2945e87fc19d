"""Jinja2 templates: checked and compiled at config load, rendered in a bounded sandbox.

The only module that imports jinja2, itself imported only when a template is more than
`{{ secrets.<name>.<key> }}` (bootsecrets.templates). `prepare()` parses a template, refuses
what cannot work whatever the secrets hold, finds the secrets it uses and compiles it, so
every template problem is a config error found before anything is spent. `Renderer`
renders a unit's templates in Jinja's immutable sandbox with StrictUndefined, under the
bounds of `bootsecrets.bounds`, through these hooks: the sandbox's own (intercepted
operators, which also keeps Jinja from folding `{{ 9**(9**9) }}` at compile time, `call`,
`wrap_str_format`), the `finalize` option, every filter wrapped, and a code generator that
counts a step at the start of every block and sends literals, `~` and constant output
through the environment.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.compiler
import jinja2.meta
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox

from bootsecrets.bounds import (
    RANGE_LIMIT,
    Budget,
    TemplateLimit,
    bounded_size,
    check_power,
    checked,
    current,
    estimate,
    format_estimate,
    materialized,
    percent_estimate,
    product_estimate,
    size,
    spending,
)
from bootsecrets.errors import RenderError, SecretMissing
from bootsecrets.model import SecretData, TemplateProblem

if TYPE_CHECKING:
    from bootsecrets.serviceconfig import Template

# --- the environment ----------------------------------------------------------------------------

#: Filters whose integer arguments are widths or counts the result grows with.
_WIDTH_FILTERS = frozenset({"center", "indent", "batch", "slice", "tojson"})


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    first = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    widths = name in _WIDTH_FILTERS

    # pass_context also keeps Jinja from calling the filter at compile time on constants.
    def bounded(context: jinja2.runtime.Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = current()
        budget.step()
        value = materialized(value)
        args = tuple(materialized(a) for a in args)
        kwargs = {k: materialized(v) for k, v in kwargs.items()}
        if name == "format" and isinstance(value, str):
            budget.charge(percent_estimate(value, (args, kwargs)))
        else:
            budget.charge(estimate(value, (*args, *kwargs.values()), widths=widths))
        if name == "sum":
            start = kwargs.get("start", args[1] if len(args) > 1 else 0)
            if not isinstance(start, int | float):
                raise TemplateLimit("sum() adds numbers only")
        if first == "context":
            result = func(context, value, *args, **kwargs)
        elif first == "eval_context":
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif first == "environment":
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        return result if isinstance(result, Iterator) else checked(result)

    # After update_wrapper, which would copy the original's pass_eval_context marker.
    return jinja2.pass_context(functools.update_wrapper(bounded, func))


@jinja2.pass_context
def _finalize(context: jinja2.runtime.Context, value: Any) -> Any:
    """Every `{{ expression }}`, wherever it goes: at most what the unit may still output."""
    budget = current()
    if not isinstance(value, str):
        budget.room(size(value, budget.output))
        value = str(value)  # an undefined value raises here, as without finalize
    budget.emit(len(value))
    return value


def _range(*args: int) -> range:
    numbers = range(*args)
    try:
        count = len(numbers)
    except OverflowError:
        count = RANGE_LIMIT + 1
    if count > RANGE_LIMIT:
        raise TemplateLimit(f"range() of more than {RANGE_LIMIT} numbers")
    return numbers


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """Jinja's code generator, with a step count at the start of every block (loop bodies,
    macro bodies, if branches) and literals, `~` and constant output through the
    environment's checks."""

    def blockvisit(
        self,
        nodes: Iterable[jinja2.nodes.Node],
        frame: jinja2.compiler.Frame,
    ) -> None:
        self.writeline("environment.step()")
        super().blockvisit(nodes, frame)

    def _output_const_repr(self, group: Iterable[Any]) -> str:
        return f"environment.emit({super()._output_const_repr(group)})"

    def visit_List(self, node: jinja2.nodes.List, frame: jinja2.compiler.Frame) -> None:
        self.write("environment.literal(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: jinja2.nodes.Dict, frame: jinja2.compiler.Frame) -> None:
        self.write("environment.literal(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: jinja2.nodes.Tuple, frame: jinja2.compiler.Frame) -> None:
        if node.ctx != "load":  # an assignment target
            super().visit_Tuple(node, frame)
            return
        self.write("environment.literal(")
        super().visit_Tuple(node, frame)
        self.write(")")

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        self.write("environment.join_parts((")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("), context.eval_ctx.autoescape)")


class BoundedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox with StrictUndefined, under the bounds of bootsecrets.bounds."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    code_generator_class = _CodeGenerator

    def __init__(self) -> None:
        super().__init__(
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            auto_reload=False,
            cache_size=0,
            finalize=_finalize,
        )
        self.globals["range"] = _range
        del self.globals["lipsum"]  # lorem ipsum of any length: no use for secrets
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    # Called by the generated code (see _CodeGenerator); templates cannot reach them.

    def step(self) -> None:
        current().step()

    def emit(self, text: str) -> str:
        current().emit(len(text))
        return text

    def literal(self, value: Any) -> Any:
        current().charge(bounded_size(value))
        return value

    def join_parts(self, parts: tuple[Any, ...], autoescape: bool) -> str:
        """`a ~ b ~ ...`."""
        current().charge(bounded_size(parts))
        joined = jinja2.runtime.markup_join(parts) if autoescape else jinja2.runtime.str_join(parts)
        return checked(joined)

    def concat(self, parts: Iterable[str]) -> str:
        """A buffer (macro, `{% set %}` or `{% filter %}` block) joined into one string."""
        pieces = list(parts)
        current().charge(sum(len(p) for p in pieces))
        return checked("".join(pieces))

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        budget = current()
        budget.step()
        if operator == "**":
            check_power(left, right)
        elif operator == "*":
            budget.charge(product_estimate(left, right))
        elif operator == "+":
            budget.charge(bounded_size((left, right)))
        elif operator == "%" and isinstance(left, str | bytes):
            budget.charge(percent_estimate(left, right))
        return checked(super().call_binop(context, operator, left, right))

    def call(
        __self,
        __context: jinja2.runtime.Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        budget = current()
        budget.step()
        args = tuple(materialized(a) for a in args)
        kwargs = {k: materialized(v) for k, v in kwargs.items()}
        receiver = (
            getattr(__obj, "__self__", None)
            if isinstance(__obj, types.BuiltinMethodType | types.MethodWrapperType)
            else None
        )
        if isinstance(receiver, str | bytes | bytearray | int):
            # A method that can repeat its object: center(n), expandtabs(n), replace,
            # join, translate, to_bytes(n)...: integer arguments count as widths.
            budget.charge(estimate(receiver, (*args, *kwargs.values()), widths=True))
        else:  # macros, dict.get, range(), namespace(): what is passed in
            budget.charge(estimate(None, (*args, *kwargs.values()), widths=False))
        result = super().call(__context, __obj, *args, **kwargs)
        return result if isinstance(result, Iterator) else checked(result)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt: str = value.__self__
        is_map = value.__name__ == "format_map"

        def bounded(*args: Any, **kwargs: Any) -> str:
            current().charge(format_estimate(fmt, args[0] if is_map and args else (args, kwargs)))
            return checked(wrapper(*args, **kwargs))

        return bounded


@functools.cache
def _environment() -> BoundedEnvironment:
    return BoundedEnvironment()


# --- analysis at config load -------------------------------------------------------------------

_COMPILED: dict[str, jinja2.Template] = {}
_UNAVAILABLE = (
    jinja2.nodes.Extends,
    jinja2.nodes.Include,
    jinja2.nodes.Import,
    jinja2.nodes.FromImport,
)


def prepare(source: str) -> frozenset[str]:
    """Parse, check and compile a template; return the secret names it uses.

    Raises TemplateProblem on anything that would fail whatever the secrets hold: syntax,
    unknown filters and tests (Jinja finds those inside `if` only at render time),
    include/extends/import, and a use of `secrets` that cannot be resolved statically
    (`secrets[x]`, loops over it)."""
    env = _environment()
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateProblem(f"template syntax error: {err.message}", err.lineno) from None
    except (RecursionError, MemoryError):
        raise TemplateProblem("template is nested too deeply") from None
    unavailable = next(tree.find_all(_UNAVAILABLE), None)
    if unavailable is not None:
        raise TemplateProblem(
            "include, extends and import are not available: a template is one config value",
            unavailable.lineno,
        )
    for call in tree.find_all((jinja2.nodes.Filter, jinja2.nodes.Test)):
        assert isinstance(call, jinja2.nodes.Filter | jinja2.nodes.Test)
        kind, known = (
            ("filter", env.filters)
            if isinstance(call, jinja2.nodes.Filter)
            else ("test", env.tests)
        )
        if call.name not in known:
            raise TemplateProblem(f"no {kind} named `{call.name}`", call.lineno)
    try:
        undeclared = jinja2.meta.find_undeclared_variables(tree) - {"secrets"}
    except jinja2.TemplateSyntaxError as err:  # the compiler's own checks
        raise TemplateProblem(f"template error: {err.message}", err.lineno) from None
    except (RecursionError, MemoryError):
        raise TemplateProblem("template is nested too deeply") from None
    if undeclared:
        raise TemplateProblem(
            f"template uses `{sorted(undeclared)[0]}`; only `secrets.<name>.<key>` is available"
        )
    used = _secrets_used(tree)
    _COMPILED[source] = _compile(tree)  # after the checks: compiling rewrites the tree
    return used


def _secrets_used(tree: jinja2.nodes.Template) -> frozenset[str]:
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
                    "write secrets.<name> or secrets['name'] with a literal name", node.lineno
                )
            resolved.add(id(target))
    for name_node in tree.find_all(jinja2.nodes.Name):
        if name_node.name == "secrets" and id(name_node) not in resolved:
            raise TemplateProblem("use `secrets` only as secrets.<name>.<key>", name_node.lineno)
    return frozenset(used)


def _compile(tree: jinja2.nodes.Template) -> jinja2.Template:
    env = _environment()
    try:
        code = env.compile(tree)
    except jinja2.TemplateSyntaxError as err:  # TemplateAssertionError, found by the compiler
        raise TemplateProblem(f"template error: {err.message}", err.lineno) from None
    except (RecursionError, MemoryError, SyntaxError):
        raise TemplateProblem("template is nested too deeply") from None
    return env.template_class.from_code(env, code, env.make_globals(None))


def _compiled(source: str) -> jinja2.Template:
    compiled = _COMPILED.get(source)
    if compiled is None:  # a Template not made by load_config, which compiles them all
        prepare(source)
        compiled = _COMPILED[source]
    return compiled


# --- rendering ----------------------------------------------------------------------------------


class Renderer:
    """Renders one unit's templates, all under one Budget."""

    def __init__(self, unit: str, secrets: Mapping[str, SecretData]) -> None:
        self.unit = unit
        self.secrets = secrets
        self.budget = Budget()

    def render(self, template: Template) -> str:
        unit = self.unit
        try:
            compiled = _compiled(template.source)
        except TemplateProblem as problem:  # a Template built without load_config
            raise RenderError(unit, template.name, problem.message) from None
        context = {name: dict(self.secrets[name].data) for name in template.secrets}
        try:
            with spending(self.budget):
                return "".join(compiled.generate(secrets=context))
        except TemplateLimit as err:
            raise RenderError(unit, template.name, f"template stopped: {err}") from None
        except jinja2.UndefinedError:
            # Jinja's own message names the missing attribute, which for
            # `secrets.a[secrets.b.k]` would be a value: find the missing key in the source.
            missing = _missing_key(template, self.secrets)
            if missing is None:
                raise RenderError(
                    unit,
                    template.name,
                    "template refers to something the secrets do not have",
                ) from None
            raise SecretMissing(missing[0], missing[1], f"{unit} {template.name}") from None
        except jinja2.TemplateError as err:
            raise RenderError(
                unit, template.name, f"template error: {type(err).__name__}"
            ) from None
        except Exception as err:  # a filter or test failing on a value: name the type only
            raise RenderError(
                unit, template.name, f"template failed: {type(err).__name__}"
            ) from None


def _missing_key(template: Template, secrets: Mapping[str, SecretData]) -> tuple[str, str] | None:
    """(path, key) of a `secrets.<name>.<key>` in the template that the secret lacks."""
    tree = _environment().parse(template.source)
    for node in tree.find_all(jinja2.nodes.Getattr):
        inner = node.node
        if (
            isinstance(inner, jinja2.nodes.Getattr)
            and isinstance(inner.node, jinja2.nodes.Name)
            and inner.node.name == "secrets"
            and inner.attr in secrets
            and node.attr not in secrets[inner.attr].data
        ):
            return secrets[inner.attr].path, node.attr
    return None
