"""The benchmark's harness: how our agent is installed, how one child is run and measured
(exit code, wall, its own peak RSS and CPU), and how every child is stopped on the way out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    pass


# --- our agent: as the image installs it, or the harness's own console script --------------


@dataclasses.dataclass(frozen=True)
class OursInstall:
    """How our agent is run: its console script, its interpreter, its site-packages."""

    command: list[str]
    python: str
    site: list[str]
    description: str
    version: str = platform.python_version()


def installed_here() -> OursInstall:
    """`--ours current`: the console script next to the interpreter running this harness."""
    script = Path(sysconfig.get_path("scripts")) / "bootsecrets"
    command = (
        [str(script)]
        if script.is_file() and os.access(script, os.X_OK)
        else [sys.executable, "-m", "bootsecrets.cli"]
    )
    return OursInstall(
        command,
        sys.executable,
        [str(REPO / "agent"), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")],
        f"the console script of {sys.executable} (`--ours current`)",
    )


def _quietly(*argv: str, env: dict[str, str] | None = None) -> None:
    try:
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=True)
    except subprocess.CalledProcessError as err:
        raise BenchError(
            f"installing the agent: {' '.join(argv[:4])} ... failed: "
            f"{err.stderr.decode(errors='replace')[-600:]}"
        ) from None


def _system_python() -> str:
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else None
    python = python or shutil.which("python3")
    if python is None:
        raise BenchError("no python3 to install the agent with; use --ours current")
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != "(3, 11)":
        raise BenchError(
            f"{python} is Python {version}; the image's wheelhouse is for 3.11 "
            "(Debian 12): use --ours current"
        )
    return python


def install_like_image(base: Path) -> OursInstall:
    """`--ours image` (default): our agent installed as packer/scripts/20-install-agent.sh
    installs it: the distribution's python3, a virtualenv, the pinned wheels of
    scripts/build-wheelhouse (built from this checkout), byte-compiled by pip.

    One difference, on purpose: no `--system-site-packages`. The image needs it only for
    Debian's python3-systemd (the journal); on a build machine it would also pull in whatever
    .pth files the machine's dist-packages hold (this sandbox has one that imports certifi at
    every interpreter start, ~25 ms no image pays)."""
    python = _system_python()
    wheelhouse = base / "wheelhouse"
    venv = base / "agent-venv"
    _quietly(
        "bash",
        str(REPO / "scripts/build-wheelhouse"),
        str(wheelhouse),
        env={**os.environ, "PYTHON": sys.executable},
    )
    _quietly(python, "-m", "venv", str(venv))
    pip = [
        str(venv / "bin/python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-index",
        "--find-links",
        str(wheelhouse),
    ]
    _quietly(*pip, "--require-hashes", "-r", str(wheelhouse / "requirements.lock"))
    _quietly(*pip, "--no-deps", *map(str, wheelhouse.glob("bootsecrets-*.whl")))
    site, full_version = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import platform, sysconfig; "
            "print(sysconfig.get_path('purelib'), platform.python_version())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return OursInstall(
        [str(venv / "bin/bootsecrets")],
        str(venv / "bin/python"),
        [site],
        f"a virtualenv of {python} with the wheelhouse, as the image installs it (`--ours image`)",
        full_version,
    )


# --- environment and small helpers ------------------------------------------------------------


def clean_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without Vault/OpenBao settings or systemd's invocation id,
    HOME set to `home`, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VAULT_", "BAO_")) and k != "INVOCATION_ID"
    }
    env["HOME"] = str(home)
    env.update(extra or {})
    return env


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and symlink under the root: (inode, mtime_ns, size)."""
    out = {}
    for path in root.rglob("*"):
        if path.name in ("agent.log", "systemctl.log") or (path.is_dir() and not path.is_symlink()):
            continue
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


# --- processes: measure one child, kill every child on the way out --------------------------


_LIVE: dict[int, subprocess.Popen[bytes]] = {}
_GROUPS: set[int] = set()


@dataclasses.dataclass
class Exit:
    code: int
    wall: float
    maxrss_kb: int
    cpu: float = 0.0  # user + system seconds of the child (and its reaped children)


def track(proc: subprocess.Popen[bytes]) -> None:
    """Stop `proc` in kill_all_live() unless it was reaped (see reaped()) before."""
    _LIVE[proc.pid] = proc


def reaped(proc: subprocess.Popen[bytes], status: int) -> int:
    """`proc` was reaped by an os.wait4() of ours: its exit code; Popen will not wait again."""
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    _LIVE.pop(proc.pid, None)
    return code


# Peak RSS needs care: at execve() Linux folds the *old* address space's high-water mark into
# the process's ru_maxrss, and a child spawned by this harness (vfork/fork) starts out in the
# harness's ~35 MiB address space. So every agent is started by a tiny launcher (`python -S`,
# a few MiB), which posix_spawn()s it, times it, and reports the agent's own wait4() rusage.
# The launcher ignores SIGTERM (the agent gets it back at its default), so a SIGTERM to the
# process group stops a long-running agent and still gets its report.
LAUNCHER = """
import os, signal, sys, time
out = int(sys.argv[1])
argv = sys.argv[2:]
signal.signal(signal.SIGTERM, signal.SIG_IGN)
started = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ, setsigdef=(signal.SIGTERM,))
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - started
os.write(out, ("%d %.6f %d %.6f" % (os.waitstatus_to_exitcode(status), wall, ru.ru_maxrss,
                                     ru.ru_utime + ru.ru_stime)).encode())
"""


class Running:
    """One child started through the launcher; `wait()` (or `stop()`) gives its Exit."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str], log: Path) -> None:
        self.name = Path(argv[0]).name
        self.log = log
        self._read, write_end = os.pipe()
        try:
            with log.open("ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-S", "-E", "-c", LAUNCHER, str(write_end), *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    pass_fds=(write_end,),
                    start_new_session=True,
                )
        except BaseException:
            os.close(self._read)
            raise
        finally:
            os.close(write_end)
        track(self.proc)
        _GROUPS.add(self.proc.pid)

    def wait(self, timeout: float) -> Exit:
        """Wait for the child to exit by itself (killed, and BenchError, after `timeout`)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(self.proc)
            self._close()
            raise BenchError(f"{self.name} did not finish in {timeout:.0f}s") from None
        return self._report()

    def stop(self, grace: float = 10.0) -> Exit:
        """SIGTERM to the child (the launcher stays to report it), SIGKILL after `grace`."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        return self.wait(grace)

    def _close(self) -> None:
        _LIVE.pop(self.proc.pid, None)
        _GROUPS.discard(self.proc.pid)
        if self._read >= 0:
            os.close(self._read)
            self._read = -1

    def _report(self) -> Exit:
        try:
            report = os.read(self._read, 4096).split()
        finally:
            self._close()
        if self.proc.returncode != 0 or len(report) != 4:
            raise BenchError(
                f"launcher for {self.name} failed ({self.proc.returncode}); see {self.log}"
            )
        code, wall, rss, cpu = report
        return Exit(int(code), float(wall), int(rss), float(cpu))


def measure(argv: Sequence[str], *, env: dict[str, str], log: Path, timeout: float) -> Exit:
    """Run one child to completion: exit code, wall from its spawn to its exit, its own peak
    RSS and CPU time (see LAUNCHER). argv[0] must be an absolute path."""
    return Running(argv, env=env, log=log).wait(timeout)


def kill(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop one child we started (and, for a launcher, the agent in its process group)."""
    if proc.returncode is not None:
        return
    group = proc.pid in _GROUPS

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=grace)
    if group:
        send(signal.SIGKILL)  # the agent, should it have outlived its launcher
    _LIVE.pop(proc.pid, None)
    _GROUPS.discard(proc.pid)


def kill_all_live() -> None:
    for proc in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            kill(proc, grace=2.0)
