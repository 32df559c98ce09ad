"""Command-line grammar: one CRLF-terminated line in, one command event or CommandError out.

Owns: line hygiene (NUL, bare LF, bare CR), the verb table, and the argument syntax of every
command, including MAIL/RCPT parameters (SIZE, BODY). It does not know the session state: the
sequence rules, the pipelining discipline and the recipient count live in ``connection``.

Trust: none. The line is at most ``Limits.max_command_line`` octets (the buffer enforces it)
and otherwise arbitrary; it is decoded as latin-1 (one character per byte, never an error) and
every path through here ends in an event, never an exception.
"""

from __future__ import annotations

import re

from palisade.smtp import replies
from palisade.smtp.address import AddressError, ParamError, parse_params, parse_path
from palisade.smtp.events import (
    Auth,
    CommandError,
    Data,
    Event,
    Expn,
    Helo,
    Help,
    Mail,
    Noop,
    Quit,
    Rcpt,
    Rset,
    StartTls,
    Vrfy,
)
from palisade.smtp.options import Features, Limits
from palisade.smtp.replies import Reply

__all__ = ["MUST_BE_LAST", "VERBS", "check_line", "parse_command", "split_verb"]

VERBS = frozenset(
    {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP", "VRFY", "EXPN"}
    | {"STARTTLS", "AUTH"}
)
# RFC 2920 §3.1 (and RFC 4954 for AUTH): these end a pipelined group; the client must wait for
# their reply. STARTTLS is not here: input after it is discarded instead (CVE-2011-0411), and
# QUIT is not here because whatever follows it is harmless.
MUST_BE_LAST = frozenset({"EHLO", "HELO", "DATA", "VRFY", "EXPN", "NOOP", "AUTH"})

_NO_ARGS = {"DATA", "RSET", "QUIT", "STARTTLS"}
_TEXT_BAD_RE = re.compile(r"[^\x20-\x7e]")  # controls, DEL and 8-bit in free-text arguments
_DIGITS_RE = re.compile(r"[0-9]{1,20}")


def _error(reply: Reply, reason: str, kind: str, command: str) -> CommandError:
    return CommandError(reply=reply, reason=reason, kind=kind, command=command)


def check_line(raw: bytes) -> str | CommandError:
    """The command text of ``raw`` (CRLF removed, latin-1 decoded), or why the line is refused."""
    if b"\0" in raw:
        return _error(replies.LINE_NUL, "NUL character in command line", "nul", "")
    if not raw.endswith(b"\r\n"):
        return _error(replies.LINE_BARE_LF, "command line ended by a bare LF", "bare_lf", "")
    body = raw[:-2]
    if b"\r" in body:
        return _error(replies.LINE_BARE_CR, "bare CR in command line", "bare_cr", "")
    return body.decode("latin-1")


def split_verb(text: str) -> tuple[str, str]:
    """(VERB upper-cased, argument text) of a command line (only ASCII verbs are upper-cased:
    ``str.upper`` maps some latin-1 letters to other letters or to two of them)."""
    verb, _, args = text.partition(" ")
    return (verb.upper() if verb.isascii() else verb), args


def parse_command(verb: str, args: str, *, limits: Limits, features: Features) -> Event:
    """The event for a known ``verb`` and its arguments, or a CommandError for bad syntax."""
    if verb in _NO_ARGS:
        if args.strip(" "):
            return _error(
                Reply(501, "5.5.4", f"Syntax: {verb}"), f"{verb} takes no argument", "syntax", verb
            )
        match verb:
            case "DATA":
                return Data()
            case "RSET":
                return Rset()
            case "QUIT":
                return Quit()
            case _:
                return StartTls()
    if verb == "MAIL":
        return _parse_mail(args, limits, features)
    if verb == "RCPT":
        return _parse_rcpt(args)
    # Surrounding spaces are tolerated, and a trailing tab after a HELO name (some real clients
    # send ``HELO name `` or ``HELO name\t``); a blank inside a HELO name is not.
    arg = args.lstrip(" ").rstrip(" \t" if verb in ("HELO", "EHLO") else " ")
    if _TEXT_BAD_RE.search(arg):
        return _error(
            Reply(501, "5.5.2", "Syntax error: invalid characters in argument"),
            f"control or 8-bit characters in {verb} argument",
            "syntax",
            verb,
        )
    match verb:
        case "HELO" | "EHLO":
            if not arg:
                return _error(
                    Reply(501, "5.5.4", f"Syntax: {verb} hostname"),
                    f"{verb} without a name",
                    "syntax",
                    verb,
                )
            if " " in arg:
                # A domain or address literal has no space (RFC 5321 4.1.1.1): ``EHLO a b`` is
                # refused and counted, and no second word ever reaches a log line as a name.
                return _error(
                    Reply(501, "5.5.4", f"Syntax: {verb} hostname"),
                    f"{verb} argument is not one domain or address literal",
                    "syntax",
                    verb,
                )
            return Helo(name=arg, extended=verb == "EHLO")
        case "NOOP":
            return Noop()
        case "HELP":
            return Help(topic=arg)
        case "VRFY" | "EXPN":
            if not arg:
                return _error(
                    Reply(501, "5.5.4", f"Syntax: {verb} address"),
                    f"{verb} without an argument",
                    "syntax",
                    verb,
                )
            return Vrfy(argument=arg) if verb == "VRFY" else Expn(argument=arg)
        case _:
            return Auth(argument=arg)


def _parse_mail(args: str, limits: Limits, features: Features) -> Event:
    if not args[:5].isascii() or args[:5].upper() != "FROM:":
        return _error(
            Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"),
            "MAIL without FROM:",
            "syntax",
            "MAIL",
        )
    try:
        address, rest = parse_path(args[5:].lstrip(" "), allow_null=True, allow_postmaster=False)
    except AddressError as exc:
        return _error(
            Reply(501, "5.1.7", "Bad sender address syntax"), f"sender: {exc}", "address", "MAIL"
        )
    try:
        params = parse_params(rest)
    except ParamError as exc:
        return _error(Reply(501, "5.5.4", "Syntax error in parameters"), str(exc), "syntax", "MAIL")
    size: int | None = None
    body: str | None = None
    for key, value in params:
        if key == "SIZE":
            if value is None or not _DIGITS_RE.fullmatch(value):
                return _error(
                    Reply(501, "5.5.4", "Bad SIZE parameter syntax"),
                    "SIZE not a number",
                    "syntax",
                    "MAIL",
                )
            size = int(value)
            if size > limits.max_message_size:
                return _error(
                    replies.MESSAGE_TOO_BIG,
                    f"declared SIZE {size} over the limit {limits.max_message_size}",
                    "size",
                    "MAIL",
                )
        elif key == "BODY":
            upper = (value or "").upper()
            allowed = ("7BIT", "8BITMIME") if features.eightbitmime else ("7BIT",)
            if upper not in allowed:
                return _error(
                    Reply(501, "5.5.4", "Bad BODY parameter"),
                    f"BODY={(value or '')[:20]}",
                    "syntax",
                    "MAIL",
                )
            body = upper
        else:
            return _unsupported(key, "MAIL")
    return Mail(address=address, size=size, body=body, params=params)


def _parse_rcpt(args: str) -> Event:
    if not args[:3].isascii() or args[:3].upper() != "TO:":
        return _error(
            Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"), "RCPT without TO:", "syntax", "RCPT"
        )
    try:
        address, rest = parse_path(args[3:].lstrip(" "), allow_null=False, allow_postmaster=True)
    except AddressError as exc:
        return _error(
            Reply(501, "5.1.3", "Bad recipient address syntax"),
            f"recipient: {exc}",
            "address",
            "RCPT",
        )
    assert address is not None  # allow_null=False
    try:
        params = parse_params(rest)
    except ParamError as exc:
        return _error(Reply(501, "5.5.4", "Syntax error in parameters"), str(exc), "syntax", "RCPT")
    if params:
        return _unsupported(params[0][0], "RCPT")
    return Rcpt(address=address, params=params)


def _unsupported(key: str, verb: str) -> CommandError:
    return _error(
        Reply(555, "5.5.4", f"Unsupported option: {key[:40]}"),
        f"unsupported {verb} parameter {key[:40]}",
        "parameter",
        verb,
    )
