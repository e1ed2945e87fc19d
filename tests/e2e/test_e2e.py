"""The end-to-end proof (DESIGN.md): nothing faked but the cloud.

    scripts/install-e2e-deps && pytest -m e2e tests/e2e

1. `packer build` of the `qemu.local` source (packer/bootsecrets.pkr.hcl, Debian's packer
   1.6.6, offline, TCG) on a Debian 12 base disk made from a cached mmdebstrap tree, with the
   same uploads and provisioning scripts as the DigitalOcean build; the image config names a
   CA bundle the test made, which the build installs, and (e2e_atrest.py) an encrypted
   directory, an encrypted volume and a PKI certificate, whose packages and sandbox
   drop-ins the build derives from it.
2. The artifact, as Packer left it after its shutdown, mounted read-only: `bootsecrets
   image-check` finds nothing, the root filesystem has the ext4 `encrypt` feature, and the
   raw bytes hold nothing of the build's login (its free space was zeroed).
3. OpenBao on the host's loopback, HTTPS with the test's CA: AppRole (single-use
   secret-ids), policy, KV v2 secrets with awkward values, a response-wrapped secret-id as
   Terraform's provider mints it; user-data rendered by Terraform's own templatefile().
4. First boot (QEMU, user-mode network only, a blank second disk as the volume): both demo
   units report exactly the digests of their values; demo-records and demo-uploads write and
   read back a canary in the encrypted directory and on the LUKS2 volume; demo-tls serves
   HTTPS with its PKI certificate; `status --json`, the store, cloud-init, the refresh
   timer, the wake-up timer, the scrubbed user-data copies. A rotation and `bootsecrets
   refresh` restart only demo-a; the timer's hardened unit then changes nothing.
5. Power off; the raw disk holds no value, no secret-id, no Vault token, no wrapping token
   and nothing of the encrypted directory in clear; the volume holds its header and token,
   no canary and no data key.
6. Boot again under `reprovision`: units down, exit 29, the "not provisioned" alert, and
   cloud-init still happy with its scrubbed files; the directory locked, the volume closed.
   Re-provision with `persist-token` and a new wrapped secret-id on stdin; reboot: the units
   come back on their own, same values, same data. The volume's bad inputs on the running
   guest (51, 53, 57, 54), each failing closed for its unit only; decommission; the Transit
   key deleted; neither disk holds the data.
7. A fresh VM whose user-data points at a listener with a certificate from another CA: the
   agent fails closed (exit 33, alert, units down), scrubs the disk copies of the still-live
   token, keeps the store's copy, and a retry against the right address brings the units up
   but the volume's, whose disk already holds a filesystem (55, untouched).

Where to add a property: a check in e2e_checks.py, called after the boot it is about.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import e2e_atrest as atrest
import e2e_checks as check
import e2e_disk
import pytest
from e2e_bao import Pki, Tls, TlsBao, make_tls, tls_dev_server
from e2e_image import (
    PACKER_DIR,
    REPO,
    TIMINGS,
    base_disk,
    build_rootfs,
    build_wheelhouse,
    ext4_features,
    image_check,
    log,
    mounted_ro,
    packer_build,
    seed_dir,
    ssh_key,
    timed,
    to_raw,
)
from e2e_vm import VM, Drive, make_seed, overlay, running

from bootsecrets import errors
from support.pki import PkiEngine, names
from support.terraform import render_user_data
from support.transit import create_key
from support.volumes import digest

pytestmark = pytest.mark.e2e

DEMO_A, DEMO_B = "demo-a.service", "demo-b.service"
BOOT_TIMEOUT = float(os.environ.get("BOOTSECRETS_E2E_BOOT_TIMEOUT", "480"))
ROLE = "demo"  # packer/demo/config.yaml: approle.role
TOKEN_TTL = 3600
AGENT_FAILED = r"(?i)Failed to start .*bootsecrets|bootsecrets\.service: Main process exited"


@pytest.fixture(scope="module", autouse=True)
def timings_line(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: one line of wall times per step (durations only, never a value),
    shown even though pytest captures the output of passing tests."""
    started = time.monotonic()
    yield
    TIMINGS["total"] = time.monotonic() - started
    line = "[e2e] timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in TIMINGS.items())
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capture is None or reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def awkward(tag: str, label: str) -> str:
    """A value with everything an env file or a shell gets wrong. `tag` makes it findable."""
    return (
        f"{label}-{tag} \"double\" 'single' $HOME ${{NOPE}} \\back\\slash `tick` "
        f"é ü ß 日本 €\nsecond line\ttab \\n not-a-newline %s %% ;|&"
    )


@dataclasses.dataclass
class Demo:
    """The demo's secrets in OpenBao, as they are now, and every value they ever had."""

    tag: str
    role_id: str
    a: dict[str, str]
    b: dict[str, str]
    canaries: dict[str, str]  # what demo-records and demo-uploads write (e2e_atrest)
    pki_ca: str  # the PKI engine's CA, which demo-tls's certificate must verify against
    a_version: int = 1
    history: list[str] = dataclasses.field(default_factory=list)

    def env_a(self) -> dict[str, str]:
        return {
            "DEMO_PASSWORD": self.a["password"],
            "DEMO_URL": f"postgresql://app:{self.a['password']}@db/app",
        }

    def env_b(self) -> dict[str, str]:
        return {
            "DEMO_USER": self.b["user"],
            "DEMO_TOKEN": self.b["token"],
            "DEMO_NOTE": self.b["note"],
        }

    def remember(self) -> None:
        self.history += [*self.a.values(), *self.b.values(), self.env_a()["DEMO_URL"]]
        self.history += [*self.canaries.values(), *map(atrest.file_name, self.canaries.values())]

    def units(self, tls_version: int | None = 1) -> dict[str, dict[str, int | None]]:
        """What `status --json` must show: each unit and the version of its secrets."""
        return {
            DEMO_A: {"secret/demo/a": self.a_version},
            DEMO_B: {"secret/demo/b": 1},
            atrest.RECORDS: {f"secret/{atrest.DATA_SECRET}": 1},
            atrest.UPLOADS: {f"secret/{atrest.DATA_SECRET}": 1},
            atrest.TLS: {f"pki/issue/{atrest.PKI_ROLE}": tls_version},
        }


@dataclasses.dataclass(frozen=True)
class Image:
    qcow2: Path
    kernel: Path
    initrd: Path
    build_key: str  # the public key the build logged in with


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Big sparse files: keep them off tmpfs. Removed afterwards unless BOOTSECRETS_E2E_KEEP=1.
    base = Path(os.environ.get("BOOTSECRETS_E2E_WORKDIR", "/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    path = Path(
        subprocess.run(
            ["mktemp", "-d", f"{base}/bootsecrets-e2e.XXXXXX"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    yield path
    if os.environ.get("BOOTSECRETS_E2E_KEEP") == "1":
        log(f"kept {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


#: Debugging only (CI never sets it): a work dir kept by an earlier run
#: (BOOTSECRETS_E2E_KEEP=1) whose image and CAs are used instead of building them again.
REUSE = os.environ.get("BOOTSECRETS_E2E_REUSE")


@pytest.fixture(scope="module")
def tls(workdir: Path) -> Tls:
    if REUSE:
        tls_dir = Path(REUSE) / "tls"
        return Tls(
            *(
                Pki(
                    tls_dir / f"{n}-ca.pem",
                    tls_dir / f"{n}-server.pem",
                    tls_dir / f"{n}-server.key",
                )
                for n in ("good", "wrong")
            )
        )
    return make_tls(workdir / "tls")


@pytest.fixture(scope="module")
def server(workdir: Path, tls: Tls) -> Iterator[TlsBao]:
    with tls_dev_server(workdir / "openbao", tls) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def image(workdir: Path, tls: Tls) -> Image:
    if os.geteuid() != 0:
        pytest.fail("the e2e test needs root (mmdebstrap --mode=root, loop mounts)")
    if REUSE:
        kept = Path(REUSE)
        log(f"BOOTSECRETS_E2E_REUSE: the image built in {kept}, not a new build")
        return Image(
            kept / "packer-output/bootsecrets-debian-12.qcow2",
            kept / "base/vmlinuz",
            kept / "base/initrd.img",
            (kept / "build_key.pub").read_text().strip(),
        )
    subprocess.run([str(REPO / "scripts/install-e2e-deps")], check=True)
    with timed("rootfs"):
        rootfs = build_rootfs()
    with timed("base-disk"):
        base = base_disk(rootfs, workdir / "base")
    with timed("wheelhouse"):
        wheelhouse = workdir / "wheelhouse"
        build_wheelhouse(wheelhouse)
    # The demo config, verifying Vault with the test's CA (installed by the build), with an
    # encrypted directory, an encrypted volume and a certificate (e2e_atrest).
    config = workdir / "config.yaml"
    config.write_text(atrest.image_config((PACKER_DIR / "demo/config.yaml").read_text()))
    key = ssh_key(workdir / "build_key")
    public = key.with_suffix(".pub").read_text().strip()
    seed = seed_dir(workdir / "build-seed", public)
    with timed("packer-build"):
        qcow2 = packer_build(
            base,
            wheelhouse=wheelhouse,
            config_file=config,
            vault_ca_file=tls.good.ca,
            seed=seed,
            private_key=key,
            workdir=workdir,
        )
    if os.environ.get("BOOTSECRETS_E2E_KEEP") != "1":
        base.disk.unlink()
    return Image(qcow2, base.kernel, base.initrd, public)


@pytest.fixture(scope="module")
def guest_key(workdir: Path) -> Path:
    return ssh_key(workdir / "id_ed25519")


@pytest.fixture(scope="module")
def demo(server: TlsBao) -> Demo:
    tag = secrets.token_hex(8)
    bao = server.bao
    a = {"password": awkward(tag, "pw1"), "api_key": f'ak-{tag}-$(id)`x`\\"q"\u00e9'}
    b = {"user": f"user-{tag}-ñ", "token": f"tok-{tag}\"'$\\`", "note": awkward(tag, "note")}
    bao.put("secret", "demo/a", a)
    bao.put("secret", "demo/b", b)
    canaries = atrest.prepare_vault(bao, tag)
    pki = PkiEngine(bao)
    pki.role(atrest.PKI_ROLE, allowed_domains=["bootsecrets.test"], max_ttl="4h")
    role_id = bao.approle(
        ROLE,
        atrest.policy(
            'path "secret/data/demo/*" { capabilities = ["read"] }\n', atrest.ALL_TRANSIT
        ),
        secret_id_num_uses=1,
        secret_id_ttl="30m",
        token_ttl=f"{TOKEN_TTL}s",
        token_max_ttl="4h",
    )
    result = Demo(tag, role_id, a, b, canaries, pki.ca_pem)
    result.remember()
    return result


def boot_vm(
    name: str,
    image: Image,
    workdir: Path,
    key: Path,
    user_data: str,
    instance: str,
    volume: Path,
) -> VM:
    """A VM on a fresh overlay of the image, with this user-data (checked by cloud-init) and
    `volume` attached where the config looks for the encrypted volume."""
    seed = make_seed(workdir / f"seed-{name}", user_data, instance)
    schema = subprocess.run(
        ["cloud-init", "schema", "-c", str(workdir / f"seed-{name}/user-data")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr
    disk = overlay(image.qcow2, workdir / f"{name}.qcow2")
    return VM(
        name=name,
        root=Drive(disk),
        kernel=image.kernel,
        initrd=image.initrd,
        seed=seed,
        workdir=workdir,
        ssh_key=key,
        drives=[Drive(volume, "raw", serial=atrest.VOLUME_SERIAL)],
        guest_ports=list(check.DEMO_PORTS.values()),
    )


def user_data_for(demo: Demo, addr: str, wrapped: str, key: Path) -> str:
    return render_user_data(
        vault_addr=addr,
        role_id=demo.role_id,
        wrapped_secret_id=wrapped,
        ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()],
    )


def demo_is_up(vm: VM, demo: Demo, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    vm.wait_http(
        check.DEMO_PORTS[DEMO_A],
        timeout,
        fail_pattern=AGENT_FAILED,
        until=lambda d: d["sha256"].get("DEMO_PASSWORD") == check.sha(demo.a["password"]),
    )
    vm.wait_http(check.DEMO_PORTS[DEMO_B], 60, fail_pattern=AGENT_FAILED)
    vm.wait_ssh(120)
    return (
        check.demo_runs_with(vm, DEMO_A, demo.env_a(), {"api_key": demo.a["api_key"]}),
        check.demo_runs_with(vm, DEMO_B, demo.env_b(), {}),
    )


def at_rest_is_up(vm: VM, demo: Demo, starts: int, timeout: float = 120) -> dict[str, Any]:
    """demo-records and demo-uploads read back what they wrote (started at least `starts`
    times since), demo-tls serves its certificate; the reports by unit (demo-tls: + `der`)."""
    docs = {
        unit: atrest.writes_data(vm, unit, demo.canaries[name], starts, timeout)
        for unit, name in ((atrest.RECORDS, "records"), (atrest.UPLOADS, "uploads"))
    }
    doc, der = atrest.certificate_served(vm, demo.pki_ca, timeout)
    assert names(ssl.DER_cert_to_PEM_cert(der)).common_name == atrest.TLS_NAME
    docs[atrest.TLS] = {**doc, "der": der}
    return docs


def same_process(before: dict[str, Any], after: dict[str, Any]) -> bool:
    return (before["pid"], before["invocation_id"]) == (after["pid"], after["invocation_id"])


# --- 2. the artifact ---------------------------------------------------------------------------


def test_the_packer_artifact_is_clean(image: Image, workdir: Path) -> None:
    with timed("artifact-check"):
        raw = to_raw(image.qcow2, workdir / "artifact.raw")
        assert "encrypt" in ext4_features(raw)
        with mounted_ro(raw, workdir / "artifact") as tree:
            result = image_check(tree)
            ca = (tree / "etc/bootsecrets/vault-ca.pem").read_text()
            config = (tree / "etc/bootsecrets/config.yaml").read_text()
        assert result.returncode == 0, f"image-check on the artifact:\n{result.stdout}"
        assert '"count": 0' in result.stdout
        assert ca.startswith("-----BEGIN CERTIFICATE-----")
        assert "ca_cert: /etc/bootsecrets/vault-ca.pem" in config
        # The build's login key was in the guest (authorized_keys, cloud-init's user-data,
        # logs) and deleted; the zeroed free space must not hold it either. Positive control:
        # a line of the image config (a file on the disk) is found.
        key_body = image.build_key.split()[1]
        control = 'DEMO_URL: "postgresql://app:{{ secrets.a.password }}@db/app"'
        hits = e2e_disk.find_values(raw, [key_body, control])
        dirty = e2e_disk.nonzero_free_blocks(raw)
        raw.unlink()
    assert hits.pop(control, 0), "the raw scan cannot see file contents"
    assert hits == {}, "the build's SSH key is still in the artifact's blocks"
    # What is left in free blocks was freed after the zeroing, at the build VM's shutdown
    # (emptied directories, a DHCP lease): a handful of blocks, logged, not asserted.
    log(f"artifact: {dirty} free blocks are not zero")


# --- 4-6. first boot, rotation, disk scan, reboots -------------------------------------------


def test_first_boot_rotation_disk_and_reboots(
    image: Image,
    server: TlsBao,
    demo: Demo,
    guest_key: Path,
    workdir: Path,
    captured: Any,
) -> None:
    bao = server.bao
    wrapped = bao.wrapped_secret_id(ROLE, ttl="30m")
    volume = atrest.blank_volume(workdir / "main-volume.img")
    vm = boot_vm(
        "main",
        image,
        workdir,
        guest_key,
        user_data_for(demo, server.guest_addr, wrapped, guest_key),
        f"i-e2e-{demo.tag}",
        volume,
    )
    with running(vm):
        # --- boot 1: first boot --------------------------------------------------------
        with timed("boot1-to-demo"):
            doc_a, doc_b = demo_is_up(vm, demo, BOOT_TIMEOUT)
            at_rest = at_rest_is_up(vm, demo, starts=1)
        check.agent_exited(vm, 0)
        check.bootstrap_consumed(vm)
        check.store_is_memory_only(vm)
        check.cloud_init_done(vm)
        check.refresh_timer_scheduled(vm)
        check.root_fs_has_encrypt(vm)
        check.user_data_scrubbed(vm, wrapped, unwrapped=True)
        check.free_blocks_trimmed(vm)
        check.status_shows(
            check.status(vm),
            policy="reprovision",
            generation=1,
            units=demo.units(),
            token_ttl=TOKEN_TTL,
        )
        # Data at rest: the directory created encrypted and unlocked, the blank volume
        # formatted, opened and mounted; the certificate on its schedule.
        atrest.directory_unlocked(vm)
        atrest.volume_mounted(vm)
        atrest.certificate_scheduled(vm, certificate_ttl=2 * 3600)

        # --- rotate demo-a's secret, refresh in the guest -----------------------------
        with timed("refresh"):
            demo.a = {**demo.a, "password": awkward(demo.tag, "pw2-rotated")}
            demo.a_version = bao.put("secret", "demo/a", demo.a)
            demo.remember()
            out = vm.sudo("bootsecrets", "refresh", timeout=180)
            captured.add("guest refresh", out)
            vm.wait_http(
                check.DEMO_PORTS[DEMO_A],
                60,
                until=lambda d: d["sha256"].get("DEMO_PASSWORD") == check.sha(demo.a["password"]),
            )
            doc_a2 = check.demo_runs_with(vm, DEMO_A, demo.env_a(), {"api_key": demo.a["api_key"]})
            doc_b2 = vm.http_json(check.DEMO_PORTS[DEMO_B])
        assert (doc_a2["pid"], doc_a2["invocation_id"]) != (doc_a["pid"], doc_a["invocation_id"])
        assert (doc_b2["pid"], doc_b2["invocation_id"], doc_b2["sha256"]) == (
            doc_b["pid"],
            doc_b["invocation_id"],
            doc_b["sha256"],
        ), "demo-b must not restart"
        for unit, before in at_rest.items():
            after = at_rest_is_up(vm, demo, starts=1)[unit]
            assert same_process(before, after), f"the refresh restarted {unit}"
            if unit == atrest.TLS:
                assert after["der"] == before["der"], "the refresh re-issued the certificate"
        check.status_shows(
            check.status(vm),
            policy="reprovision",
            generation=2,
            units=demo.units(),
            token_ttl=TOKEN_TTL,
        )

        # --- nothing changed: the timer's hardened unit refreshes without restarts ------
        vm.sudo("systemctl", "start", "bootsecrets-refresh.service", timeout=180)
        for unit, before in ((DEMO_A, doc_a2), (DEMO_B, doc_b2)):
            after = vm.http_json(check.DEMO_PORTS[unit])
            assert (after["pid"], after["invocation_id"]) == (
                before["pid"],
                before["invocation_id"],
            ), f"no-op refresh restarted {unit}"
        captured.add("guest journal, boot 1", check.journal_text(vm))  # for the leak guard
        captured.add(
            "guest systemctl show",
            vm.sudo("systemctl", "show", DEMO_A, DEMO_B, "bootsecrets.service"),
        )
        with timed("poweroff"):
            vm.poweroff()

        # --- 5. the disk: no value, no secret-id, no token, no wrapping token ----------
        # (nor what demo-records wrote into its encrypted directory, nor its file's name);
        # the volume: its LUKS2 header with our token, none of demo-uploads' data in clear.
        with timed("disk-scan"):
            scan_disk(vm.root.path, workdir / "main.raw", demo, server, [wrapped])
            volume_ciphertext = atrest.volume_image_holds_no_plaintext(
                bao, volume, demo.canaries["uploads"]
            )

        # --- boot 2 (reprovision): nothing at rest, the units stay down -----------------
        with timed("boot2-not-provisioned"):
            vm.start()
            vm.wait_ssh(BOOT_TIMEOUT)
            check.agent_exited(vm, check.NOT_PROVISIONED.exit_code)
        check.alerted(vm, check.NOT_PROVISIONED)
        check.units_down(vm)
        check.not_provisioned(check.status(vm))
        # Nothing at rest opens without Vault: the directory's names and data are ciphertext.
        atrest.directory_locked(vm, demo.canaries["records"])
        atrest.volume_closed(vm)
        check.cloud_init_done(vm)  # on the files the agent scrubbed at the first boot
        check.refresh_timer_scheduled(vm)

        # --- re-provision under persist-token from a new wrapped secret-id on stdin -----
        with timed("reprovision"):
            vm.sudo(
                "sed",
                "-i",
                "s/^reboot_policy: reprovision$/reboot_policy: persist-token/",
                "/etc/bootsecrets/config.yaml",
            )
            again = bao.wrapped_secret_id(ROLE, ttl="30m")
            vm.sudo(
                "bootsecrets",
                "refresh",
                "--wrapped-secret-id",
                "-",
                input=again + "\n",
                timeout=180,
            )
            before_reboot = demo_is_up(vm, demo, 120)
            at_rest_before_reboot = at_rest_is_up(vm, demo, starts=2)
        assert vm.ssh("sudo test -s /var/lib/bootsecrets/token", check=False).returncode == 0
        # Starting the units also starts bootsecrets.service again (their drop-ins require
        # it; it failed at this boot), which renders once more with the kept token: the
        # generation is 1 or 2.
        check.status_shows(
            check.status(vm),
            policy="persist-token",
            generation=None,
            units=demo.units(tls_version=None),
            token_ttl=TOKEN_TTL,
        )
        captured.add("guest journal, boot 2", check.journal_text(vm))

        # --- boot 3 (persist-token): back on their own, same values ---------------------
        with timed("boot3-persist-token"):
            vm.reboot()
            after_reboot = demo_is_up(vm, demo, BOOT_TIMEOUT)
            # The data written at the first boot, read back after two reboots.
            starts = {
                u: d["data"]["starts"] for u, d in at_rest_before_reboot.items() if "data" in d
            }
            at_rest = at_rest_is_up(vm, demo, starts=min(starts.values()) + 1)
        check.agent_exited(vm, 0)
        for before, after in zip(before_reboot, after_reboot, strict=True):
            assert after["sha256"] == before["sha256"]
            assert after["credentials"] == before["credentials"]
            assert after["invocation_id"] != before["invocation_id"]
        for unit, count in starts.items():
            assert at_rest[unit]["data"]["starts"] == count + 1, unit
        check.status_shows(
            check.status(vm),
            policy="persist-token",
            generation=1,
            units=demo.units(tls_version=None),
            token_ttl=TOKEN_TTL,
        )
        atrest.directory_unlocked(vm)
        atrest.volume_mounted(vm)
        check.cloud_init_done(vm)
        captured.add("guest journal, boot 3", check.journal_text(vm))

        # --- the volume's bad inputs on the running guest, then decommission -------------
        with timed("volume-faults"):
            atrest.volume_faults(vm, bao)
            again = at_rest[atrest.UPLOADS]["data"]["starts"] + 1
            atrest.writes_data(vm, atrest.UPLOADS, demo.canaries["uploads"], again, 120)
        with timed("decommission"):
            directory_ciphertext = atrest.decommission(vm, demo.canaries["records"])
            captured.add("guest journal, decommission", check.journal_text(vm))
            vm.poweroff()
        atrest.shredded(bao, [directory_ciphertext, volume_ciphertext])
        atrest.volume_image_erased(volume, demo.canaries["uploads"], volume_ciphertext)
        scan_disk(vm.root.path, workdir / "main.raw", demo, server, [wrapped], audit=False)


def scan_disk(
    disk: Path, raw: Path, demo: Demo, server: TlsBao, tokens: list[str], *, audit: bool = True
) -> None:
    """Every value the demo's secrets ever had, the wrapping tokens, the AppRole secret-id and
    the agent's Vault token: none on the powered-off guest's disk, deleted blocks included.
    Without `audit` only the values (after persist-token the agent's token is on the disk by
    design)."""
    to_raw(disk, raw)
    try:
        values = sorted(set(demo.history))
        # The tag-bearing first words catch values stored re-encoded (escaped, split at \n).
        fragments = {v.split("\n")[0].split(" ")[0] for v in values}
        control = 'DEMO_URL: "postgresql://app:{{ secrets.a.password }}@db/app"'
        hits = e2e_disk.find_values(raw, [*values, *fragments, *tokens, control])
        assert hits.pop(control, 0), "the disk scan cannot see file contents"
        assert not any(t in hits for t in tokens), "a wrapping token is on the VM's disk"
        assert not hits, (
            "secret values on the VM's disk: "
            f"{[v[:8] + '…' for v in hits]} — find them with debugfs/grep"
        )
        if not audit:
            return

        bao = server.bao
        hmacs = e2e_disk.audited_hmacs(bao.audit_path)
        assert hmacs["secret_id"], "the audit log saw no secret-id (did the agent log in?)"
        assert hmacs["client_token"], "the audit log saw no AppRole login"
        # Positive control: the audit hash of the (known) role-id matches what the log holds,
        # so a secret-id or token on the disk could not escape the comparison below.
        assert e2e_disk.audit_hash(bao.client, "file", demo.role_id) in hmacs["role_id"]
        uuids = e2e_disk.shaped_strings(raw, e2e_disk.UUID)
        shaped = e2e_disk.shaped_strings(raw, e2e_disk.TOKEN)
        leaked_ids = {
            u for u in uuids if e2e_disk.audit_hash(bao.client, "file", u) in hmacs["secret_id"]
        }
        leaked_tokens = {
            t for t in shaped if e2e_disk.audit_hash(bao.client, "file", t) in hmacs["client_token"]
        }
        assert not leaked_ids, "the AppRole secret-id is on the VM's disk"
        assert not leaked_tokens, "the agent's Vault token is on the VM's disk"
        log(
            f"disk scan: {len(values) + len(fragments) + len(tokens)} values and tokens, "
            f"{len(uuids)} UUID-shaped and {len(shaped)} token-shaped strings checked against "
            "the audit HMACs: 0 hits"
        )
    finally:
        raw.unlink(missing_ok=True)


# --- 7. the wrong CA --------------------------------------------------------------------------


def test_a_certificate_from_another_ca_fails_closed(
    image: Image,
    server: TlsBao,
    demo: Demo,
    guest_key: Path,
    workdir: Path,
    captured: Any,
) -> None:
    wrapped = server.bao.wrapped_secret_id(ROLE, ttl="30m")
    # The main test shredded the Transit key: a new one (same name) for this droplet.
    create_key(server.bao, atrest.ROLE, atrest.TRANSIT_MOUNT)
    # Where the volume should be: a disk that already holds a filesystem (never formatted).
    volume = atrest.blank_volume(workdir / "wrongca-volume.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", str(volume)], check=True)
    volume_sha = digest(volume)
    vm = boot_vm(
        "wrongca",
        image,
        workdir,
        guest_key,
        user_data_for(demo, server.wrong_guest_addr, wrapped, guest_key),
        f"i-e2e-wrongca-{demo.tag}",
        volume,
    )
    with running(vm):
        with timed("wrong-ca-boot"):
            vm.wait_ssh(BOOT_TIMEOUT)
            check.agent_exited(vm, check.TLS_FAILED.exit_code)
        alert = check.alerted(vm, check.TLS_FAILED)
        assert alert["VAULT_ADDR"] == server.wrong_guest_addr
        assert "TLS verification" in alert["MESSAGE"]
        check.units_down(vm)
        # The token was never unwrapped: still live. Gone from the disk, kept in memory.
        check.user_data_scrubbed(vm, wrapped, unwrapped=False)
        check.bootstrap_kept(vm)
        captured.add("guest journal, wrong CA", check.journal_text(vm))

        # The operator's fix, the address of a server with the right certificate for the
        # agent's unit, and a restart: the kept bootstrap is unwrapped after all.
        with timed("wrong-ca-retry"):
            vm.sudo(
                "sh",
                "-c",
                "mkdir -p /run/systemd/system/bootsecrets.service.d && "
                "printf '[Service]\\nEnvironment=VAULT_ADDR=%s\\n' \"$0\" "
                "> /run/systemd/system/bootsecrets.service.d/50-vault-addr.conf",
                server.guest_addr,
            )
            vm.sudo("systemctl", "daemon-reload")
            vm.sudo("systemctl", "restart", "bootsecrets.service", timeout=300)
            # The volume's disk holds a filesystem: refused (55, which the unit counts as a
            # success so that the others start), untouched, its unit down.
            check.agent_exited(vm, errors.VolumeNotBlank.exit_code)
            demo_is_up(vm, demo, 120)
            atrest.writes_data(vm, atrest.RECORDS, demo.canaries["records"], 1, 120)
            atrest.certificate_served(vm, demo.pki_ca, 120)
        check.bootstrap_consumed(vm)
        check.user_data_scrubbed(vm, wrapped, unwrapped=False)  # still none on the disk
        # (The first run, which failed at TLS, may have refused it already: its checks come
        # before Vault.)
        refused = vm.journal(f"MESSAGE_ID={errors.VolumeNotBlank.message_id}")
        assert refused and all(a["PRIORITY"] == "1" for a in refused), refused
        assert all(a["VOLUME"] == atrest.VOLUME and "ext4" in a["MESSAGE"] for a in refused)
        check.units_down(vm, atrest.UPLOADS)
        [state] = check.status(vm)["volumes"]
        assert state["state"] == "not-bootsecrets", state
        captured.add("guest journal, wrong CA retried", check.journal_text(vm))
    assert digest(volume) == volume_sha, "the refused volume was written to"
