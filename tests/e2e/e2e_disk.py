"""Scan a powered-off guest's raw disk for secret material.

Raw bytes, whole device: file contents, deleted blocks, the journal, the ext4 journal, slack.
Plain values are searched as UTF-8 byte strings. The AppRole secret-id and the agent's Vault
token are never known to the test in clear (the secret-id exists only inside the wrapped
response the guest unwraps), so for those the scan takes every string of the right *shape*
on the disk and asks OpenBao's audit device whether it is the one: OpenBao's file audit log
records `hmac-sha256:<hex>` of the secret-id (unwrap response, AppRole login request) and of
the client token (login response), and `sys/audit-hash/<device>` computes the same HMAC for a
candidate. A match means the real secret-id/token is on the disk. Known limitation: data
stored compressed (journal entries > 512 bytes, compressed by journald) is invisible to a
raw scan; values and tokens are far below that size.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

UUID = rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# OpenBao/Vault service and batch tokens: s./b. (legacy) and hvs./hvb. shapes.
TOKEN = rb"(hv)?[sb]\.[A-Za-z0-9]{20,}"


CHUNK = 64 * 1024 * 1024


def data_chunks(disk: Path, overlap: int = 0) -> Iterator[bytes]:
    """The disk's allocated bytes (holes of a sparse image skipped: they are zeros), in
    chunks that overlap by `overlap` bytes so no needle is split at a chunk edge."""
    with disk.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            while start < end:
                f.seek(max(start - overlap, 0))
                yield f.read(min(CHUNK, end - start) + overlap)
                start += CHUNK
            pos = end


def find_values(disk: Path, values: Iterable[str]) -> dict[str, int]:
    """{value: number of chunks it occurs in} for each value found anywhere on the disk."""
    needles = {value: value.encode("utf-8") for value in values}
    longest = max((len(n) for n in needles.values()), default=0)
    hits: dict[str, int] = {}
    for chunk in data_chunks(disk, overlap=longest):
        for value, needle in needles.items():
            if needle in chunk:
                hits[value] = hits.get(value, 0) + 1
    return hits


def shaped_strings(disk: Path, pattern: bytes) -> set[str]:
    """Every distinct string on the disk's allocated bytes matching `pattern` (grep -E)."""
    grep = subprocess.Popen(
        ["grep", "-a", "-o", "-E", pattern.decode()], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert grep.stdin is not None and grep.stdout is not None
    found: list[bytes] = []
    stdout = grep.stdout
    reader = threading.Thread(target=lambda: found.append(stdout.read()))
    reader.start()
    try:
        for chunk in data_chunks(disk):
            grep.stdin.write(chunk)
    finally:
        grep.stdin.close()
        reader.join()
        stdout.close()
        code = grep.wait()
    if code not in (0, 1):
        raise RuntimeError(f"grep failed with {code}")
    return {m.decode("ascii") for m in b"".join(found).split()}


def audited_hmacs(audit_log: Path, role_mount: str = "approle") -> dict[str, set[str]]:
    """HMACs (as logged) of every secret-id and client token the audit log has seen."""
    found: dict[str, set[str]] = {"secret_id": set(), "client_token": set(), "role_id": set()}
    for line in audit_log.read_text().splitlines():
        if not line.strip():
            continue
        entry: dict[str, Any] = json.loads(line)
        request = entry.get("request") or {}
        response = entry.get("response") or {}
        path = request.get("path", "")
        if path == f"auth/{role_mount}/login":
            data = request.get("data") or {}
            if data.get("secret_id"):
                found["secret_id"].add(data["secret_id"])
            if data.get("role_id"):
                found["role_id"].add(data["role_id"])
            token = (response.get("auth") or {}).get("client_token")
            if token:
                found["client_token"].add(token)
        if path == "sys/wrapping/unwrap":
            sid = (response.get("data") or {}).get("secret_id")
            if sid:
                found["secret_id"].add(sid)
    return found


def audit_hash(client: Any, device: str, value: str) -> str:
    response = client.adapter.post(f"/v1/sys/audit-hash/{device}", json={"input": value})
    return str(response["data"]["hash"])


def free_ranges(raw: Path) -> list[tuple[int, int]]:
    """The ext4 filesystem's free blocks (first, last), as dumpe2fs reads its bitmaps."""
    out = subprocess.run(["dumpe2fs", str(raw)], capture_output=True, text=True, check=True).stdout
    ranges = []
    for listed in re.findall(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in listed.split(","))):
            first, _, last = part.partition("-")
            ranges.append((int(first), int(last or first)))
    return ranges


def nonzero_free_blocks(raw: Path, block: int = 4096) -> int:
    """How many free blocks of the raw ext4 disk hold anything but zeros (holes skipped)."""
    found = 0
    with raw.open("rb") as f:
        fd = f.fileno()
        for first, last in free_ranges(raw):
            pos, end = first * block, (last + 1) * block
            while pos < end:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as err:
                    if err.errno == errno.ENXIO:
                        break
                    raise
                if data >= end:
                    break
                stop = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                start = data - data % block
                f.seek(start)
                for _ in range(start, stop, block):
                    if f.read(block).strip(b"\0"):
                        found += 1
                pos = stop
    return found
