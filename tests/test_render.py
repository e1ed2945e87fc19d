"""Rendering without I/O: the plain-lookup fast path agrees with Jinja2, and Jinja2 is only
imported when a template needs it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

from bootsecrets.config import Service, Template
from bootsecrets.errors import RenderError, SecretMissing
from bootsecrets.model import SecretData
from bootsecrets.render import analyze, render_service
from systemd_envfile import parse

SECRETS = {"db": SecretData("db", "secret/app/db", {
    "s": "pa ss\n\"$`\\", "i": 5432, "f": 1.5, "t": True, "n": None, "u": "☃"})}


def render_one(source: str) -> str:
    service = Service("a.service", environment=(Template("V", source, analyze(source)),))
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
    assert str(err.value) == "key 'nope' of secret secret/app/db does not exist (needed by " \
                             "a.service V)"


def test_a_filter_failing_on_a_value_names_the_type_only() -> None:
    with pytest.raises(RenderError) as err:
        render_one("{{ secrets.db.i | join(secrets.db.s) }}")
    assert "pa ss" not in str(err.value)


def test_plain_lookups_do_not_import_jinja(tmp_path: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent("""\
        vault: {address: "https://v.example:8200"}
        approle: {role: r}
        reboot_policy: reprovision
        mounts: {secret: kv-v2}
        secrets: {db: secret/app/db}
        services:
          a.service:
            environment: {P: "{{ secrets.db.password }}"}
        """))
    code = textwrap.dedent(f"""\
        import sys
        from bootsecrets.config import load_config
        from bootsecrets.render import SecretData, render_service
        c = load_config(__import__("pathlib").Path({str(config)!r}))
        render_service(c.services[0], {{"db": SecretData("db", "p", {{"password": "x"}})}})
        print("jinja2" in sys.modules)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
