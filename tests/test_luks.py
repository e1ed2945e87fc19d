"""The cryptsetup edge: exact command lines and the token format against a recorder, and
for real on this host what needs no device-mapper (which the host kernel lacks): LUKS2
headers on image files and loop devices (format, token import/export, luksDump,
--test-passphrase, erase), the blank check with the real libblkid, and Transit data keys
from a real OpenBao. `cryptsetup open`/`close` run for real only in the e2e VM.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hvac.exceptions import VaultError

from bootsecrets import luks
from support.loopfs import loop_device, require_root, sh
from support.openbao import OpenBao

CIPHERTEXT = "vault:v1:" + base64.b64encode(b"n" * 92).decode()
TOKEN = luks.TransitToken("transit", "droplet-web-1", 1, CIPHERTEXT)


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("cryptsetup", "blkid"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: run `bash scripts/install-test-deps`")


def new_key() -> bytearray:
    return bytearray(secrets.token_bytes(luks.KEY_SIZE))


def zero_image(tmp_path: Path, name: str = "volume.img", size_mib: int = 32) -> Path:
    path = tmp_path / name
    with path.open("wb") as handle:
        handle.truncate(size_mib << 20)
    return path


def key_texts(key: bytearray) -> list[str]:
    raw = bytes(key)
    return [raw.hex(), base64.b64encode(raw).decode(), repr(raw)[2:-1]]


@dataclasses.dataclass
class Recorder:
    """A stand-in runner: records argv and stdin, answers (returncode, stdout, stderr) from
    a table keyed by the argv's verb (argv[1], or "token import" etc.)."""

    answers: dict[str, tuple[int, str, str]] = dataclasses.field(default_factory=dict)
    calls: list[tuple[tuple[str, ...], bytes | None]] = dataclasses.field(default_factory=list)

    def __call__(
        self, argv: Sequence[str], *, stdin: luks.Stdin | None = None, check: bool = True
    ) -> luks.Completed:
        command = tuple(argv)
        self.calls.append((command, None if stdin is None else bytes(stdin)))
        verb = " ".join(command[1:3]) if command[1] == "token" else command[1]
        code, out, err = self.answers.get(verb, (0, "", ""))
        if check and code != 0:
            raise luks.CryptsetupFailed(command[-1], command, code, err)
        return luks.Completed(command, code, out, err)

    def argvs(self) -> list[tuple[str, ...]]:
        return [argv for argv, _ in self.calls]


# --- command lines -----------------------------------------------------------------------


def test_command_lines_are_exact() -> None:
    dev = Path("/dev/disk/by-id/scsi-0DO_Volume_data")
    assert luks.format_argv(dev) == (
        "cryptsetup",
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--pbkdf",
        "pbkdf2",
        "--hash",
        "sha256",
        "--pbkdf-force-iterations",
        "1000",
        "--key-slot",
        "0",
        "--key-file=-",
        str(dev),
    )
    assert luks.open_argv(dev, "data") == (
        "cryptsetup",
        "open",
        "--type",
        "luks2",
        "--key-file=-",
        "--key-slot",
        "0",
        str(dev),
        "data",
    )
    assert luks.open_argv(dev, "data", discard=True, readonly=True) == (
        "cryptsetup",
        "open",
        "--type",
        "luks2",
        "--key-file=-",
        "--key-slot",
        "0",
        "--allow-discards",
        "--readonly",
        str(dev),
        "data",
    )
    assert luks.check_key_argv(dev) == (
        "cryptsetup",
        "open",
        "--type",
        "luks2",
        "--test-passphrase",
        "--key-file=-",
        "--key-slot",
        "0",
        str(dev),
    )
    assert luks.close_argv("data") == ("cryptsetup", "close", "data")
    assert luks.status_argv("data") == ("cryptsetup", "status", "data")
    assert luks.erase_argv(dev) == ("cryptsetup", "erase", "--batch-mode", str(dev))
    assert luks.dump_argv(dev) == ("cryptsetup", "luksDump", "--dump-json-metadata", str(dev))
    assert luks.is_luks_argv(dev) == ("cryptsetup", "isLuks", "--type", "luks2", str(dev))
    assert luks.token_import_argv(dev) == (
        "cryptsetup",
        "token",
        "import",
        "--json-file=-",
        "--token-id",
        "0",
        "--key-slot",
        "0",
        str(dev),
    )
    assert luks.token_import_argv(dev, 3, replace=True) == (
        "cryptsetup",
        "token",
        "import",
        "--json-file=-",
        "--token-id",
        "3",
        "--token-replace",
        "--key-slot",
        "0",
        str(dev),
    )
    assert luks.token_export_argv(dev) == (
        "cryptsetup",
        "token",
        "export",
        "--token-id",
        "0",
        str(dev),
    )
    assert luks.token_remove_argv(dev, 2) == (
        "cryptsetup",
        "token",
        "remove",
        "--token-id",
        "2",
        str(dev),
    )
    assert luks.blkid_argv(dev) == ("blkid", "-p", "-o", "export", str(dev))


def test_mapper_names_are_checked() -> None:
    for bad in ("", "../x", "a/b", "-rf", "a b", "x" * 200):
        with pytest.raises(ValueError):
            luks.open_argv(Path("/dev/vdb"), bad)


# --- the token format --------------------------------------------------------------------


def test_token_json_round_trips_and_is_what_luks2_needs() -> None:
    data = json.loads(TOKEN.to_json())
    assert data == {
        "type": "bootsecrets-transit",
        "keyslots": ["0"],
        "schema": 1,
        "transit_mount": "transit",
        "key_name": "droplet-web-1",
        "key_version": 1,
        "ciphertext": CIPHERTEXT,
    }
    assert luks.TransitToken.from_json(data, "/dev/vdb") == TOKEN


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "luks2-keyring"}, "type"),
        ({"schema": 2}, "schema"),
        ({"schema": True}, "schema"),
        ({"keyslots": []}, "keyslots"),
        ({"keyslots": [0]}, "keyslots"),
        ({"key_version": 2}, "key_version"),  # does not match the ciphertext's vault:v1:
        ({"key_version": True}, "key_version"),
        ({"key_version": "1"}, "key_version"),
        ({"ciphertext": "vault:v1:"}, "ciphertext"),
        ({"ciphertext": "plain text"}, "ciphertext"),
        ({"ciphertext": 12}, "ciphertext"),
        ({"key_name": "../keys/x"}, "key_name"),
        ({"transit_mount": "/transit"}, "transit_mount"),
        ({"transit_mount": "a/../b"}, "transit_mount"),
        ({"extra": "x"}, "extra"),
    ],
)
def test_tampered_tokens_are_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    data = {**json.loads(TOKEN.to_json()), **change}
    with pytest.raises(luks.TokenInvalid) as raised:
        luks.TransitToken.from_json(data, "/dev/vdb")
    assert raised.value.field == field
    assert "/dev/vdb" in str(raised.value)
    assert CIPHERTEXT[9:] not in str(raised.value)


def test_a_missing_field_is_named() -> None:
    data = json.loads(TOKEN.to_json())
    del data["ciphertext"]
    with pytest.raises(luks.TokenInvalid) as raised:
        luks.TransitToken.from_json(data, "/dev/vdb")
    assert raised.value.field == "ciphertext"


def test_parse_dump_of_a_header() -> None:
    other = {"type": "systemd-tpm2", "keyslots": ["1"]}
    dump = {
        "keyslots": {"0": {}, "1": {}},
        "tokens": {"0": other, "4": json.loads(TOKEN.to_json())},
        "segments": {},
        "digests": {},
        "config": {},
    }
    header = luks.parse_dump(json.dumps(dump), "/dev/vdb")
    assert header == luks.LuksHeader((0, 1), {0: "systemd-tpm2", 4: luks.TOKEN_TYPE}, 4, TOKEN)
    dump["tokens"]["5"] = json.loads(TOKEN.to_json())
    with pytest.raises(luks.TokenInvalid, match="2 bootsecrets-transit tokens"):
        luks.parse_dump(json.dumps(dump), "/dev/vdb")
    for broken in ("not json", "[]", '{"keyslots": {}}', '{"keyslots": {"x": {}}, "tokens": {}}'):
        with pytest.raises(luks.TokenInvalid):
            luks.parse_dump(broken, "/dev/vdb")


# --- flows that need device-mapper, against the recorder ----------------------------------


def test_open_puts_the_key_on_stdin_and_maps_a_rejected_key() -> None:
    key = new_key()
    recorder = Recorder()
    assert luks.open_volume(Path("/dev/vdb"), "data", key, runner=recorder) == Path(
        "/dev/mapper/data"
    )
    assert recorder.calls == [(luks.open_argv(Path("/dev/vdb"), "data"), bytes(key))]

    rejected = Recorder({"open": (2, "", "No key available with this passphrase.\n")})
    with pytest.raises(luks.KeyRejected) as raised:
        luks.open_volume(Path("/dev/vdb"), "data", key, runner=rejected)
    busy = Recorder({"open": (5, "", "Device data already exists.\n")})
    with pytest.raises(luks.CryptsetupFailed) as failed:
        luks.open_volume(Path("/dev/vdb"), "data", memoryview(key), runner=busy)
    assert "Device data already exists." in str(failed.value)
    assert "cryptsetup open --type luks2 --key-file=-" in str(failed.value)
    for text in (str(raised.value), str(failed.value), repr(failed.value.args)):
        for form in key_texts(key):
            assert form not in text
    for argv, _ in recorder.calls + rejected.calls + busy.calls:
        assert not any(form in " ".join(argv) for form in key_texts(key))


def test_status_and_close_are_idempotent() -> None:
    inactive = Recorder({"status": (4, "", "/dev/mapper/data is inactive.\n")})
    assert not luks.is_open("data", inactive)
    assert luks.close_volume("data", inactive) is False
    assert inactive.argvs() == [luks.status_argv("data"), luks.status_argv("data")]
    active = Recorder()
    assert luks.close_volume("data", active) is True
    assert active.argvs() == [luks.status_argv("data"), luks.close_argv("data")]
    broken = Recorder({"status": (1, "", "Cannot initialize device-mapper.\n")})
    with pytest.raises(luks.CryptsetupFailed, match="device-mapper"):
        luks.is_open("data", broken)


def test_keys_of_the_wrong_size_never_reach_cryptsetup() -> None:
    recorder = Recorder()
    for size in (0, 32, 63, 65):
        with pytest.raises(ValueError, match="64 contiguous bytes"):
            luks.open_volume(Path("/dev/vdb"), "data", bytearray(size), runner=recorder)
    assert recorder.calls == []


# --- the runner ----------------------------------------------------------------------------


def test_run_feeds_stdin_exactly_and_closes_it_otherwise() -> None:
    key = bytearray(b"\n\x00\r\n" + secrets.token_bytes(60))
    counted = luks.run(["wc", "-c"], stdin=memoryview(key))
    assert counted.stdout.split() == ["64"]
    echoed = luks.run(["od", "-An", "-v", "-tx1"], stdin=key)
    assert bytes.fromhex(echoed.stdout.replace("\n", " ")) == bytes(key)
    assert luks.run(["cat"]).stdout == ""  # stdin closed: cat ends at once
    with pytest.raises(luks.CryptsetupFailed, match="exited with 3"):
        luks.run(["sh", "-c", "exit 3"])
    assert luks.run(["sh", "-c", "exit 3"], check=False).returncode == 3


# --- the blank check, with the real libblkid ------------------------------------------------


def test_a_zeroed_image_is_blank(tmp_path: Path) -> None:
    image = zero_image(tmp_path)
    found = luks.require_blank(image)
    assert found == luks.Blankness(32 << 20, (), True) and found.blank


@pytest.mark.parametrize(
    ("make", "signature"),
    [
        (["mkfs.ext4", "-q", "-F"], "ext4"),
        (["mkfs.ext2", "-q", "-F"], "ext2"),
        (["mkswap", "-q"], "swap"),
    ],
)
def test_images_with_a_filesystem_are_not_blank(
    tmp_path: Path,
    make: list[str],
    signature: str,
) -> None:
    image = zero_image(tmp_path)
    sh([*make, str(image)])
    before = image.read_bytes()
    with pytest.raises(luks.NotBlank) as raised:
        luks.format_volume(image, new_key(), TOKEN)
    assert raised.value.signatures == (signature,)
    assert str(image) in str(raised.value) and signature in str(raised.value)
    assert image.read_bytes() == before  # untouched


def test_a_partition_table_is_not_blank(tmp_path: Path) -> None:
    image = zero_image(tmp_path)
    subprocess.run(["sfdisk", "-q", str(image)], input=b"label: gpt\n", check=True)
    assert luks.probe(image).signatures == ("gpt",)


def test_data_without_a_signature_in_the_first_mib_is_not_blank(tmp_path: Path) -> None:
    image = zero_image(tmp_path)
    with image.open("r+b") as handle:
        handle.seek(700 << 10)
        handle.write(b"some bytes that no prober recognises")
    found = luks.probe(image)
    assert found.signatures == () and not found.first_mib_zero and not found.blank
    with pytest.raises(luks.NotBlank, match="non-zero bytes in the first MiB"):
        luks.require_blank(image)


def test_missing_and_odd_devices(tmp_path: Path) -> None:
    with pytest.raises(luks.DeviceMissing, match="not attached"):
        luks.probe(tmp_path / "scsi-0DO_Volume_absent")
    with pytest.raises(luks.DeviceMissing, match="not a block device"):
        luks.probe(tmp_path)
    with pytest.raises(luks.DeviceMissing, match="not attached"):
        luks.read_header(tmp_path / "absent")
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(bytes(4096))
    assert not luks.probe(tiny).blank  # a first MiB that is not there is not zeros


def test_block_devices_are_probed_too(tmp_path: Path) -> None:
    require_root()
    blank, ext4 = zero_image(tmp_path, "blank.img"), zero_image(tmp_path, "ext4.img")
    sh(["mkfs.ext4", "-q", "-F", str(ext4)])
    with loop_device(blank) as device:
        assert luks.probe(device).blank
    with loop_device(ext4) as device:
        assert luks.probe(device).signatures == ("ext4",)


# --- LUKS2 headers for real (no device-mapper needed) ---------------------------------------


def test_format_writes_a_header_with_the_token_and_never_the_key(tmp_path: Path) -> None:
    image = zero_image(tmp_path)
    key = bytearray(b"\n\x00" + secrets.token_bytes(62))  # stdin is binary-safe
    header = luks.format_volume(image, key, TOKEN)
    assert header == luks.LuksHeader((0,), {0: luks.TOKEN_TYPE}, 0, TOKEN)
    assert luks.read_token(image) == TOKEN
    assert luks.check_key(image, key)
    wrong = bytearray(key)
    wrong[-1] ^= 1
    assert not luks.check_key(image, wrong)
    dump = json.loads(sh(["cryptsetup", "luksDump", "--dump-json-metadata", str(image)]))
    assert dump["keyslots"]["0"]["kdf"] == {
        **dump["keyslots"]["0"]["kdf"],
        "type": "pbkdf2",
        "iterations": 1000,
    }
    assert dump["keyslots"]["0"]["key_size"] == 64
    assert dump["segments"]["0"]["encryption"] == "aes-xts-plain64"
    raw = image.read_bytes()
    assert raw.count(bytes(key)) == 0 and raw.count(bytes(key)[8:40]) == 0
    assert raw.count(CIPHERTEXT.encode()) >= 1  # the ciphertext is meant to be there

    before = image.read_bytes()
    with pytest.raises(luks.NotBlank, match="crypto_LUKS"):  # never formatted twice
        luks.format_volume(image, new_key(), TOKEN)
    assert image.read_bytes() == before


def test_format_on_a_loop_block_device(tmp_path: Path) -> None:
    require_root()
    key = new_key()
    with loop_device(zero_image(tmp_path)) as device:
        luks.format_volume(device, key, TOKEN)
        assert luks.read_token(device) == TOKEN
        assert luks.check_key(device, key)
        assert luks.probe(device).signatures == ("crypto_LUKS",)


def test_the_token_is_replaced_after_a_rewrap(tmp_path: Path) -> None:
    image = zero_image(tmp_path)
    luks.format_volume(image, new_key(), TOKEN)
    rewrapped = dataclasses.replace(
        TOKEN, key_version=3, ciphertext="vault:v3:" + base64.b64encode(b"r" * 92).decode()
    )
    luks.update_token(image, rewrapped)
    header = luks.read_header(image)
    assert header.token == rewrapped and header.tokens == {0: luks.TOKEN_TYPE}


def test_a_tampered_token_in_a_real_header_is_refused(tmp_path: Path) -> None:
    image = zero_image(tmp_path)
    luks.format_volume(image, new_key(), TOKEN)
    tampered = {**json.loads(TOKEN.to_json()), "key_version": 7}
    subprocess.run(
        [
            "cryptsetup",
            "token",
            "import",
            "--json-file=-",
            "--token-id",
            "0",
            "--token-replace",
            str(image),
        ],
        input=json.dumps(tampered).encode(),
        check=True,
    )
    with pytest.raises(luks.TokenInvalid) as raised:
        luks.read_token(image)
    assert raised.value.field == "key_version"


def test_a_header_without_our_token(tmp_path: Path) -> None:
    image = zero_image(tmp_path)
    subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file=-",
            str(image),
        ],
        input=bytes(new_key()),
        check=True,
    )
    with pytest.raises(luks.TokenMissing):
        luks.read_token(image)
    with pytest.raises(luks.NotLuks):
        luks.read_token(zero_image(tmp_path, "plain.img"))


def test_erase_leaves_no_keyslot_and_no_token(tmp_path: Path) -> None:
    image = zero_image(tmp_path)
    key = new_key()
    luks.format_volume(image, key, TOKEN)
    erased = luks.erase(image)
    assert erased == luks.Erasure(was_luks=True, tokens_removed=(0,), keyslots_erased=(0,))
    header = luks.read_header(image)
    assert header.keyslots == () and header.tokens == {} and header.token is None
    assert not luks.check_key(image, key)
    assert image.read_bytes().count(CIPHERTEXT.encode()) == 0
    assert luks.erase(image) == luks.Erasure(True, (), ())  # idempotent
    assert luks.erase(zero_image(tmp_path, "plain.img")) == luks.Erasure(False, (), ())


# --- with a real Transit engine --------------------------------------------------------------


@pytest.fixture
def transit(openbao: OpenBao, unique: str) -> Iterator[tuple[Any, str, str]]:
    """A Transit mount with one key; hvac's Transit API is untyped, hence Any."""
    mount = f"transit-{unique}"
    sys_api: Any = openbao.client.sys
    api: Any = openbao.client.secrets.transit
    sys_api.enable_secrets_engine("transit", path=mount)
    api.create_key(name="volume", mount_point=mount)
    try:
        yield api, mount, "volume"
    finally:
        sys_api.disable_secrets_engine(path=mount)


def test_a_transit_data_key_unlocks_the_volume_from_its_own_header(
    tmp_path: Path,
    transit: tuple[Any, str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bootsecrets")
    api, mount, name = transit
    answer = api.generate_data_key(name=name, key_type="plaintext", bits=512, mount_point=mount)[
        "data"
    ]
    key = bytearray(base64.b64decode(answer["plaintext"]))
    assert answer["ciphertext"].startswith("vault:v1:")
    token = luks.TransitToken(mount, name, 1, answer["ciphertext"])
    image = zero_image(tmp_path)
    luks.format_volume(image, key, token)

    # At the next boot: the header says what to ask Transit, and the answer opens keyslot 0.
    found = luks.read_token(image)
    assert found == token
    plaintext = api.decrypt_data(
        name=found.key_name, ciphertext=found.ciphertext, mount_point=found.mount
    )
    assert luks.check_key(image, bytearray(base64.b64decode(plaintext["data"]["plaintext"])))

    # Rotation: rewrap moves the token to the new key version; it still unlocks.
    api.rotate_key(name=name, mount_point=mount)
    rewrapped = api.rewrap_data(name=name, ciphertext=found.ciphertext, mount_point=mount)["data"][
        "ciphertext"
    ]
    luks.update_token(image, dataclasses.replace(found, key_version=2, ciphertext=rewrapped))
    again = luks.read_token(image)
    assert again.key_version == 2 and again.ciphertext.startswith("vault:v2:")
    plaintext = api.decrypt_data(name=name, ciphertext=again.ciphertext, mount_point=mount)
    assert luks.check_key(image, bytearray(base64.b64decode(plaintext["data"]["plaintext"])))

    # Crypto-shred: with the Transit key deleted, the token in the header is worthless.
    api.update_key_configuration(name=name, deletion_allowed=True, mount_point=mount)
    api.delete_key(name=name, mount_point=mount)
    with pytest.raises(VaultError):
        api.decrypt_data(name=name, ciphertext=again.ciphertext, mount_point=mount)

    texts = [r.getMessage() for r in caplog.records] + [repr(r.__dict__) for r in caplog.records]
    assert any("LUKS2 header written" in text for text in texts)
    assert not any(form in text for text in texts for form in key_texts(key))
    assert answer["plaintext"] not in " ".join(texts)
