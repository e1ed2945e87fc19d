"""`bootsecrets decommission`: confirmation, idempotence, a failed step does not stop the
next, files still open are reported, and it works with no encrypted directory at all.
Real ext4 with `encrypt` on a loop device, the shared OpenBao (needs root, as CI runs)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootsecrets import errors, fscrypt
from conftest import Sandbox
from support.loopfs import LoopFs, ext4_loop
from support.openbao import OpenBao, free_port
from support.transit import mounted_in, root_call
from support.world import World
from test_encdirs_faults import booted


@pytest.fixture
def srv(sandbox: Sandbox) -> Iterator[Path]:
    fs: LoopFs
    with ext4_loop(encrypt=True) as fs, mounted_in(fs, sandbox.root / "srv") as target:
        yield target


def steps_of(out: str) -> dict[str, dict[str, str]]:
    return {s["step"]: s for s in json.loads(out)["steps"]}


def accessor_alive(openbao: OpenBao, accessor: str) -> bool:
    response = root_call(openbao, "POST", "auth/token/lookup-accessor", {"accessor": accessor})
    return response.status_code == 200


def test_without_yes_and_without_a_terminal_nothing_is_done(world: World, srv: Path) -> None:
    booted(world)
    code, out, err = world.sandbox.run("decommission")
    assert code == errors.UsageError.exit_code
    assert "needs --yes when standard input is not a terminal" in err
    assert out == ""
    assert fscrypt.is_unlocked(srv / "appdata")
    assert (world.sandbox.root / "var/lib/bootsecrets/keys/appdata.json").exists()
    assert world.sandbox.runner.calls == []


def test_a_failed_revocation_does_not_stop_the_other_steps_and_is_retried(
    world: World, openbao: OpenBao, srv: Path
) -> None:
    sandbox = world.sandbox
    booted(world)
    accessor = json.loads(sandbox.run("status", "--json")[1])["token"]["accessor"]
    sandbox.env["VAULT_ADDR"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    code, out, err = sandbox.run("decommission", "--yes", "--json")

    assert code == errors.DecommissionIncomplete.exit_code, err
    steps = steps_of(out)
    assert [s["outcome"] for s in steps.values()] == (
        ["done"] + ["nothing-to-do"] * 4 + ["done"] * 3 + ["failed"]
    )  # no volumes, no leases
    assert f"bao token revoke -accessor {accessor}" in steps["revoke-token"]["detail"]
    assert "revoke-token failed" in err
    assert not fscrypt.is_unlocked(srv / "appdata")
    assert (sandbox.root / "var/lib/bootsecrets/token").exists()  # kept for the retry
    assert accessor_alive(openbao, accessor)

    del sandbox.env["VAULT_ADDR"]
    code, out, err = sandbox.run("decommission", "--yes", "--json")
    assert code == 0, err
    steps = steps_of(out)
    assert steps["revoke-token"]["outcome"] == "done"
    assert steps["lock-keys"]["detail"] == "appdata (/srv/appdata): already locked"
    assert steps["remove-key-records"]["outcome"] == "nothing-to-do"
    assert not accessor_alive(openbao, accessor)
    assert not (sandbox.root / "var/lib/bootsecrets/token").exists()
    assert not (sandbox.root / "var/lib/bootsecrets/identity.json").exists()


def test_files_still_open_are_reported_and_a_rerun_locks_them(world: World, srv: Path) -> None:
    sandbox = world.sandbox
    booted(world)
    handle = (srv / "appdata/open.log").open("w")
    try:
        handle.write("in use\n")
        handle.flush()
        code, out, err = sandbox.run("decommission", "--yes", "--json")
        assert code == errors.DecommissionIncomplete.exit_code, err
        lock = steps_of(out)["lock-keys"]
        assert lock["outcome"] == "failed"
        assert f"files are still open (processes: {os.getpid()} (" in lock["detail"]
        assert "open.log" not in out  # names of files in the directory are data too
        status = json.loads(sandbox.run("status", "--json")[1])
        assert status["directories"][0]["state"] == "locking"
    finally:
        handle.close()
    code, out, err = sandbox.run("decommission", "--yes", "--json")
    assert code == 0, err
    assert steps_of(out)["lock-keys"]["detail"] == (
        "appdata (/srv/appdata): key removed, directory locked"
    )
    assert not fscrypt.is_unlocked(srv / "appdata")
    assert "open.log" not in os.listdir(srv / "appdata")


def test_a_host_without_encrypted_directories(world: World, openbao: OpenBao) -> None:
    sandbox = world.sandbox
    world.provision()
    assert sandbox.run("bootstrap")[0] == 0
    accessor = json.loads(sandbox.run("status", "--json")[1])["token"]["accessor"]

    code, out, err = sandbox.run("decommission", "--yes")

    assert code == 0, err
    assert "lock-keys: nothing-to-do: no encrypted directory" in out
    assert "remove-key-records: nothing-to-do" in out
    assert "revoke-token: done" in out
    assert not accessor_alive(openbao, accessor)
    assert not (sandbox.store / "token").exists()
    assert not (sandbox.store / "current").exists()


def test_a_host_that_never_bootstrapped(world: World) -> None:
    world.sandbox.write_config(world.config())
    code, out, err = world.sandbox.run("decommission", "--yes")
    assert code == 0, err
    assert "revoke-token: nothing-to-do: no Vault token is kept on this host" in out


def test_a_broken_image_config_does_not_stop_it(world: World, openbao: OpenBao, srv: Path) -> None:
    """Units come from the state file, directories from the key records, the token from
    wherever either policy keeps it, Vault's address from the token record (the address
    that answered the login is kept with it)."""
    sandbox = world.sandbox
    booted(world)
    accessor = json.loads(sandbox.run("status", "--json")[1])["token"]["accessor"]
    sandbox.write_config("vault: [not, a, mapping\n")

    code, out, err = sandbox.run("decommission", "--yes")

    assert code == 0, err
    assert "decommission without the image config" in err
    assert "stop-units: done: stopped app.service, worker.service" in out
    assert "lock-keys: done: appdata (/srv/appdata): key removed, directory locked" in out
    assert "revoke-token: done" in out
    assert not fscrypt.is_unlocked(srv / "appdata")
    assert not accessor_alive(openbao, accessor)
