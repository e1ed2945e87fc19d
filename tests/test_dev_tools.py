"""The installed dev helpers (dev/, bootsecrets-dev) that the demo, the tests and the
benchmark share: the recording systemctl stand-in and the `bootsecrets-dev-openbao` entry
point, run as their own processes, as the demo and a developer run them."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from pathlib import Path

import requests

from bootsecrets_dev.programs import installed, recording_systemctl
from bootsecrets_dev.run_openbao import READY
from support.openbao import CANARIES


def test_systemctl_standin_records_calls_and_answers_is_active(tmp_path: Path) -> None:
    systemctl = recording_systemctl(tmp_path / "calls.log")
    env = {"PATH": "/usr/bin:/bin", **systemctl.env()}

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(systemctl.program), *args], env=env, capture_output=True, text=True, check=False
        )

    assert call("daemon-reload").returncode == 0
    assert call("start", "--no-block", "--", "a.service", "b.service").returncode == 0
    active = call("is-active", "--", "a.service")

    assert (active.returncode, active.stdout) == (0, "active\n")
    assert systemctl.calls() == [
        ["daemon-reload"],
        ["start", "--no-block", "--", "a.service", "b.service"],
        ["is-active", "--", "a.service"],
    ]
    assert systemctl.started() == {"a.service", "b.service"}


def test_systemctl_standin_without_a_log_fails_loudly() -> None:
    program = installed("bootsecrets-dev-systemctl")
    result = subprocess.run(
        [str(program), "daemon-reload"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "BOOTSECRETS_DEV_SYSTEMCTL_LOG" in result.stderr


def read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float) -> list[str]:
    """Lines of `proc`'s stdout up to the one holding `marker` (unbuffered reads: nothing
    is left in a buffer select() cannot see)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    give_up = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while marker.encode() not in data and time.monotonic() < give_up:
            if not sel.select(give_up - time.monotonic()):
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    lines = data.decode().splitlines()
    assert any(marker in line for line in lines), f"no {marker!r} in {timeout}s; got {lines}"
    return lines


def test_dev_openbao_entry_point_serves_an_approle_and_a_bootstrap(tmp_path: Path) -> None:
    bootstrap = tmp_path / "bootstrap.yaml"
    proc = subprocess.Popen(
        [
            str(installed("bootsecrets-dev-openbao")),
            "--role",
            "demo",
            "--read",
            "secret/data/demo/*",
            "--bootstrap",
            str(bootstrap),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        lines = read_until(proc, READY, timeout=60)
        addr = next(
            line.split("=", 1)[1] for line in lines if line.startswith("export VAULT_ADDR=")
        )
        doc = json.loads(bootstrap.read_text())
        CANARIES.add(doc["wrapped_secret_id"])

        assert addr.startswith("http://127.0.0.1:")
        assert requests.get(f"{addr}/v1/sys/health", timeout=5).status_code == 200
        assert os.stat(bootstrap).st_mode & 0o777 == 0o600
        assert doc["vault_addr"] == addr and doc["role_id"]
        # The wrapping token wraps a secret-id of the role, as Terraform would mint it.
        lookup = requests.post(
            f"{addr}/v1/sys/wrapping/lookup", json={"token": doc["wrapped_secret_id"]}, timeout=5
        )
        assert lookup.status_code == 200, lookup.text
        assert lookup.json()["data"]["creation_path"] == "auth/approle/role/demo/secret-id"
        assert doc["wrapped_secret_id"] not in "\n".join(lines)  # written, never printed
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)

    assert proc.returncode == 0, err.decode(errors="replace")
    assert out.decode().rstrip().endswith("stopped")
    # The server went with it.
    try:
        requests.get(f"{addr}/v1/sys/health", timeout=2)
        gone = False
    except requests.ConnectionError:
        gone = True
    assert gone
