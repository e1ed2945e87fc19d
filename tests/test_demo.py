"""The README's first command, as a newcomer runs it: `bash demo/run.sh` in a fresh clone of
the committed HEAD, with a bare PATH (`env -i`), so that whatever the demo needs must come
from the repository's own set-up (scripts/dev-setup), not from the machine's environment.

Slow on purpose (a fresh .venv is built from the locks; pip's cache makes it a minute or
two). It tests what is committed: commit before running it.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BARE_PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
#: The values demo/demo.py writes to OpenBao: none may be printed.
DEMO_VALUES = ('pa"ss$word\\1', "k-123", "k-456")


@pytest.fixture
def clean_clone() -> Iterator[Path]:
    if shutil.which("git") is None:
        pytest.fail("git is missing: run `bash scripts/install-test-deps`")
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bootsecrets-clone-") as tmp:
        clone = Path(tmp) / "bootsecrets"
        subprocess.run(
            ["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)],
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        subprocess.run(
            ["git", "-C", str(clone), "checkout", "--quiet", "--detach", head],
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        yield clone


def test_demo_runs_from_a_clean_clone_with_a_bare_path(clean_clone: Path) -> None:
    result = subprocess.run(
        ["env", "-i", BARE_PATH, "bash", "demo/run.sh"],
        cwd=clean_clone,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    output = result.stdout + result.stderr

    assert result.returncode == 0, output[-4000:]
    out = result.stdout
    # The installed command ran (exit 0 each time) and drove the systemctl stand-in.
    assert "start --no-block -- web.service api.service" in systemctl_calls(out, "4.")
    reloaded = systemctl_calls(out, "5.")
    assert "try-reload-or-restart -- api.service" in reloaded
    assert not [call for call in reloaded if "web.service" in call]  # not rotated
    assert re.search(r"api\.service: generation 2, secret/demo/api@v2, secret/demo/db@v1", out)
    assert out.rstrip().endswith("none was printed.")
    # Rendered values are shown masked, never in clear.
    assert "API_KEY=<5 bytes, masked>" in out
    for value in DEMO_VALUES:
        assert value not in output


def systemctl_calls(out: str, step: str) -> list[str]:
    """The systemctl calls the demo printed for one step, after that step's exit code 0."""
    section = out.split(f"\n{step} ", 1)[1]
    lines = section.split("exit code 0; systemctl calls:\n", 1)[1].splitlines()
    return [line.strip() for line in itertools.takewhile(lambda s: s.startswith("     "), lines)]
