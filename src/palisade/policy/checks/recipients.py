"""``recipient``: the RCPT address is not one of ours (valid recipients, no backscatter).

The condition holds (matched) when the recipient is UNKNOWN, so the operator pairs it with
``verb = "deny"``, ``code = 550``, ``enhanced = "5.1.1"``, and the message refuses at RCPT time
instead of accepting mail that would later bounce to a forged sender. Two sources, asked in order:

1. ``list`` (optional): a named address list, Postfix's ``relay_recipients`` (``user@domain``
   lines, ``@domain`` catch-alls; the file is reloaded when it changes). An address in it is
   known; the directory is not asked.
2. ``ldap`` (default true): ``ports.recipients``, the LDAP directory, when the server configured
   one. It says the address exists (known: not matched) or does not (matched, reason "unknown
   recipient (not in list <name>, not in LDAP)"). When it cannot answer (every server down, a
   timeout, a refused bind) the check raises ``CheckError``: the static list has already said no,
   and the rule's ``on_error`` (default ``defer``: 451 4.4.3) applies -- the address is never
   accepted and bounced later, and never refused for an outage.

A rule naming neither source (no ``list``, ``ldap = false``) is refused at build time. A rule
with no ``list`` whose server has no directory configured raises ``CheckError`` at every RCPT
(so the misconfiguration defers instead of refusing every recipient).

Must not touch: the reply, logs, globals; the directory's connection and cache (the adapter's).
Trust: the recipient is client text, only lower-cased and compared with list entries or handed to
the directory port (which escapes it for its filter); it is cleaned (``safe_text``) before it
reaches ``reason`` and the values. The directory's failure reason comes from the adapter, which
keeps secrets out of it.
Values: ``$recipient`` (the address as the client gave it, cleaned), ``$domain``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from palisade.policy.checks.dnsnames import safe_text
from palisade.policy.checks.options import Options, current, named_list
from palisade.policy.lists import ListKind
from palisade.policy.rules import (
    NO_MATCH,
    Check,
    CheckError,
    CheckFactory,
    CheckResult,
    Facts,
    ListLookup,
    Ports,
    Stage,
)
from palisade.ports import ServiceTempError


class RecipientCheck:
    name: ClassVar[str] = "recipient"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.RCPT})

    def __init__(self, handle: Any, list_name: str | None, ldap: bool) -> None:
        self.handle = handle
        self.list_name = list_name
        self.ldap = ldap

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        recipient = facts.recipient
        if not recipient:
            return NO_MATCH
        address = recipient.lower()
        if self.handle is not None and current(self.handle).matches(address):  # type: ignore[union-attr]
            return NO_MATCH
        shown = safe_text(recipient)
        not_in = [f"not in list {self.list_name}"] if self.list_name else []
        directory = ports.recipients if self.ldap else None
        if directory is not None:
            try:
                if await directory.exists(address):
                    return NO_MATCH
            except ServiceTempError as exc:
                raise CheckError(
                    f"recipient {shown}: {', '.join([*not_in, 'LDAP lookup failed'])}: "
                    f"{safe_text(exc.reason)}"
                ) from None
            not_in.append("not in LDAP")
        elif self.handle is None:
            raise CheckError(
                f"recipient {shown}: no recipients list and no LDAP directory configured"
            )
        values = {"recipient": shown, "domain": safe_text(facts.recipient_domain or "")}
        return CheckResult(True, f"unknown recipient ({', '.join(not_in)})", values)


def build_recipient(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "recipient")
    handle, list_name = None, None
    if "list" in options:
        handle, list_name = named_list(opts, lists, ListKind.ADDRESS)
    ldap = opts.flag("ldap", True)
    opts.done()
    if handle is None and not ldap:
        raise ValueError("check 'recipient' needs 'list' or 'ldap = true'")
    return RecipientCheck(handle, list_name, ldap)


FACTORIES: dict[str, CheckFactory] = {
    "recipient": build_recipient,
}
