"""The docs stay true to the code: the exit-code table has one source (errors.exit_codes())
that the CLI's help prints and the README repeats; every MESSAGE_ID is documented; every
repository path a hint names exists."""

from __future__ import annotations

import re
from pathlib import Path

from bootsecrets import cli, errors

REPO = Path(__file__).resolve().parent.parent


def readme_exit_codes() -> list[tuple[str, str]]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.M)


def test_the_readme_table_is_the_exit_code_table() -> None:
    expected = [(str(code), summary) for code, summary in errors.exit_codes()]
    assert readme_exit_codes() == expected


def test_the_help_prints_the_exit_code_table() -> None:
    help_text = cli._parser().format_help()
    for code, summary in errors.exit_codes():
        assert re.search(rf"^ +{code}  {re.escape(summary)}$", help_text, re.M), (code, summary)


def test_exit_codes_are_distinct_per_outcome() -> None:
    by_code: dict[int, list[str]] = {}
    for cls in errors.outcomes():
        by_code.setdefault(cls.exit_code, []).append(cls.__name__)
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert shared == {}
    assert all(cls.summary != errors.BootsecretsError.summary for cls in errors.outcomes())


def test_every_message_id_is_in_the_threat_model_and_looks_generated() -> None:
    threat_model = (REPO / "docs/threat-model.md").read_text()
    ids = [cls.message_id for cls in errors.outcomes() if cls.message_id]
    assert len(set(ids)) == len(ids)
    for message_id in ids:
        assert f"`{message_id}`" in threat_model
        # `systemd-id128 new`: a random (version 4) UUID without dashes.
        assert re.fullmatch(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}", message_id)


def test_every_repository_path_a_hint_names_exists() -> None:
    named = 0
    for cls in errors.outcomes():
        for path in re.findall(r"(?<![\w/])([\w.-]+/[\w./-]*\w)", cls.hint):
            named += 1
            assert (REPO / path).exists(), f"{cls.__name__}.hint names {path}"
    assert named >= 2


def test_messages_escape_control_characters() -> None:
    err = errors.EncodeError("app.service", "KEY\nbootsecrets: error: forged", "bad")
    assert "\n" not in str(err)
    assert "KEY\\nbootsecrets: error: forged" in str(err)
    assert errors.printable("a\x1b[31m\u2028b\tc") == "a\\x1b[31m\\u2028b\\tc"
