"""The Transit data-key client against the real OpenBao, with a token holding exactly the
droplet's policy (`update` on datakey/plaintext, decrypt and rewrap of one key), and its key
decoding and zeroing."""

from __future__ import annotations

import base64
import secrets

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from bootsecrets import transit
from bootsecrets.errors import DataKeyRejected, DataLocked, TransitKeyMissing, VaultError
from bootsecrets.vault import Vault
from bootsecrets.vaultanswers import TokenInfo
from bootsecrets.vaultconfig import VaultSettings
from support.openbao import CANARIES, OpenBao
from support.transit import create_key, delete_key, droplet_policy, rotate

KEY = transit.TransitKey("transit", "unused")


@given(st.binary(min_size=64, max_size=64))
def test_the_key_is_decoded_as_base64_decodes_it(raw: bytes) -> None:
    assert transit._decode_key(base64.b64encode(raw).decode(), KEY) == bytearray(raw)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A" * 88,
        "=" * 88,
        base64.b64encode(b"x" * 32).decode(),
        base64.b64encode(b"x" * 64).decode()[:-3] + "!==",
        None,
        64,
    ],
)
def test_anything_but_a_512_bit_key_is_refused_without_echoing_it(text: object) -> None:
    with pytest.raises(VaultError) as raised:
        transit._decode_key(text, KEY)
    assert "answered" in str(raised.value)
    if isinstance(text, str) and text:
        assert text not in str(raised.value)


def test_zero_overwrites_in_place() -> None:
    key = bytearray(secrets.token_bytes(64))
    view = memoryview(key)
    transit.zero(key)
    assert bytes(view) == bytes(64) and len(key) == 64


@pytest.fixture
def droplet(openbao: OpenBao, unique: str) -> tuple[Vault, transit.TransitKey]:
    name = f"key-{unique}"
    create_key(openbao, name)
    openbao.client.sys.create_or_update_policy(
        name=f"droplet-{unique}", policy=droplet_policy(name)
    )
    token = openbao.client.auth.token.create(
        policies=[f"droplet-{unique}"], ttl="10m", no_default_policy=True
    )["auth"]["client_token"]
    CANARIES.add(token)
    vault = Vault(VaultSettings(addresses=(openbao.addr,), boot_deadline=5))
    vault.token = TokenInfo(token, "", 600, False)  # no default policy: not even lookup-self
    return vault, transit.TransitKey("transit", name)


def test_the_droplet_policy_is_enough_and_no_more(
    openbao: OpenBao, droplet: tuple[Vault, transit.TransitKey]
) -> None:
    vault, key = droplet
    with vault:
        plaintext, wrapped = transit.generate(vault, key, "test data")
        CANARIES.add(base64.b64encode(bytes(plaintext)).decode())
        assert len(plaintext) == 64 and wrapped.key_version == 1
        again = transit.decrypt(vault, key, wrapped.ciphertext, "test data")
        assert again == plaintext
        rotate(openbao, key.name)
        rewrapped = transit.rewrap(vault, key, wrapped.ciphertext, "test data")
        assert rewrapped.key_version == 2 and rewrapped.ciphertext.startswith("vault:v2:")
        assert transit.decrypt(vault, key, rewrapped.ciphertext, "test data") == plaintext
        transit.zero(plaintext)
        transit.zero(again)
        # The policy allows nothing else: not reading the key (its latest version), not
        # encrypting, not another key.
        token = vault.token.token if vault.token else ""
        for path in (f"transit/keys/{key.name}", f"transit/encrypt/{key.name}"):
            response = requests.post(
                f"{openbao.addr}/v1/{path}", timeout=10, headers={"X-Vault-Token": token}, json={}
            )
            assert response.status_code == 403, path
        with pytest.raises(DataLocked, match="permission denied on transit/decrypt/other"):
            transit.decrypt(
                vault, transit.TransitKey("transit", "other"), wrapped.ciphertext, "test data"
            )


def test_refusals_map_to_their_outcomes(
    openbao: OpenBao, droplet: tuple[Vault, transit.TransitKey]
) -> None:
    vault, key = droplet
    with vault:
        plaintext, wrapped = transit.generate(vault, key, "test data")
        CANARIES.add(base64.b64encode(bytes(plaintext)).decode())
        transit.zero(plaintext)
        head, _, body = wrapped.ciphertext.rpartition(":")
        altered = f"{head}:{body[:5]}{'B' if body[5] == 'A' else 'A'}{body[6:]}"
        with pytest.raises(DataKeyRejected, match="message authentication failed"):
            transit.decrypt(vault, key, altered, "test data")
        delete_key(openbao, key.name)
        with pytest.raises(TransitKeyMissing, match="does not exist"):
            transit.decrypt(vault, key, wrapped.ciphertext, "test data")
        with pytest.raises(TransitKeyMissing):
            transit.rewrap(vault, key, wrapped.ciphertext, "test data")
