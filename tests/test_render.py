"""Rendering without I/O: the plain-lookup fast path agrees with Jinja2, Jinja2 is only
imported when a template needs it, ordinary templates render as Jinja's own sandbox renders
them, hostile ones stop with exit 13, and template problems are config errors at load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import pytest

from bootsecrets.config import load_config
from bootsecrets.errors import ConfigError, EncodeError, RenderError, SecretMissing
from bootsecrets.model import SecretData, TemplateProblem
from bootsecrets.render import render_service
from bootsecrets.serviceconfig import EnvFrom, Service, Template
from bootsecrets.templates import analyze
from systemd_envfile import parse

MARK = "Zq9-MARK-value"
SECRETS = {
    "db": SecretData(
        "db",
        "secret/app/db",
        {
            "s": 'pa ss\n"$`\\',
            "i": 5432,
            "f": 1.5,
            "t": True,
            "n": None,
            "u": "☃",
            "m": MARK,
            "list": ["a", "b", MARK],
            "big": MARK * 10_000,
        },
    ),
    "tls": SecretData(
        "tls",
        "secret/app/tls",
        {
            "crt": "-----BEGIN CERTIFICATE-----\nMIIB\nAbCd\n-----END CERTIFICATE-----\n",
            "host": "db.internal",
            "ports": "5432,5433",
        },
    ),
}


def template(source: str, name: str = "V") -> Template:
    return Template(name, source, analyze(source))


def render_one(source: str) -> str:
    service = Service("a.service", environment=(template(source),))
    env = render_service(service, SECRETS).env_file
    assert env is not None
    return parse(env.decode())["V"]


@pytest.mark.parametrize("key", ["s", "i", "f", "t", "n", "u"])
def test_plain_lookup_renders_exactly_as_jinja(key: str) -> None:
    fast = render_one(f"{{{{ secrets.db.{key} }}}}")
    via_jinja = render_one(f"{{{{ secrets.db.{key} }}}}{{{{ '' }}}}")  # not a plain lookup
    assert fast == via_jinja


@pytest.mark.parametrize("source", ["{{ secrets.db.nope }}", "x{{ secrets.db.nope }}"])
def test_missing_key_is_the_same_error_on_both_paths(source: str) -> None:
    with pytest.raises(SecretMissing) as err:
        render_one(source)
    assert (
        str(err.value) == "key 'nope' of secret secret/app/db does not exist (needed by "
        "a.service V)"
    )


def test_a_filter_failing_on_a_value_names_the_type_only() -> None:
    with pytest.raises(RenderError) as err:
        render_one("{{ secrets.db.i | join(secrets.db.s) }}")
    assert "pa ss" not in str(err.value)


def test_plain_lookups_do_not_import_jinja(tmp_path: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent("""\
        vault: {address: "https://v.example:8200"}
        approle: {role: r}
        reboot_policy: reprovision
        mounts: {secret: kv-v2}
        secrets: {db: secret/app/db}
        services:
          a.service:
            environment: {P: "{{ secrets.db.password }}"}
        """)
    )
    code = textwrap.dedent(f"""\
        import sys
        from bootsecrets.config import load_config
        from bootsecrets.model import SecretData
        from bootsecrets.render import render_service
        c = load_config(__import__("pathlib").Path({str(config)!r}))
        render_service(c.services[0], {{"db": SecretData("db", "p", {{"password": "x"}})}})
        print("jinja2" in sys.modules)
        """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


# --- ordinary templates: exactly what Jinja's own immutable sandbox renders ---------------------

ORDINARY = [
    "postgresql://{{ secrets.tls.host }}:{{ secrets.db.i }}/app",
    "{{ secrets.db.s | upper }}|{{ secrets.db.u | lower }}|{{ secrets.db.i + 1 }}",
    "{{ secrets.db.i * 2 }} {{ secrets.db.i // 7 }} {{ secrets.db.i % 7 }} {{ 2 ** 16 }} "
    "{{ secrets.db.f ** 2 }} {{ -secrets.db.i }} {{ 7 / 2 }} {{ 10 - 3 }}",
    "{{ 'x' * 3 }}{{ [1, 2] * 2 }}{{ (1,) * 2 }}{{ 3 * 'y' }}{{ 'a' + 'b' }}{{ [1] + [2] }}",
    "{{ secrets.db.list | join(',') }} {{ secrets.db.list | first }} {{ secrets.db.list | last }}"
    " {{ secrets.db.list | length }} {{ secrets.db.list | reverse | list }}",
    "{{ secrets.tls.crt | indent(4) }}{{ secrets.tls.crt | indent(2, first=True) }}",
    "{{ secrets.tls.crt | replace('\\n', '\\\\n') }}",
    "{{ secrets.db.m | center(40) }}|{{ secrets.db.m.ljust(30) }}|{{ secrets.db.m.zfill(20) }}",
    "{{ '%s:%d' % (secrets.tls.host, secrets.db.i) }} {{ '%-10s|%05.1f' | format('a', 1.5) }}",
    "{{ '{}@{}'.format(secrets.db.m, secrets.tls.host) }} {{ '{h}:{p:>6}'.format(h='x', p=5) }}",
    "{{ '{0[0]}-{0[1]}'.format(secrets.db.list) }}",
    "{% for p in secrets.tls.ports.split(',') %}{{ loop.index }}={{ p }}{% if not loop.last %};"
    "{% endif %}{% endfor %}",
    "{% for k, v in {'a': 1, 'b': 2} | dictsort %}{{ k }}{{ v }}{% endfor %}",
    "{% set ns = namespace(total=0) %}{% for i in range(10) %}{% set ns.total = ns.total + i %}"
    "{% endfor %}{{ ns.total }}",
    "{% macro dsn(user, host) %}{{ user }}@{{ host }}{% endmacro %}{{ dsn('app', "
    "secrets.tls.host) }} {{ dsn(secrets.db.m, 'h') | upper }}",
    "{% macro box() %}[{{ caller() }}]{% endmacro %}{% call box() %}in{{ secrets.db.i }}"
    "{% endcall %}",
    "{% filter upper %}{{ secrets.db.m }} text{% endfilter %}",
    "{% set block %}{{ secrets.db.m }}{{ secrets.db.i }}{% endset %}{{ block | length }}",
    "{{ secrets.db.m ~ '-' ~ secrets.db.i ~ '-' ~ secrets.db.list }}",
    "{{ secrets.db.n is none }} {{ secrets.db.i is divisibleby 2 }} {{ 'a' in secrets.db.list }}",
    "{{ secrets.db.list | map('upper') | join }} {{ [3, 1, 2] | sort | join }} "
    "{{ [1, 2, 3, 4] | select('odd') | list }} {{ [1, 2, 3] | sum }} {{ [1, 2, 3] | max }}",
    "{{ range(7) | batch(3) | list }} {{ range(7) | slice(3) | list }}",
    "{{ {'k': secrets.db.list, 'n': secrets.db.i} | tojson }} {{ [1, 2] | tojson(2) }}",
    "{{ secrets.tls.crt | wordwrap(10) }} {{ secrets.db.big | truncate(20) }}",
    "{{ secrets.db.s | urlencode }} {{ secrets.db.m | e }} {{ secrets.db.i | string | length }}",
    "{{ secrets.db.get('m') }} {{ secrets.db.get('nope', 'dflt') }} {{ secrets.db.items() | "
    "list | length }}",
    "{% set c = cycler('a', 'b') %}{{ c.next() }}{{ c.next() }}{{ c.next() }}"
    "{% set j = joiner('+') %}{% for x in [1, 2] %}{{ j() }}{{ x }}{% endfor %}",
    "{% for x in [[1, [2]], [3]] recursive %}{% if x is iterable %}({{ loop(x) }})"
    "{% else %}{{ x }}{% endif %}{% endfor %}",
    "{%- if secrets.db.t -%}\n  yes  \n{%- else -%}no{%- endif -%}\n",
    "{% raw %}{{ not a template }}{% endraw %} {{ dict(a=1, b=[2]) }} {{ (1, 'x') }}",
    "{{ secrets.db.big | length }} {{ (secrets.db.big ~ 'x') | length }} {{ secrets.db.big[:5] }}",
    "{{ ('%0999999d' % 1) | length }} {{ ('x' * 1000000) | length }}",
    "{% autoescape secrets.db.t %}<{{ '<' ~ secrets.db.m }}>{% endautoescape %}"
    "{% autoescape true %}{{ '&' }}{% set b %}<{{ '>' }}{% endset %}{{ b }}{% endautoescape %}",
    "{% with a = secrets.db.i, b = [1, 2] %}{{ a }}{{ b }}{% endwith %}",
]


@pytest.mark.parametrize("source", ORDINARY)
def test_ordinary_templates_render_as_jinjas_own_sandbox(source: str) -> None:
    reference = jinja2.sandbox.ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    context = {name: dict(s.data) for name, s in SECRETS.items()}
    expected = reference.from_string(source).render(secrets=context)
    assert render_one(source) == expected


# --- hostile templates: bounded, exit 13 naming unit and variable --------------------------------

HOSTILE = {
    "power-tower": "{{ 9**(9**9) }}",
    "power-of-a-secret": "{{ 10 ** (secrets.db.i * 1000) }}",
    "string-repeat": "{{ 'x'*3000000000 }}",
    "string-repeat-of-a-secret": "{{ secrets.db.big * 100 }}",
    "list-repeat": "{{ [1] * 1000000000 }}",
    "list-of-a-big-value-repeated": "{{ [secrets.db.big] * 100 }}",
    "nested-loops-output": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{{ 'x' * 1000 }}{% endfor %}{% endfor %}",
    "nested-loops-text": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx"
    "{% endfor %}{% endfor %}",
    "nested-loops-silent": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}",
    "range-too-long": "{% for i in range(10**9) %}{% endfor %}",
    "percent-format-filter": "{{ '%999999999s' | format('x') }}",
    "percent-format-star": "{{ '%*d' | format(999999999, 1) }}",
    "percent-operator": "{{ '%0999999999d' % 1 }}",
    "percent-mapping-repeats": "{{ ('%(a)s' * 100000) % {'a': secrets.db.big} }}",
    "str-format-width": "{{ '{:999999999}'.format(1) }}",
    "str-format-nested-width": "{{ '{:{}}'.format(1, 999999) }}",
    "join-over-huge-range": "{{ range(100000) | join('x' * 100000) }}",
    "join-generator": "{{ range(100000) | map('string') | map('center', 1000000) | join }}",
    "concat-doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "plus-doubling": "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
    "literal-doubling": "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}"
    "{% set ns.s = [ns.s, ns.s] %}{% endfor %}{{ ns.s }}",
    "integer-squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}"
    "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
    "center-filter": "{{ secrets.db.m | center(1000000000) }}",
    "center-method": "{{ secrets.db.m.center(1000000000) }}",
    "expandtabs": "{{ ('\\t' * 100000).expandtabs(1000) }}",
    "replace-amplifies": "{{ secrets.db.big | replace('M', 'M' * 1000) }}",
    "to-bytes": "{{ (1).to_bytes(1000000000, 'big') | length }}",
    "indent-width": "{{ ('x\\n' * 100000) | indent(100000) }}",
    "sum-of-lists": "{{ [[1]] * 100000 | sum(start=[]) }}",
    "macro-recursion": "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "loop-recursion": "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    "macro-buffer": "{% macro m() %}{% for i in range(100000) %}"
    + "y" * 5000
    + "{% endfor %}{% endmacro %}{{ m() | length }}",
    "join-of-joins": "{{ ([secrets.db.big] | join * 10) | length }}",
}


@pytest.mark.parametrize("source", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_templates_stop_with_exit_13(source: str) -> None:
    with pytest.raises(RenderError) as err:
        render_one(source)
    message = str(err.value)
    assert err.value.exit_code == 13
    assert message.startswith("unit a.service, variable V: "), message
    assert MARK not in message


def test_a_units_templates_share_one_output_budget() -> None:
    three_mib = "{% for i in range(3072) %}{{ 'x' * 1024 }}{% endfor %}"
    one = Service("a.service", credentials=(template(three_mib, "one"),))
    with pytest.raises(EncodeError):  # rendered; too big a credential for systemd
        render_service(one, SECRETS)
    two = Service("a.service", credentials=(template(three_mib, "one"), template(three_mib, "two")))
    with pytest.raises(RenderError, match=r"variable two: .* output more than"):
        render_service(two, SECRETS)


def test_each_unit_gets_its_own_budget() -> None:
    three_mib = "{% for i in range(3072) %}{{ 'x' * 1024 }}{% endfor %}{{ '' }}"
    small = "{% for i in range(10) %}{{ i }}{% endfor %}"
    for _ in range(3):  # would exhaust one shared budget
        with pytest.raises(EncodeError):
            render_service(Service("a.service", credentials=(template(three_mib),)), SECRETS)
    service = Service("b.service", environment=(template(small),))
    env_file = render_service(service, SECRETS).env_file
    assert env_file is not None and parse(env_file.decode()) == {"V": "0123456789"}


# --- template problems are found at config load ----------------------------------------------


CONFIG_HEAD = """\
vault: {address: "https://v.example:8200"}
approle: {role: r}
reboot_policy: reprovision
mounts: {secret: kv-v2}
secrets: {db: secret/app/db}
services:
  a.service:
    environment:
      OK: "{{ secrets.db.password }}"
"""

AT_LOAD = {
    "unknown-filter": ("{{ secrets.db.password | nosuchfilter }}", "no filter named"),
    "unknown-filter-inside-if": (
        "{% if secrets.db.password %}{{ 1 | nosuch }}{% endif %}",
        "no filter named",
    ),
    "unknown-test": ("{% if secrets.db.password is nosuchtest %}x{% endif %}", "no test named"),
    "include": ("{% include 'other' %}", "include, extends and import are not available"),
    "import": ("{% import 'other' as o %}", "include, extends and import are not available"),
    "extends": ("{% extends 'base' %}", "include, extends and import are not available"),
    "lipsum": ("{{ lipsum(5) }}", "template uses `lipsum`"),
    "syntax": ("{% for %}", "template syntax error"),
    "nested-too-deeply": ("{{ " + "(" * 400 + "1" + ")" * 400 + " }}", "nested too deeply"),
    "loop-outside-a-loop": ("{{ loop.index }}", "template uses `loop`"),
}


@pytest.mark.parametrize(("line", "problem"), AT_LOAD.values(), ids=AT_LOAD.keys())
def test_template_problems_are_config_errors_naming_file_line_and_field(
    line: str,
    problem: str,
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_HEAD + f"      V: {json.dumps(line)}\n      W: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.exit_code == 10
    assert err.value.field == "services.a.service.environment.V"
    assert err.value.source == str(path)
    assert err.value.line == 10
    assert problem in err.value.problem


def test_hostile_constants_do_not_hang_analysis() -> None:
    for source in (
        "{{ 9**(9**9) }}",
        "{{ 'x' * 3000000000 }}",
        "{{ 'x' | center(10**10) }}",
        "{{ ('x' * 1000000000) | length }}",
        "{{ [0] * 10**10 }}",
    ):
        assert analyze(source) == frozenset()


def test_analysis_gives_problems_as_template_problems() -> None:
    with pytest.raises(TemplateProblem) as problem:
        analyze("ok\n{{ 1 | nosuchfilter }}")
    assert problem.value.line == 2


def test_a_protected_variable_may_be_set_explicitly_but_not_from_a_secret() -> None:
    secrets = {"db": SecretData("db", "secret/db", {"LD_PRELOAD": "/x.so", "user": "u"})}
    explicit = Service(
        "app.service",
        environment=(Template("LD_PRELOAD", "{{ secrets.db.user }}", frozenset({"db"})),),
    )
    out = render_service(explicit, secrets)
    assert out.env_file is not None and b'LD_PRELOAD="u"' in out.env_file
    from_secret = Service("app.service", environment_from=(EnvFrom("db"),))
    with pytest.raises(EncodeError, match=r"variable LD_PRELOAD: .*loaded or found"):
        render_service(from_secret, secrets)
