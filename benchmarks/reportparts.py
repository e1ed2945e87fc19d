"""The report's sections for the leases part (issue 15) and the unlock part (issue 13), as
Markdown, each with the checks that decide its lines in the targets table."""

from __future__ import annotations

import statistics

from leasejob import CERT_TTL, DB_MAX_TTL, DB_TTL
from leases import HourResult, LeaseResults
from scenarios import Run
from unlock import Cell, UnlockResults, median_arrivals

#: The hour's request kinds, in the report's order, and how each is labelled.
HOUR_ROWS = (
    ("renew", "renew (`sys/leases/renew`)"),
    ("issue (database)", "re-issue: database credentials"),
    ("issue (certificate)", "re-issue: certificate"),
    ("revoke", "revoke (`sys/leases/revoke`)"),
    ("lookup-self", "read: token look-up (`auth/token/lookup-self`)"),
    ("renew-self", "token renewal (`auth/token/renew-self`)"),
    ("mount look-up", "read: mount look-up"),
)
#: One letter per lease call in the per-refresh line.
LETTERS = {"renew": "R", "issue (database)": "D", "issue (certificate)": "C", "revoke": "V"}


def ms(x: float) -> str:
    return f"{x * 1000:.0f}"


def _spread(runs: list[Run]) -> str:
    walls = [r.wall for r in runs]
    return f"{ms(statistics.median(walls))} ({ms(min(walls))}-{ms(max(walls))})"


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


def leases_section(res: LeaseResults | None) -> list[str]:
    if res is None:
        return []
    t = res.ttls
    lines = [
        "### Leased secrets (issue 15): one database credential, one certificate",
        "",
        f"OpenBao's database engine on PostgreSQL {res.postgres} (127.0.0.1) and its PKI "
        "engine with a root CA made for the run; app.service gets the credentials in its "
        "environment, web.service the certificate and key (ours: `LoadCredential=` files; "
        "bao agent: one file through `pkiCert`). Short TTLs stand for long ones: "
        f"**1 simulated hour = {res.hour:.0f} s**, database `default_ttl` {DB_TTL} min = "
        f"{t['database default_ttl']} s, `max_ttl` {DB_MAX_TTL} min = "
        f"{t['database max_ttl']} s, certificate `ttl` {CERT_TTL} min = "
        f"{t['certificate ttl']} s. Ours: the default fraction 2/3, `floor` 1 s, `margin` "
        "2 s, the role's `max_ttl` in the config; bao agent: its defaults.",
        "",
    ]
    lines += _lease_bootstrap(res.bootstrap)
    lines += _lease_hour(res)
    return lines


def _lease_bootstrap(boot: dict[str, list[Run]]) -> list[str]:
    ours, bao = boot.get("ours") or [], boot.get("bao") or []
    if not ours or not bao:
        return []

    def rss(runs: list[Run]) -> str:
        return f"{statistics.median(r.maxrss_kb for r in runs) / 1024:.1f}"

    def cpu(runs: list[Run]) -> str:
        return ms(statistics.median(r.cpu for r in runs))

    def req(runs: list[Run]) -> str:
        counts = "/".join(map(str, sorted({r.requests for r in runs})))
        return f"{counts} ({_kinds(runs[-1].kinds)})"

    return [
        f"Bootstrap ({len(ours)} runs of each, alternating; bao agent with `exit_after_auth`):",
        "",
        "| | ours | bao agent |",
        "|---|---|---|",
        f"| wall ms, median (min-max) | {_spread(ours)} | {_spread(bao)} |",
        f"| CPU ms | {cpu(ours)} | {cpu(bao)} |",
        f"| peak RSS MiB | {rss(ours)} | {rss(bao)} |",
        f"| requests | {req(ours)} | {req(bao)} |",
        "",
    ]


def _lease_hour(res: LeaseResults) -> list[str]:
    ours, bao = res.hours.get("ours"), res.hours.get("bao")
    if ours is None or bao is None:
        return []
    lines = [
        "The simulated hour, both agents at once (their requests told apart by their "
        "tokens' AppRole role), requests after each one's bootstrap:",
        "",
        "| requests in the hour | ours | bao agent |",
        "|---|---|---|",
    ]
    known = {k for k, _ in HOUR_ROWS}
    for kind, label in HOUR_ROWS:
        if ours.kinds.get(kind) or bao.kinds.get(kind) or kind in LETTERS:
            lines.append(f"| {label} | {ours.kinds.get(kind, 0)} | {bao.kinds.get(kind, 0)} |")
    other = {k: v for h in (ours, bao) for k, v in h.kinds.items() if k not in known}
    if other:
        lines.append(f"| other | {_kinds(other)} | |")
    wall = statistics.median(ours.walls) if ours.walls else 0.0
    lines += [
        f"| **all** | **{sum(ours.kinds.values())}** | **{sum(bao.kinds.values())}** |",
        f"| lease calls (renew, re-issue, revoke) | {ours.lease_calls} | {bao.lease_calls} |",
        f"| runs | {ours.runs} refreshes at its wake-ups (median {ms(wall)} ms) | one "
        "daemon, the whole hour |",
        f"| CPU s over the hour, bootstrap included | {ours.cpu:.2f} | {bao.cpu:.2f} |",
        f"| peak RSS MiB | {ours.maxrss_kb / 1024:.1f}, only while a run lasts | "
        f"{bao.maxrss_kb / 1024:.1f}, resident the whole hour |",
        f"| units restarted | {_kinds(ours.restarts) or 'none'} | none (it renders files; "
        "restarts are left to a template `command`) |",
        "",
        "Our lease calls per refresh, in order (R renew, D database re-issue, C certificate "
        "re-issue, V revoke): " + ", ".join(_letters(k) for k in ours.per_run) + ".",
        "",
        f"A refresh with nothing due, right after the bootstrap: {ms(ours.noop_wall)} ms, "
        f"requests: {_kinds(ours.noop_kinds) or 'none'}; lease calls: {_noop_calls(ours)}.",
        "",
    ]
    return lines


def _letters(kinds: dict[str, int]) -> str:
    return "".join(letter * kinds.get(kind, 0) for kind, letter in LETTERS.items()) or "-"


def _noop_calls(ours: HourResult) -> int:
    return sum(ours.noop_kinds.get(k, 0) for k in LETTERS)


def leases_targets(res: LeaseResults | None) -> list[str]:
    if res is None:
        return []
    lines = []
    ours, bao = res.bootstrap.get("ours") or [], res.bootstrap.get("bao") or []
    if ours and bao:
        o, b = max(r.requests for r in ours), min(r.requests for r in bao)
        lines.append(
            "| leases bootstrap: lookup + unwrap + login + one issue per leased secret (5), "
            f"never more than bao | {_verdict(o <= min(5, b), f'{o} vs bao {b}')} |"
        )
    hour = res.hours.get("ours")
    if hour is not None:
        calls = _noop_calls(hour)
        lines.append(
            f"| a refresh with nothing due makes no lease call | "
            f"{_verdict(calls == 0, f'{calls} lease calls')} |"
        )
    return lines


# --- unlock --------------------------------------------------------------------------------


def unlock_section(res: UnlockResults | None) -> list[str]:
    if res is None or not res.cells:
        return []
    lines = [
        "### Encrypted directories (issue 13): what unlocking adds to a bootstrap",
        "",
        "The 5 x 20 job without encrypted directories and with 1 or 4 (each needed by one "
        "unit) on an ext4 with `encrypt` on a loop device; first use (one "
        "`transit/datakey/plaintext` per directory, then the directory created, its policy "
        "set, the key added) and a second boot after the filesystem was mounted again "
        "(one `transit/decrypt` each), every run a fresh bootstrap with its own wrapped "
        "secret-id, in rounds (none, 1 and 4 first use, remount, 1 and 4 second boot). "
        "Arrivals: when the server logged the reads and the Transit requests, ms after "
        "the login (medians). `bao agent` has nothing like it (it renders files, it does "
        "not unlock directories): no column for it.",
        "",
        "| link | bootstrap | wall ms, median (min-max) | added, ms | requests "
        "| reads arrive | Transit requests arrive |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in res.cells:
        if not cell.runs:
            continue
        added = _added(res, cell)
        a = median_arrivals(cell)
        transit = f"+{a[2]:.0f} .. +{a[3]:.0f}" if cell.dirs else ""
        reqs = "/".join(map(str, sorted({r.requests for r in cell.runs})))
        lines.append(
            f"| {cell.link} | {cell.title} | {_spread(cell.runs)} "
            f"| {'' if added is None else f'{added * 1000:+.0f}'} | {reqs} "
            f"| +{a[0]:.0f} .. +{a[1]:.0f} | {transit} |"
        )
    return [*lines, ""]


def _added(res: UnlockResults, cell: Cell) -> float | None:
    """The median, over the rounds, of the cell's wall less the same round's bootstraps
    without directories (paired: run within seconds of each other; two a round, one before
    and one after the remount: their mean)."""
    base = next((c for c in res.cells if c.link == cell.link and not c.dirs), None)
    if not cell.dirs or base is None or len(base.runs) != 2 * len(cell.runs):
        return None
    rounds = [(a.wall + b.wall) / 2 for a, b in zip(base.runs[::2], base.runs[1::2], strict=True)]
    return statistics.median(r.wall - b for r, b in zip(cell.runs, rounds, strict=True))


#: ms: how much later than the last read the last Transit request may arrive and still
#: count as overlapped (local work between requests, scheduling on a busy machine).
LATE = 10.0


def overlap(cell: Cell) -> float:
    """ms by which the last Transit request arrived after the last read (<= 0: within)."""
    a = median_arrivals(cell)
    return a[3] - a[1]


def unlock_targets(res: UnlockResults | None) -> list[str]:
    if res is None or not res.cells:
        return []
    cells = [c for c in res.cells if c.dirs and c.runs]
    wrong = [
        f"{c.link} {c.title}"
        for c in cells
        if any(
            sum(v for k, v in r.kinds.items() if k.startswith("transit")) != c.dirs for r in c.runs
        )
    ]
    detail = "1 and 4 for 1 and 4 directories, every run" if not wrong else ", ".join(wrong)
    lines = [f"| unlock: one Transit request per directory | {_verdict(not wrong, detail)} |"]
    parts = []
    ok = True
    for c in cells:
        late = overlap(c)
        within = late <= LATE
        ok = ok and within
        parts.append(
            f"{c.link} {c.title}: " + ("within" if within else f"last {late:.0f} ms after")
        )
    lines.append(
        f"| unlock within the reads (the last Transit request at most {LATE:.0f} ms after "
        f"the last read) | {_verdict(ok, '; '.join(parts))} |"
    )
    return lines


def _verdict(ok: bool, detail: str) -> str:
    return ("**met**" if ok else "**missed**") + f" ({detail})"
