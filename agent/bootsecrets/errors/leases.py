"""The outcomes of leased secrets (docs/leases.md)."""

from __future__ import annotations

from bootsecrets.errors.base import BootsecretsError

# --- leased secrets (docs/leases.md) -----------------------------------------------------


class _LeaseError(BootsecretsError):
    """A problem with one leased secret: names it and its path, never a value or a lease ID
    (`reason` is built from statuses and names only)."""

    def __init__(self, name: str, path: str, problem: str) -> None:
        self.name = name
        self.path = path
        self.problem = problem
        super().__init__(f"leased secret {name} ({path}): {problem}")


class LeaseIssueFailed(_LeaseError):
    exit_code = 60
    summary = (
        "new leased credentials or a certificate could not be issued; the old ones "
        "are kept while valid (alert)"
    )
    message_id = "b147789eecc5405282bef7c53ea689be"
    hint = (
        "check the database (or CA) behind the path, and the role's policy; the agent "
        "tries again on its own schedule (bootsecrets-wakeup.timer; see docs/leases.md)"
    )


class CertificateRefused(_LeaseError):
    exit_code = 61
    summary = "the PKI role refused the certificate's names or TTL (alert)"
    message_id = "30ea99bd691a406ca01c7a8759581fe0"
    hint = (
        "make the PKI role allow what the image config asks (allowed_domains, "
        "allow_subdomains, allow_ip_sans, max_ttl), or fix common_name and alt_names"
    )


class LeaseRevokeFailed(_LeaseError):
    exit_code = 62
    summary = "an old lease could not be revoked; tried again at the next run"
    message_id = "4e7390c872644576a6afa062358c8ddc"
    hint = (
        "the units run on the new credentials; check the database and that the policy "
        "lets the role revoke its own leases (docs/leases.md); an unrevoked lease still "
        "ends at its own expiry"
    )


class LeaseExpired(_LeaseError):
    exit_code = 63
    summary = "leased credentials or a certificate expired before they were replaced (alert)"
    message_id = "48f53efa3253436380069d92eae37fe3"
    hint = (
        "the agent did not run in time (Vault or the database unreachable, the host "
        "paused, or its timers stopped): check `systemctl list-timers 'bootsecrets*'` "
        "and the journal"
    )


class LeaseRenewalRefused(_LeaseError):
    exit_code = 64
    summary = (
        "Vault refused to renew a lease (revoked outside the agent, not renewable, or "
        "its database unreachable); re-issued (alert)"
    )
    message_id = "0ffcc765ab8f4ef8b22dea89ed12112c"
    hint = (
        "if nobody revoked the lease on purpose, check the database and the policy's "
        "renew grant (docs/leases.md); the units run on re-issued credentials"
    )
