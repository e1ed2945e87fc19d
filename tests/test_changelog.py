"""CHANGELOG.md names what operators build on: every exit code and alert MESSAGE_ID the code
has, and the versions of state.json and `status --json` it writes (the newest mention of
each version is the one the code writes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bootsecrets import errors
from support.world import World

REPO = Path(__file__).resolve().parent.parent
CHANGELOG = (REPO / "CHANGELOG.md").read_text()


def error_classes() -> list[type[errors.BootsecretsError]]:
    found: list[type[errors.BootsecretsError]] = [errors.BootsecretsError]
    for cls in found:
        found.extend(cls.__subclasses__())
    return [cls for cls in found if not cls.__name__.startswith("_")]


def test_every_exit_code_is_in_the_changelog() -> None:
    codes = {cls.exit_code for cls in error_classes()} | {0, 130, 143}
    listed = {
        code.strip()
        for line in CHANGELOG.splitlines()
        if line.startswith("| ")
        for code in line.split("|")[1].split(",")
    }
    assert sorted(code for code in codes if str(code) not in listed) == []


def test_every_message_id_is_in_the_changelog() -> None:
    ids = {cls.message_id for cls in error_classes() if cls.message_id}
    assert ids
    assert sorted(i for i in ids if f"`{i}`" not in CHANGELOG) == []


def newest_version(document: str) -> int:
    match = re.search(rf"{re.escape(document)}` version (\d+)", CHANGELOG)
    assert match, f"CHANGELOG.md names no version of {document}"
    return int(match.group(1))


def test_state_and_status_versions_are_the_newest_in_the_changelog(world: World) -> None:
    world.provision()
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    state = json.loads((world.sandbox.store / "state.json").read_text())
    code, out, err = world.sandbox.run("status", "--json")
    assert code == 0, err

    assert state["version"] == newest_version("state.json")
    assert json.loads(out)["version"] == newest_version("status --json")
