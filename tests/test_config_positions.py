"""Config errors name the line they are on, with the parser the agent uses (libyaml's when
PyYAML has it: composing with it is ~15x faster, docs/performance.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bootsecrets import config, yamldoc
from bootsecrets.errors import ConfigError

VALID = """\
vault:
  address: http://127.0.0.1:8200
approle:
  role: web
reboot_policy: reprovision
mounts:
  secret: kv-v2
secrets:
  db: secret/app/db
services:
  app.service:
    environment:
      DB_PASSWORD: "{{ secrets.db.password }}"
    on_change: restart
"""


def test_libyaml_parser_is_used_when_pyyaml_has_it() -> None:
    assert yaml.__with_libyaml__, "PyYAML's wheels ship libyaml; reinstall pyyaml"
    loader: object = yamldoc._LOADER  # typed as the pure-Python SafeLoader it falls back to
    assert loader is yaml.CSafeLoader


def error_for(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load_config(path, env={})
    return str(caught.value)


def test_valid_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(VALID)
    loaded = config.load_config(path, env={})
    assert [s.unit for s in loaded.services] == ["app.service"]


@pytest.mark.parametrize(
    ("old", "new", "line", "field"),
    [
        (
            "    on_change: restart",
            "    on_change: sometimes",
            14,
            "services.app.service.on_change",
        ),
        ("  role: web", "  role: web\n  colour: blue", 5, "approle.colour"),
        ("  secret: kv-v2", "  secret: kv-v9", 7, "mounts.secret"),
    ],
)
def test_field_errors_name_their_line(
    tmp_path: Path, old: str, new: str, line: int, field: str
) -> None:
    message = error_for(tmp_path, VALID.replace(old, new))
    assert message.startswith(f"{tmp_path / 'config.yaml'}:{line}: {field}"), message


def test_yaml_errors_name_their_line(tmp_path: Path) -> None:
    message = error_for(tmp_path, VALID.replace("  db: secret/app/db", "  db: : secret"))
    assert message.startswith(f"{tmp_path / 'config.yaml'}:9: (top level): invalid YAML"), message
