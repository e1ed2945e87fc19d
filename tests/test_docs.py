"""The docs stay true to the code: every exit code and MESSAGE_ID is documented."""

from __future__ import annotations

import re
from pathlib import Path

from bootsecrets import cli, errors

REPO = Path(__file__).resolve().parent.parent


def all_errors() -> list[type[errors.BootsecretsError]]:
    found: list[type[errors.BootsecretsError]] = []
    todo: list[type[errors.BootsecretsError]] = [errors.BootsecretsError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_exit_code_is_in_the_readme_and_the_help() -> None:
    readme = (REPO / "README.md").read_text()
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", readme, re.M)}
    documented |= {int(c) for c in re.findall(r"^\| (\d+), (\d+) \|", readme, re.M)[0]}
    codes = {cls.exit_code for cls in all_errors()}
    assert codes <= documented, codes - documented
    for code in codes - {1}:
        assert re.search(rf"\b{code}\b", cli.EPILOG), code


def test_exit_codes_are_distinct_per_outcome() -> None:
    concrete = [c for c in all_errors() if not c.__name__.startswith("_")]
    by_code: dict[int, list[str]] = {}
    for cls in concrete:
        by_code.setdefault(cls.exit_code, []).append(cls.__name__)
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert shared == {}


def test_every_message_id_is_in_the_threat_model() -> None:
    threat_model = (REPO / "docs/threat-model.md").read_text()
    ids = {cls.message_id for cls in all_errors() if cls.message_id}
    assert len(ids) == len([c for c in all_errors() if c.message_id])  # all distinct
    for message_id in ids:
        assert f"`{message_id}`" in threat_model
