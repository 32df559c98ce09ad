"""Readiness notifications to the service manager: systemd's ``sd_notify`` protocol.

Owns: what the process that systemd watches (the parent, or the single process with
``workers = 1``) tells the service manager about its state, through the datagram socket named
by ``$NOTIFY_SOCKET``: ``READY=1`` once every listener is bound and serving, ``RELOADING=1``
(with ``MONOTONIC_USEC``) when a SIGHUP reload begins and ``READY=1`` again when it ends
(applied or refused: ``STATUS=`` says which), ``STOPPING=1`` on SIGTERM/SIGINT. Workers never
send (the unit has ``NotifyAccess=main``): only :mod:`palisade.server.app`'s parent calls here.

Why not a library: the protocol is one ``sendto`` of ``KEY=VALUE`` lines on an ``AF_UNIX``
``SOCK_DGRAM`` socket (a leading ``@`` naming the abstract namespace), as ``sd_notify(3)``
documents it. The PyPI choices are ``systemd-python`` (a C extension that needs libsystemd's
headers and a compiler to install) and ``sdnotify`` (pure Python, not maintained for years);
the few lines here are smaller than either dependency and tested against a real socket.

Trust: ``$NOTIFY_SOCKET`` comes from the service manager (the environment). Without it every
call is a no-op; a send that fails (no listener any more, a full queue) is dropped silently,
as ``sd_notify`` does: the service must never stop or block because its manager is gone.
Status texts are the program's own; line breaks are replaced so one cannot add a field.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["notify", "ready", "reloading", "stopping"]


def _address() -> str | bytes | None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):  # the abstract namespace: a leading NUL byte on the wire
        return b"\0" + path[1:].encode()
    if path.startswith("/"):
        return path
    return None  # vsock and other forms: not for this service


def notify(**fields: str | int) -> bool:
    """Sends ``KEY=VALUE`` lines (keyword ``ready=1`` becomes ``READY=1``) in one datagram;
    returns whether it was sent (False without ``$NOTIFY_SOCKET`` or when the send failed)."""
    address = _address()
    if address is None:
        return False
    text = "".join(
        f"{key.upper()}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items()
    )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(text.encode("utf-8", "replace"), address)
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    """The service is serving (at start, and at the end of every reload)."""
    return notify(ready=1, status=status, mainpid=os.getpid())


def reloading(status: str = "reloading the configuration") -> bool:
    """A reload begins; systemd wants the CLOCK_MONOTONIC time of it in microseconds."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(reloading=1, monotonic_usec=usec, status=status)


def stopping(status: str = "stopping: finishing transactions in flight") -> bool:
    """Shutdown begins."""
    return notify(stopping=1, status=status)
