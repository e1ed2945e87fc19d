"""The bounds on template evaluation, and how operations are measured against them.

A template comes from the image config but runs at boot on the agent's time and memory, so
what it may build and do is bounded (bootsecrets.jinja enforces this; exit 13 naming unit
and variable when a bound is hit):

* every value a template builds (string, list, dict; a part shared N times counted N times,
  as `str()` would print it) holds at most VALUE_LIMIT characters, an integer at most
  INT_BITS_LIMIT bits; an operation is refused *before* it runs when an estimate of its
  result from its operands' sizes is over OP_LIMIT, and its result checked after;
* what one unit's templates output, everywhere (macro and block buffers included), is at
  most OUTPUT_LIMIT characters;
* the estimates of all operations add up to at most WORK_LIMIT; steps (loop iterations,
  block entries, operators, filter, function and macro calls) to at most STEP_LIMIT;
  `range()` gives at most RANGE_LIMIT numbers; and a unit's templates get TIME_LIMIT
  seconds of wall-clock time.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import string
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import jinja2.runtime
import jinja2.utils

VALUE_LIMIT = 1 << 20
OUTPUT_LIMIT = 4 << 20
OP_LIMIT = 8 << 20
WORK_LIMIT = 32 << 20
STEP_LIMIT = 100_000
RANGE_LIMIT = 100_000
INT_BITS_LIMIT = 4096
TIME_LIMIT = 2.0

_T = TypeVar("_T")


class TemplateLimit(Exception):
    """A template went past one of the bounds; the message says which, never a value."""


class Budget:
    """What a unit's templates may still spend (one per unit, shared by its templates)."""

    def __init__(self, output: int = OUTPUT_LIMIT) -> None:
        self.steps = STEP_LIMIT
        self.work = WORK_LIMIT
        self.output = output
        self.deadline = time.monotonic() + TIME_LIMIT

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise TemplateLimit(
                f"more than {STEP_LIMIT} steps (loop iterations, blocks, "
                "operations, filter and function calls)"
            )
        if not self.steps & 0x3FF:
            self.clock()

    def charge(self, estimate: int) -> None:
        """Account for an operation about to build a value of up to `estimate` characters."""
        if estimate > OP_LIMIT:
            raise TemplateLimit(f"an operation would build more than {OP_LIMIT} characters")
        self.work -= estimate
        if self.work < 0:
            raise TemplateLimit(f"the templates build more than {WORK_LIMIT} characters in all")
        self.clock()

    def room(self, size: int) -> None:
        """Refuse before building output that could not be emitted."""
        if size > self.output:
            raise TemplateLimit(f"the unit's templates output more than {OUTPUT_LIMIT} characters")

    def emit(self, size: int) -> None:
        self.room(size)
        self.output -= size

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"the unit's templates took longer than {TIME_LIMIT:g} s")


_BUDGET: contextvars.ContextVar[Budget] = contextvars.ContextVar("bootsecrets_template_budget")


def current() -> Budget:
    """The budget of the render under way."""
    try:
        return _BUDGET.get()
    except LookupError:  # only a render sets one; compile-time folding must not get here
        raise TemplateLimit("template code ran outside a render") from None


@contextlib.contextmanager
def spending(budget: Budget) -> Iterator[None]:
    """Make `budget` the one operations are charged to while the block runs."""
    token = _BUDGET.set(budget)
    try:
        yield
    finally:
        _BUDGET.reset(token)


# --- sizes ------------------------------------------------------------------------------------


def size(value: object, limit: int = VALUE_LIMIT) -> int:
    """About the characters `str(value)` takes, counting a part shared N times N times;
    stops counting once past `limit` (so it costs at most O(limit))."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str | bytes | bytearray):
            total += len(item)
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, float | complex):
            total += 50
        elif isinstance(item, jinja2.runtime.Undefined):
            continue  # whatever uses it raises UndefinedError
        elif isinstance(item, range):
            total += len(item) * (max(abs(item.start), abs(item.stop)).bit_length() // 3 + 4)
        elif isinstance(item, jinja2.utils.Namespace):
            stack.append(getattr(item, "_Namespace__attrs", {}))  # its repr shows them all
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, Collection):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item)
        else:
            total += 64
    return total


def too_big(what: str = "a value") -> TemplateLimit:
    return TemplateLimit(f"{what} would hold more than {VALUE_LIMIT} characters")


def bounded_size(value: object) -> int:
    """size(value), refusing a value over VALUE_LIMIT (so it costs at most O(VALUE_LIMIT))."""
    total = size(value)
    if total > VALUE_LIMIT:
        raise too_big()
    return total


def checked(value: _T) -> _T:
    """`value`, once it is known to be within the size bounds."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > INT_BITS_LIMIT:
            raise TemplateLimit(f"an integer would have more than {INT_BITS_LIMIT} bits")
    elif size(value) > VALUE_LIMIT:
        raise too_big()
    return value


def materialized(value: Any) -> Any:
    """An iterator (a filter's lazy result) as a list, bounded; anything else as it is."""
    if not isinstance(value, Iterator) or isinstance(value, jinja2.runtime.LoopContext):
        return value
    items = []
    total = 2
    for item in value:
        total += 4 + size(item, VALUE_LIMIT - total)
        if total > VALUE_LIMIT:
            raise too_big("a sequence")
        items.append(item)
    return items


def amplifier(value: Any, *, widths: bool) -> int:
    """How much an argument can multiply an operation's result: its size, or for an integer
    that is a width or count (`center(n)`, `to_bytes(n)`), its value."""
    if isinstance(value, int) and not isinstance(value, bool) and widths:
        return abs(value)
    return size(value, OP_LIMIT)


def estimate(receiver: Any, args: Iterable[Any], *, widths: bool) -> int:
    """An upper bound for what a call builds: (receiver size + 1) times (1 + what the
    arguments amplify); a call without a receiver that can repeat itself passes None."""
    base = 1 if receiver is None else size(receiver, OP_LIMIT) + 1
    if base > OP_LIMIT:
        return base
    return base * (1 + sum(amplifier(a, widths=widths) for a in args))


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?(.)", re.S)


def widths_of(numbers: Iterable[str | None]) -> int:
    total = 0
    for number in numbers:
        if number == "*":
            raise TemplateLimit("a `*` width in a format is not allowed")
        if number:
            if len(number) > 7:
                raise too_big("a formatted value")
            total += int(number)
    return total


def percent_estimate(fmt: str | bytes, args: Any) -> int:
    """`fmt % args`: the format, every width and precision, and the arguments once per
    conversion (`%(a)s%(a)s` prints `a` twice)."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    conversions = 0
    widths = 0
    for match in _PERCENT_SPEC.finditer(text):
        if match.group(3) != "%":
            conversions += 1
        widths += widths_of((match.group(1), match.group(2)))
    return len(text) + widths + conversions * size(args, OP_LIMIT)


def format_estimate(fmt: str, args: Any) -> int:
    """`fmt.format(*args)`, the same way; a nested field in a spec (`{:{w}}`) is refused."""
    fields = 0
    widths = 0
    for _literal, field, spec, _conversion in string.Formatter().parse(fmt):
        if field is None:
            continue
        fields += 1
        if spec:
            if "{" in spec:
                raise TemplateLimit("a nested field in a format spec is not allowed")
            widths += widths_of(re.findall(r"\d+", spec))
    return len(fmt) + widths + fields * size(args, OP_LIMIT)


def is_int(value: Any) -> bool:
    return isinstance(value, int)  # bool too: True * "x" is a repetition


def check_power(base: Any, exponent: Any) -> None:
    """Refuse `base ** exponent` when the integer result would be too long."""
    if not (is_int(base) and is_int(exponent)) or exponent <= 1 or abs(base) <= 1:
        return  # floats overflow at once; negative exponents give floats
    if exponent > INT_BITS_LIMIT or exponent * abs(base).bit_length() > INT_BITS_LIMIT + 1:
        raise TemplateLimit(f"an integer would have more than {INT_BITS_LIMIT} bits")


def product_estimate(left: Any, right: Any) -> int:
    """What `left * right` builds; refuses an integer product that would be too long."""
    if is_int(left) and is_int(right):
        if left.bit_length() + right.bit_length() > INT_BITS_LIMIT + 1:
            raise TemplateLimit(f"an integer would have more than {INT_BITS_LIMIT} bits")
        return 1
    if is_int(left):
        left, right = right, left
    if is_int(right) and not isinstance(left, float):
        return size(left, OP_LIMIT) * max(int(right), 0)  # repetition: "x" * n, [a] * n
    return 1
