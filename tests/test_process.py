"""The agent process is not dumpable and writes no core files once it handles secrets."""

from __future__ import annotations

import subprocess
import sys


def test_harden_makes_the_process_undumpable_without_core_files() -> None:
    code = (
        "import resource\n"
        "from bootsecrets import process\n"
        "before = process.dumpable()\n"
        "process.harden()\n"
        "print(before, process.dumpable(), resource.getrlimit(resource.RLIMIT_CORE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "True False (0, 0)"


def test_bootstrap_command_hardens_before_touching_secrets() -> None:
    # A bootstrap that fails at once (no config) has already hardened its process: the
    # child inspects itself after main() returns.
    code = (
        "import sys\n"
        "from bootsecrets import cli, process\n"
        "rc = cli.main(['bootstrap', '--root', '/nonexistent-root'])\n"
        "print(rc, process.dumpable())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "10 False"
