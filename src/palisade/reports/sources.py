"""Report documents out of files, directories, archives and report mails, bounded in size.

Owns: :func:`documents`: each path given (a file, a directory of files, a Maildir, a single
``.eml``) becomes a stream of :class:`Document` (one report's bytes: XML or JSON) and
:class:`Broken` (a source that gave none, with the reason). What a file is, is decided by its
bytes, not its name: gzip (RFC 1952), zip, a mail (the attachments ``application/zip``,
``application/gzip``, ``text/xml``, ``application/tlsrpt+gzip``... or any attachment whose file
name says ``.xml``, ``.gz``, ``.zip``, ``.json``), else the document itself.
Limits (zip and gzip bombs, huge mails): a file read is at most :data:`MAX_INPUT` bytes; a
decompressed document at most :data:`MAX_DOCUMENT` (decompression stops there, it never
inflates further); an archive gives at most :data:`MAX_MEMBERS` documents; nesting (a zip in a
mail in a gzip) at most :data:`MAX_DEPTH` levels. Past a limit the source is Broken.
Must not touch: parsing the documents (the callers do), the terminal.
Trust: all input is hostile; names shown come from the operator's paths plus archive member
names, which the callers escape before printing.
"""

from __future__ import annotations

import email
import email.policy
import io
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

__all__ = ["MAX_DOCUMENT", "Broken", "Document", "documents", "expand"]

MAX_INPUT = 64 * 1024 * 1024  # bytes read from one file
MAX_DOCUMENT = 32 * 1024 * 1024  # one report, decompressed
MAX_MEMBERS = 64  # documents from one archive or mail
MAX_DEPTH = 4

_REPORT_TYPES = frozenset(
    {
        "application/zip",
        "application/x-zip",
        "application/x-zip-compressed",
        "application/gzip",
        "application/x-gzip",
        "application/xml",
        "text/xml",
        "application/tlsrpt+gzip",
        "application/tlsrpt+json",
        "application/json",
    }
)
_REPORT_SUFFIXES = (".xml", ".gz", ".zip", ".json", ".xml.gz", ".json.gz")


@dataclass(frozen=True, slots=True)
class Document:
    """One report's bytes and where they came from (``file`` or ``file: member``)."""

    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Broken:
    """A source that gave no report, and why."""

    name: str
    reason: str


def documents(paths: Iterable[Path]) -> Iterator[Document | Broken]:
    """Every report in ``paths``, in the order given (directories sorted by name)."""
    for path in paths:
        yield from _path(path)


def _path(path: Path) -> Iterator[Document | Broken]:
    if path.is_dir():
        if (path / "cur").is_dir() or (path / "new").is_dir():  # a Maildir
            files = [p for sub in ("cur", "new") for p in sorted((path / sub).glob("*"))]
        else:
            files = sorted(p for p in path.rglob("*") if not p.name.startswith("."))
        for file in files:
            if file.is_file():
                yield from _file(file)
        return
    yield from _file(path)


def _file(path: Path) -> Iterator[Document | Broken]:
    name = str(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_INPUT:
                yield Broken(name, f"larger than {MAX_INPUT // (1024 * 1024)} MiB")
                return
            data = f.read(MAX_INPUT + 1)
    except OSError as exc:
        yield Broken(name, f"cannot be read: {exc.strerror or exc}")
        return
    yield from expand(name, data)


def expand(name: str, data: bytes, depth: int = 0) -> Iterator[Document | Broken]:
    """The documents in ``data`` (a report, or gzip, zip or a mail holding reports)."""
    if depth > MAX_DEPTH:
        yield Broken(name, f"nested more than {MAX_DEPTH} levels deep")
        return
    if data[:2] == b"\x1f\x8b":
        try:
            inner = gunzip(data)
        except ValueError as exc:
            yield Broken(name, str(exc))
            return
        yield from expand(name, inner, depth + 1)
    elif data[:4] == b"PK\x03\x04":
        yield from _unzip(name, data, depth)
    elif _looks_like_mail(data):
        yield from _mail(name, data, depth)
    else:
        yield Document(name, data)


def gunzip(data: bytes, limit: int = MAX_DOCUMENT) -> bytes:
    """The first gzip member of ``data``, at most ``limit`` bytes (ValueError past it or for a
    damaged stream). Data after the first member (seen in the wild) is ignored."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"damaged gzip data: {exc}") from None
    if len(out) > limit:
        raise ValueError(f"decompresses to more than {limit // (1024 * 1024)} MiB")
    if not inflater.eof:
        raise ValueError("gzip data ends early")
    return out


def _unzip(name: str, data: bytes, depth: int) -> Iterator[Document | Broken]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        yield Broken(name, f"damaged zip archive: {exc}")
        return
    if not members:
        yield Broken(name, "empty zip archive")
        return
    if len(members) > MAX_MEMBERS:
        yield Broken(name, f"zip archive with more than {MAX_MEMBERS} files")
        return
    with archive:
        for member in members:
            where = f"{name}: {member.filename}"
            try:
                with archive.open(member) as f:  # streams: a bomb stops at the limit
                    inner = f.read(MAX_DOCUMENT + 1)
            except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError) as exc:
                yield Broken(where, f"damaged zip member: {exc}")
                continue
            if len(inner) > MAX_DOCUMENT:
                yield Broken(where, f"decompresses to more than {MAX_DOCUMENT // 2**20} MiB")
                continue
            yield from expand(where, inner, depth + 1)


def _looks_like_mail(data: bytes) -> bool:
    head = data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith((b"<", b"{", b"[")):
        return False
    first = head.split(b"\n", 1)[0]
    if first.startswith(b"From "):  # an mbox separator line
        return True
    field_name, colon, _ = first.partition(b":")
    return bool(colon) and bool(field_name) and all(33 <= c <= 126 for c in field_name)


def _mail(name: str, data: bytes, depth: int) -> Iterator[Document | Broken]:
    if data.startswith(b"From "):
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    message = email.message_from_bytes(data, policy=email.policy.default)
    found = 0
    for part in message.walk():
        if part.is_multipart():
            continue
        assert isinstance(part, EmailMessage)
        ctype = part.get_content_type()
        filename = (part.get_filename() or "").lower()
        if ctype not in _REPORT_TYPES and not filename.endswith(_REPORT_SUFFIXES):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or not payload:
            continue
        found += 1
        if found > MAX_MEMBERS:
            yield Broken(name, f"more than {MAX_MEMBERS} report attachments")
            return
        label = f"{name}: {part.get_filename()}" if part.get_filename() else name
        yield from expand(label, payload, depth + 1)
    if not found:
        yield Broken(name, "a mail without a report attachment (zip, gzip, XML or JSON)")
