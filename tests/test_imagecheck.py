"""`bootsecrets image-check`: every rule fires on a planted image tree, nothing secret is shown.

The keys, tokens and hashes are made at test time with the real tools (openssl, ssh-keygen),
so nothing secret-looking is checked in, and each test knows every secret it planted: none of
them may appear in the text or JSON output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import string
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import bootsecrets
from bootsecrets import imagecheck
from bootsecrets.errors import ImageCheckFindings, ImageCheckUnreadable
from bootsecrets.imagecheck import Finding
from support.configs import MINIMAL
from support.loopfs import ext4_loop, tmpfs_mount


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is missing: run `apt-get install -y {package}`")
    return found


def run(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True).stdout


def alnum(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    """Random characters, guaranteed to mix upper case, lower case and digits."""
    while True:
        value = "".join(secrets.choice(alphabet) for _ in range(n))
        if alphabet != string.ascii_letters + string.digits or (
            any(c.isupper() for c in value)
            and any(c.islower() for c in value)
            and any(c.isdigit() for c in value)
        ):
            return value


def write(root: Path, rel: str, content: str | bytes, mode: int = 0o644) -> Path:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    path.chmod(mode)
    return path


def openssl_key(algorithm: str) -> str:
    openssl = tool("openssl", "openssl")
    extra = ["-pkeyopt", "rsa_keygen_bits:2048"] if algorithm == "RSA" else []
    return run(openssl, "genpkey", "-algorithm", algorithm, *extra)


def ssh_keypair(path: Path) -> tuple[str, str]:
    keygen = tool("ssh-keygen", "openssh-client")
    path.parent.mkdir(parents=True, exist_ok=True)
    run(keygen, "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path))
    return path.read_text(), path.with_suffix(".pub").read_text()


def make_clean_tree(root: Path) -> None:
    """What a cleaned Debian image looks like, with near misses that must not fire."""
    write(root, "/usr/bin/cloud-init", "#!/usr/bin/python3\n", 0o755)
    write(
        root,
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\n",
    )
    write(
        root,
        "/etc/shadow",
        "root:*:20000:0:99999:7:::\nalice:!:20000:0:99999:7:::\ndaemon:!*:20000::::::\n",
        0o640,
    )
    write(root, "/etc/machine-id", "")
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    write(root, "/etc/ssh/sshd_config", "PermitRootLogin prohibit-password\n")
    write(root, "/root/.ssh/authorized_keys", "  \n")  # blank: nothing authorized
    write(root, "/home/alice/.ssh/authorized_keys", "")
    write(root, "/root/.bash_history", "")
    write(root, "/var/log/dpkg.log", "")
    write(root, "/var/log/apt/eipp.log.xz", "")
    write(root, "/var/log/wtmp", b"\x07\x00\x00\x00login record")
    (root / "var/log/journal").mkdir()
    (root / "tmp/systemd-private-0123-logind.service-x/tmp").mkdir(parents=True)
    (root / "var/tmp").mkdir()
    write(root, "/opt/app/digitalocean.txt", "not the agent\n")
    write(root, "/var/lib/cloud/scripts/per-instance/.keep", "")
    write(root, "/etc/default/app", "VAULT_TOKEN=$VAULT_TOKEN\nBAO_TOKEN=\nVAULT_ADDR=https://x\n")
    write(
        root,
        "/usr/share/doc/app/README",
        # Split so that no grep for credentials in the repository trips over prose.
        "Paste your key between -----BEGIN RSA "
        "PRIVATE KEY----- and the END line.\n"
        "AWS's example key is AKIA"
        "IOSFODNN7EXAMPLE with "
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
        "Tokens look like hvs.<random> or s.<24 characters>; this.s.isNotATokenAtAll1 isn't.\n"
        'A GCP key has "type": "service_account" (this file has no private key).\n',
    )
    write(
        root,
        "/srv/app/.env",
        "DB_HOST=db\nDB_PASSWORD=\nAPI_TOKEN=${API_TOKEN}\n"
        "SECRET_KEY=$SECRET_KEY\n# PASSWORD=commented\n",
    )
    write(root, "/usr/lib/app/bin", b"\x7fELF\x02\x01\x01" + b"\x00" * 64)
    os.mkfifo(root / "srv/app/fifo")  # must not be opened (it would block)


@pytest.fixture
def clean_tree(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    make_clean_tree(root)
    return root


class Planted:
    """A dirty tree: every secret value written, and every finding expected as (path, rule)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.secrets: list[str] = []
        self.expected: set[tuple[str, str]] = set()

    def plant(
        self, rel: str, content: str, *rules: str, secret: str | None = None, mode: int = 0o644
    ) -> None:
        write(self.root, rel, content, mode)
        if secret is not None:
            self.secrets.append(secret)
        self.expected.update((rel, rule) for rule in rules)


@pytest.fixture
def planted(clean_tree: Path) -> Planted:
    p = Planted(clean_tree)
    root = clean_tree

    token = "hvs." + alnum(90)
    p.plant("/etc/app/config.yml", f"vault:\n  token: {token}\n", "vault-token", secret=token)
    legacy = "s." + alnum(24)
    p.plant("/opt/legacy/settings.json", f'{{"token": "{legacy}"}}\n', "vault-token", secret=legacy)
    literal = alnum(20, string.ascii_lowercase)
    p.plant(
        "/etc/profile.d/vault.sh",
        f"export VAULT_TOKEN='{literal}'\n",
        "vault-token-assignment",
        secret=literal,
    )
    bao = alnum(20, string.ascii_lowercase)
    p.plant(
        "/etc/systemd/system/app.service.d/bao.conf",
        f"[Service]\nEnvironment=BAO_TOKEN={bao}\n",
        "vault-token-assignment",
        secret=bao,
    )

    pem = openssl_key("ED25519")
    p.plant("/opt/app/tls/key.pem", pem, "private-key", secret=pem)
    snakeoil = openssl_key("RSA")
    p.plant(
        "/etc/ssl/private/ssl-cert-snakeoil.key",
        snakeoil,
        "private-key",
        secret=snakeoil,
        mode=0o640,
    )
    user_key, user_pub = ssh_keypair(root / "home/alice/.ssh/id_ed25519")
    p.secrets.append(user_key)
    p.expected |= {
        ("/home/alice/.ssh/id_ed25519", "private-key"),
        ("/home/alice/.ssh/id_ed25519", "ssh-user-file"),
        ("/home/alice/.ssh/id_ed25519.pub", "ssh-user-file"),
    }
    host_key, _ = ssh_keypair(root / "etc/ssh/ssh_host_ed25519_key")
    p.secrets.append(host_key)
    p.expected |= {
        ("/etc/ssh/ssh_host_ed25519_key", "private-key"),
        ("/etc/ssh/ssh_host_ed25519_key", "ssh-host-key"),
        ("/etc/ssh/ssh_host_ed25519_key.pub", "ssh-host-key"),
    }
    p.plant("/root/.ssh/authorized_keys", user_pub, "authorized-keys")

    do_token = "dop_v1_" + secrets.token_hex(32)
    p.plant(
        "/root/.config/doctl/config.yaml",
        f"access-token: {do_token}\n",
        "do-token",
        secret=do_token,
    )
    aws_id = "AKIA" + alnum(16, string.ascii_uppercase + string.digits)
    aws_secret = alnum(40, string.ascii_letters + string.digits + "/+")
    p.plant(
        "/root/.aws/credentials",
        f"[default]\naws_access_key_id = {aws_id}\naws_secret_access_key = {aws_secret}\n",
        "aws-key",
        "aws-secret-key",
        secret=aws_secret,
    )
    p.secrets.append(aws_id)
    gcp_key = openssl_key("RSA")
    gcp = json.dumps(
        {
            "type": "service_account",
            "project_id": "p",
            "private_key_id": secrets.token_hex(20),
            "private_key": gcp_key,
            "client_email": "x@p.iam.gserviceaccount.com",
        },
        indent=2,
    )
    p.plant("/opt/app/gcp.json", gcp, "gcp-service-account", "private-key", secret=gcp_key)

    db_password = alnum(16)
    p.plant(
        "/srv/app/.env",
        f'DB_HOST=db\nDB_PASSWORD="{db_password}"\n',
        "dotenv-secret",
        secret=db_password,
    )
    api_key = alnum(24)
    p.plant(
        "/srv/other/production.env",
        f"export STRIPE_API_KEY={api_key}\n",
        "dotenv-secret",
        secret=api_key,
    )

    root_hash = run(
        tool("openssl", "openssl"), "passwd", "-6", "-stdin", stdin=alnum(12) + "\n"
    ).strip()
    alice_hash = run("openssl", "passwd", "-6", "-stdin", stdin=alnum(12) + "\n").strip()
    p.plant(
        "/etc/shadow",
        f"root:{root_hash}:20000:0:99999:7:::\n"
        f"daemon:*:20000::::::\nalice:!{alice_hash}:20000:0:99999:7:::\n",
        "root-password",
        "user-password",
        secret=root_hash,
        mode=0o640,
    )
    p.secrets.append(alice_hash)

    history = f"vault login {token}\n"
    p.plant("/root/.bash_history", history, "shell-history", "vault-token", secret=token)
    p.plant("/home/alice/.python_history", "import os\n", "shell-history")
    p.plant("/root/.vault-token", token, "credential-file", "vault-token")

    instance = "i-" + secrets.token_hex(4)
    p.plant(f"/var/lib/cloud/instances/{instance}/user-data.txt", "#cloud-config\n")
    p.expected.add((f"/var/lib/cloud/instances/{instance}", "cloud-init-state"))
    (root / "var/lib/cloud/instance").symlink_to(f"/var/lib/cloud/instances/{instance}")
    p.expected.add(("/var/lib/cloud/instance", "cloud-init-state"))
    p.plant("/var/lib/cloud/data/instance-id", instance + "\n", "cloud-init-state")
    p.plant("/var/lib/cloud/seed/nocloud/user-data", "#cloud-config\n", "cloud-init-seed")
    p.plant("/var/log/cloud-init.log", "2026 cloud-init ran\n", "cloud-init-log")

    machine_id = secrets.token_hex(16)
    p.plant("/etc/machine-id", machine_id + "\n", "machine-id", secret=machine_id)
    (root / "var/lib/dbus/machine-id").unlink()
    p.plant("/var/lib/dbus/machine-id", machine_id + "\n", "machine-id", secret=machine_id)
    seed = secrets.token_hex(32)
    p.plant("/var/lib/systemd/random-seed", seed, "systemd-secret", secret=seed)

    wrapped = "hvs." + alnum(90)
    p.plant(
        "/run/bootsecrets/bootstrap.yaml",
        f"role_id: {secrets.token_hex(8)}\nwrapped_secret_id: {wrapped}\n",
        "bootsecrets-store",
        "vault-token",
        secret=wrapped,
    )
    stored = "hvs." + alnum(90)
    p.plant("/var/lib/bootsecrets/token", stored, "bootsecrets-token", "vault-token", secret=stored)
    p.plant("/var/log/syslog", "Jan 1 app started\n", "log-file")
    p.plant("/var/log/apt/history.log", "Start-Date: 2026\n", "log-file")
    p.plant("/var/log/syslog.1", "Jan 1 old\n", "log-archive")
    p.plant("/var/log/messages-20260101", "old\n", "log-archive")
    p.plant("/var/log/journal/0123/system.journal", "LPKSHHRH journal", "log-file")
    (root / "opt/digitalocean/bin").mkdir(parents=True)
    p.expected.add(("/opt/digitalocean", "do-agent"))
    (root / "var/opt/digitalocean/do-agent").mkdir(parents=True)
    p.expected.add(("/var/opt/digitalocean", "do-agent"))
    p.plant("/tmp/bootsecrets/config.yaml", "vault: {}\n", "tmp-file")
    p.plant("/var/tmp/build.log", "", "tmp-file")
    return p


def pairs(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.path, f.rule) for f in findings}


def test_clean_tree_has_no_findings(clean_tree: Path) -> None:
    findings = imagecheck.scan(clean_tree)
    assert findings == []
    assert imagecheck.format_text(findings, clean_tree).endswith(f"no findings in {clean_tree}\n")
    doc = json.loads(imagecheck.format_json(findings, clean_tree))
    assert doc == {"root": str(clean_tree), "findings": [], "count": 0}


def test_every_rule_fires_on_its_path_and_nothing_else(planted: Planted) -> None:
    findings = imagecheck.scan(planted.root)
    assert pairs(findings) == planted.expected
    # Every rule of the table is planted here, except the three with tests of their own.
    assert {rule for _, rule in planted.expected} == (
        set(imagecheck.BY_ID) - {"unreadable", "cloud-init-missing", "encrypt-missing"}
    )
    assert findings == sorted(findings, key=Finding.sort_key)
    assert len(findings) == len(set(findings))


def test_output_shows_no_secret(planted: Planted) -> None:
    findings = imagecheck.scan(planted.root)
    text = imagecheck.format_text(findings, planted.root)
    as_json = imagecheck.format_json(findings, planted.root)
    error = str(imagecheck.findings_error(findings, planted.root))
    assert planted.secrets
    for secret in planted.secrets:
        for line in filter(None, (s.strip() for s in secret.splitlines())):
            if len(line) >= 8 and "PRIVATE KEY" not in line:
                assert line not in text
                assert line not in as_json
                assert line not in error
                assert line not in repr(findings)


def test_json_is_the_documented_document(planted: Planted) -> None:
    findings = imagecheck.scan(planted.root)
    doc = json.loads(imagecheck.format_json(findings, planted.root))
    assert list(doc) == ["root", "findings", "count"]
    assert doc["root"] == str(planted.root)
    assert doc["count"] == len(findings) == len(doc["findings"])
    for item, finding in zip(doc["findings"], findings, strict=True):
        assert item == {
            "path": finding.path,
            "rule": finding.rule,
            "line": finding.line,
            "fingerprint": finding.fingerprint,
        }
        assert item["path"].startswith("/")
        assert item["fingerprint"].startswith("sha256:") and len(item["fingerprint"]) == 23


def test_text_names_path_line_and_rule(planted: Planted) -> None:
    findings = imagecheck.scan(planted.root)
    text = imagecheck.format_text(findings, planted.root)
    assert "/srv/app/.env:2: dotenv-secret: " in text
    assert "/etc/shadow:1: root-password: " in text
    assert "/etc/ssh/ssh_host_ed25519_key: ssh-host-key: " in text
    assert text.endswith(f"{len(findings)} findings in {planted.root}\n")
    error = imagecheck.findings_error(findings, planted.root)
    assert isinstance(error, ImageCheckFindings) and error.exit_code == 40
    assert "ssh-host-key" in str(error)


def test_fingerprint_identifies_without_revealing(planted: Planted) -> None:
    findings = imagecheck.scan(planted.root)
    machine = [f for f in findings if f.rule == "machine-id"]
    # The same bytes in two places give the same fingerprint.
    assert len({f.fingerprint for f in machine}) == 1
    by_rule = {f.rule: f for f in findings if f.path == "/opt/legacy/settings.json"}
    legacy = planted.secrets[1]
    assert by_rule["vault-token"].fingerprint == imagecheck.fingerprint(legacy.encode())


def test_line_numbers(planted: Planted) -> None:
    findings = {(f.path, f.rule): f for f in imagecheck.scan(planted.root)}
    assert findings[("/etc/app/config.yml", "vault-token")].line == 2
    assert findings[("/root/.aws/credentials", "aws-key")].line == 2
    assert findings[("/root/.aws/credentials", "aws-secret-key")].line == 3
    assert findings[("/etc/shadow", "user-password")].line == 3
    assert findings[("/etc/ssh/ssh_host_ed25519_key", "ssh-host-key")].line is None


def test_cloud_init_missing(clean_tree: Path) -> None:
    (clean_tree / "usr/bin/cloud-init").unlink()
    assert pairs(imagecheck.scan(clean_tree)) == {("/usr/bin/cloud-init", "cloud-init-missing")}


def test_symlinks_are_not_followed_out_of_the_tree(clean_tree: Path, tmp_path: Path) -> None:
    outside = write(tmp_path, "/outside/key.pem", openssl_key("ED25519"))
    (clean_tree / "etc/app").mkdir(parents=True)
    (clean_tree / "etc/app/key.pem").symlink_to(outside)
    (clean_tree / "etc/app/dir").symlink_to(outside.parent, target_is_directory=True)
    assert imagecheck.scan(clean_tree) == []


def test_hard_links_are_reported_at_every_path(clean_tree: Path) -> None:
    first = write(clean_tree, "/opt/a/key.pem", openssl_key("ED25519"))
    (clean_tree / "opt/b").mkdir()
    os.link(first, clean_tree / "opt/b/key.pem")
    assert pairs(imagecheck.scan(clean_tree)) == {
        ("/opt/a/key.pem", "private-key"),
        ("/opt/b/key.pem", "private-key"),
    }


def test_oversized_and_binary_files_skip_content_but_not_state(clean_tree: Path) -> None:
    big = b"x" * (imagecheck.MAX_CONTENT_BYTES + 1)
    write(clean_tree, "/var/log/big.log", big)
    write(clean_tree, "/opt/blob.gz", b"\x1f\x8b" + b"\x00" * 10)
    findings = imagecheck.scan(clean_tree)
    assert pairs(findings) == {("/var/log/big.log", "log-file")}
    assert findings[0].fingerprint == imagecheck.fingerprint(big)


def test_pseudo_filesystems_are_skipped(clean_tree: Path) -> None:
    for top in ("proc", "sys", "dev"):
        write(clean_tree, f"/{top}/leak", f"VAULT_TOKEN={alnum(20)}\n")
    assert imagecheck.scan(clean_tree) == []


def test_agent_package_itself_is_clean(tmp_path: Path) -> None:
    """The agent baked into the image must not trip image-check (its docs name the rules)."""
    tree = tmp_path / "image"
    package = Path(bootsecrets.__file__).parent
    shutil.copytree(
        package,
        tree / "usr/lib/python3/dist-packages/bootsecrets",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    write(tree, "/usr/bin/cloud-init", "")
    assert imagecheck.scan(tree) == []


@pytest.mark.parametrize("make", ["missing", "file"])
def test_root_missing_or_not_a_directory(tmp_path: Path, make: str) -> None:
    root = tmp_path / "image"
    if make == "file":
        root.write_text("")
    with pytest.raises(ImageCheckUnreadable, match=str(root)) as info:
        imagecheck.scan(root)
    assert info.value.exit_code == 41


@pytest.fixture
def world_readable_tree() -> Iterator[Path]:
    """A tree an unprivileged user can reach (pytest's tmp_path is under a 0700 directory)."""
    with tempfile.TemporaryDirectory(prefix="imagecheck-") as top:
        Path(top).chmod(0o755)
        root = Path(top) / "image"
        make_clean_tree(root)
        for path in [root, *root.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        yield root


def scan_as_nobody(root: Path) -> tuple[str, str]:
    """`scan(root)` in a forked child that dropped to nobody: (outcome, detail)."""
    if os.geteuid() != 0:
        pytest.fail("these tests drop privileges and must run as root (as CI does)")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                result = "findings", json.dumps(sorted(pairs(imagecheck.scan(root))))
            except ImageCheckUnreadable as err:
                result = "unreadable", str(err)
            os.write(write_fd, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    outcome, detail = json.loads(data)
    return str(outcome), str(detail)


def test_unreadable_root(world_readable_tree: Path) -> None:
    world_readable_tree.chmod(0o700)
    outcome, detail = scan_as_nobody(world_readable_tree)
    assert outcome == "unreadable"
    assert str(world_readable_tree) in detail
    assert "permission denied" in detail.lower()


def test_unreadable_files_are_findings(world_readable_tree: Path) -> None:
    write(world_readable_tree, "/etc/app/secret.yml", "x: 1\n", 0o600)
    (world_readable_tree / "etc/private").mkdir(mode=0o700)
    outcome, detail = scan_as_nobody(world_readable_tree)
    assert outcome == "findings"
    assert sorted(map(tuple, json.loads(detail))) == [
        ("/etc/app/secret.yml", "unreadable"),
        ("/etc/private", "unreadable"),
        ("/etc/shadow", "unreadable"),
    ]


def test_unmodified_packaged_files_are_public(clean_tree: Path) -> None:
    """Example keys shipped by a Debian package (cloud-init's docs) are not this image's."""
    example = f"Example:\n{openssl_key('ED25519')}"
    doc = write(clean_tree, "/usr/share/doc/cloud-init/examples/keys.txt", example)
    module = write(clean_tree, "/usr/lib/python3/dist-packages/cloudinit/cc_ssh.py", example)
    write(
        clean_tree,
        "/usr/lib/python3/dist-packages/cloudinit/__pycache__/cc_ssh.cpython-311.pyc",
        b"\xa7\r\r\n" + example.encode(),
    )
    conffile = write(clean_tree, "/etc/app/example.conf", example)
    md5 = {p: hashlib.md5(p.read_bytes()).hexdigest() for p in (doc, module, conffile)}
    write(
        clean_tree,
        "/var/lib/dpkg/info/cloud-init.md5sums",
        f"{md5[doc]}  usr/share/doc/cloud-init/examples/keys.txt\n"
        # merged /usr: dpkg may record lib/... for what lives in /usr/lib/...
        f"{md5[module]}  lib/python3/dist-packages/cloudinit/cc_ssh.py\n",
    )
    write(
        clean_tree,
        "/var/lib/dpkg/status",
        f"Package: app\nConffiles:\n /etc/app/example.conf {md5[conffile]}\nDescription: x\n",
    )
    assert imagecheck.scan(clean_tree) == []
    # Edited after installation: no longer what the package shipped.
    conffile.write_text(example + "# edited\n")
    assert pairs(imagecheck.scan(clean_tree)) == {("/etc/app/example.conf", "private-key")}


def test_the_operations_guide_lists_exactly_the_rules() -> None:
    """docs/operations.md has one row per rule: its id, what to do, the Marketplace check."""
    text = (Path(__file__).resolve().parent.parent / "docs/operations.md").read_text()
    rows = re.findall(r"^\| `([a-z-]+)` \| (.+?) \| (.+?) \|$", text, re.M)
    assert [(rule, fix, marketplace) for rule, fix, marketplace in rows] == [
        (r.id, r.fix, r.marketplace or "—") for r in imagecheck.RULES
    ]


ENCRYPTED_CONFIG = (
    MINIMAL
    + """\
encrypted_directories:
  appdata: {path: /var/lib/app, units: [app.service]}
"""
)


@pytest.mark.parametrize("encrypt", [True, False])
def test_encrypted_directories_need_a_filesystem_that_encrypts(encrypt: bool) -> None:
    """The kernel judges, on a real ext4 with and without the `encrypt` feature: the image
    whose config asks for an encrypted directory must be able to hold one."""
    with ext4_loop(encrypt=encrypt) as fs:
        root = fs.mountpoint
        make_clean_tree(root)
        write(root, "/etc/bootsecrets/config.yaml", ENCRYPTED_CONFIG)
        found = pairs(imagecheck.scan(root))
        expected = set() if encrypt else {("/var/lib/app", "encrypt-missing")}
        assert found == expected
        # Without encrypted directories in the config, no filesystem is asked to encrypt.
        write(root, "/etc/bootsecrets/config.yaml", ENCRYPTED_CONFIG.partition("encrypted_")[0])
        assert pairs(imagecheck.scan(root)) == set()


def test_a_tree_on_tmpfs_cannot_hold_an_encrypted_directory() -> None:
    with tmpfs_mount() as root:
        make_clean_tree(root)
        write(root, "/etc/bootsecrets/config.yaml", ENCRYPTED_CONFIG)
        assert pairs(imagecheck.scan(root)) == {("/var/lib/app", "encrypt-missing")}
