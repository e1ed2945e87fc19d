"""Where our agent's start-up goes: whole-process walls of the interpreter and the console
script, and the import cost of each library, each in fresh processes."""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from harness import BenchError, OursInstall, clean_env, measure


@dataclasses.dataclass
class StartupResult:
    walls: dict[str, tuple[float, float]]  # label: (median wall s, median peak RSS KiB)
    imports: dict[str, float]  # label: best-of-N seconds


_BLOCK_DETECTOR = (
    "import warnings; warnings.simplefilter('ignore'); "
    "sys.modules['charset_normalizer'] = None; sys.modules['chardet'] = None; "
)
_NO_GC = "import gc; gc.disable(); "
_TEARDOWN = "import bootsecrets.agent, bootsecrets.vault"
IMPORT_PROBES = {
    "import requests": "import requests",
    "import requests, charset detector blocked (as cli.run() does)": _BLOCK_DETECTOR
    + "import requests",
    "import hvac (includes requests)": "import hvac",
    "import yaml": "import yaml",
    "import jinja2.sandbox (only for configs with real templates)": "import jinja2.sandbox",
    "import bootsecrets.cli (argparse, logging)": "import bootsecrets.cli",
    "import bootsecrets.agent (config, render, store, systemd; not hvac)": (
        "import bootsecrets.agent"
    ),
    "import bootsecrets.agent + bootsecrets.vault (everything bootstrap imports)": _TEARDOWN,
    "the same, GC off and charset detector blocked (as cli.run() does)": _NO_GC
    + _BLOCK_DETECTOR
    + _TEARDOWN,
}


def startup_costs(ours: OursInstall, repeats: int) -> StartupResult:
    """Where our agent's start-up goes: whole-process walls, then import costs measured
    inside a fresh `python -S` each time (our site-packages put on sys.path by hand), so that
    .pth files of the interpreter's site are not charged to the module measured."""
    py = ours.python
    env = clean_env(Path(tempfile.gettempdir()))
    processes = {
        "python -S -c pass (bare interpreter)": [py, "-S", "-c", "pass"],
        "python -c pass (with site)": [py, "-c", "pass"],
        "bootsecrets --version": [*ours.command, "--version"],
        "python -c 'import bootsecrets.agent, bootsecrets.vault' (exits normally)": [
            py,
            "-c",
            _TEARDOWN,
        ],
        "the same, then os._exit(0) (no interpreter teardown, as cli.run() ends)": [
            py,
            "-c",
            _TEARDOWN + "; import os; os._exit(0)",
        ],
    }
    walls: dict[str, tuple[float, float]] = {}
    for label, argv in processes.items():
        runs = [measure(argv, env=env, log=Path(os.devnull), timeout=30) for _ in range(repeats)]
        walls[label] = (
            statistics.median(r.wall for r in runs),
            statistics.median(r.maxrss_kb for r in runs),
        )
    imports = {
        label: min(_import_time(py, ours.site, code, env, label) for _ in range(repeats))
        for label, code in IMPORT_PROBES.items()
    }  # best of N, as timeit does: the least disturbed run
    return StartupResult(walls, imports)


def _import_time(py: str, site: list[str], code: str, env: dict[str, str], label: str) -> float:
    program = (
        f"import sys; sys.path[:0] = {site!r}; "
        f"import time; t = time.perf_counter(); {code}; "
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run(
        [py, "-S", "-c", program], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    if out.returncode != 0:
        raise BenchError(f"start-up probe {label!r} failed: {out.stderr[-300:]}")
    return float(out.stdout.split()[-1])
