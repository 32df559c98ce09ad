"""Issue 16's "Done when", end to end, with every part real and inside network namespaces:

a gateway (``palisade serve``) and a Dovecot listen in the server namespace, ``palisade
firewall`` keeps ``table inet palisade`` there, ``palisade scan`` reads Dovecot's log; clients
connect from the client namespace, each from its own address.

- a bot is refused ten times by a HELO rule with ``incident = 1``: at the tenth it is blocked,
  lands in the nftables set, cannot connect (its SYN is dropped, to SMTP and to IMAP alike) and
  is let in again when the block (``block_for`` 6 s) has run out;
- another address fails ten IMAP logins at the real Dovecot: ``palisade scan`` turns them into
  incidents, it is blocked and dropped the same way;
- a whitelisted address (a connect ``accept`` rule's ip list) is refused by the same HELO rule
  twelve times and is never blocked, neither in the store nor in the set.
"""

from __future__ import annotations

import imaplib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from palisade.adapters.sqlite_state import SqliteStateStore
from tests.conftest import gateway_sections, palisade, wait_for, write_config
from tests.dovecot import Dovecot
from tests.feedback.netns import CLIENTS4, SERVER4, SERVER6, SMTP, NetnsPair
from tests.server.smtpclient import RawClient

BOT, GOOD, WHITELISTED, IMAP_ABUSER = CLIENTS4[1], CLIENTS4[0], CLIENTS4[2], CLIENTS4[3]
IMAP = 143
BLOCK_FOR = 6
# the history rule refuses a blocked client in SMTP too (its threshold is set out of reach:
# only the block counts here, so the bot is greeted again once its block has run out)
RULES = {
    "connect": [
        {"name": "whitelist", "check": "ip_list", "list": "whitelist", "verb": "accept"},
        {"name": "history", "check": "history", "threshold": 1000, "verb": "deny",
         "message": "history of unwanted activity", "log_message": "DENY - history"},
    ],
    "helo": [
        {"name": "botnet HELO", "check": "helo", "patterns": ["^ylmf-pc$"],
         "verb": "deny", "incident": 1, "message": "Access denied",
         "log_message": "DENY - HELO $helo"},
    ],
}  # fmt: skip


class NetnsDovecot(Dovecot):
    """tests/dovecot.py's private Dovecot, listening on the server namespace's address
    (port 143) instead of loopback, started there with ``ip netns exec``."""

    def __init__(self, log: Path, pair: NetnsPair) -> None:
        super().__init__(log)
        self.pair = pair
        text = self.conf.read_text().replace("127.0.0.1", SERVER4)
        self.conf.write_text(text.replace(f"port = {self.port}\n", f"port = {IMAP}\n"))
        self.port = IMAP

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.pair.server, self.binary, "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        penalty = self.dir / "run" / "anvil-auth-penalty"

        def ready() -> bool:
            assert self.process is not None and self.process.poll() is None, "dovecot exited"
            return penalty.exists() and "starting up" in self.log_text()

        wait_for(ready, timeout=20)
        penalty.unlink()  # no per-address login delay (see tests/dovecot.py)
        wait_for(lambda: self.pair.server_socket_ready(SERVER4, IMAP), timeout=20)

    def client(self, source: str) -> Any:
        return _FromClientNamespace(self.pair, source)


class _FromClientNamespace(imaplib.IMAP4):
    """imaplib's client on a socket opened in the client namespace, from ``source``."""

    def __init__(self, pair: NetnsPair, source: str) -> None:
        self.pair = pair
        self.source = source
        super().__init__(SERVER4, IMAP, timeout=20)

    def _create_socket(self, timeout: Any) -> socket.socket:
        sock = self.pair.client_socket(self.source)
        sock.settimeout(timeout)
        sock.connect((SERVER4, IMAP))
        return sock


def imap_reachable(pair: NetnsPair, source: str) -> bool:
    sock = pair.client_socket(source)
    try:
        sock.settimeout(1.5)
        try:
            sock.connect((SERVER4, IMAP))
        except TimeoutError:
            return False
        sock.settimeout(10)
        return sock.recv(64).startswith(b"* OK")
    finally:
        sock.close()


@pytest.fixture
def dovecot(netns_pair: NetnsPair, tmp_path: Path) -> Iterator[NetnsDovecot]:
    (tmp_path / "dovecot").mkdir()
    server = NetnsDovecot(tmp_path / "dovecot" / "dovecot.log", netns_pair)
    try:
        server.start()
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGTERM)
        server.stop()


def smtp_helo(pair: NetnsPair, source: str, helo: str) -> int:
    """One SMTP conversation from ``source``: the reply code to HELO (or to the banner, when
    that is not 220); QUIT."""
    sock = pair.client_socket(source)
    sock.settimeout(10)
    sock.connect((SERVER4, SMTP))
    client = RawClient.__new__(RawClient)
    client.sock, client.buffer = sock, b""
    with client:
        code = client.reply()[0]
        if code != 220:
            return code
        code = client.command(f"HELO {helo}")[0]
        client.send(b"QUIT\r\n")
    return code


def incidents(base: Path, ip: str) -> int:
    with SqliteStateStore(base / "var" / "state.sqlite") as store:
        found = store.get_incident_sync(ip)
        return 0 if found is None else found.count


def blocked_in_store(base: Path) -> set[str]:
    with SqliteStateStore(base / "var" / "state.sqlite") as store:
        return {block.key for block in store.active_blocks_sync(time.time())}


def test_refusals_and_dovecot_failures_block_in_nftables_whitelist_never(
    netns_pair: NetnsPair, dovecot: NetnsDovecot, tmp_path: Path
) -> None:
    pair = netns_pair
    base = tmp_path / "site"
    (base / "var").mkdir(parents=True)
    sections = gateway_sections(
        SMTP,
        server={"listen": [f"{SERVER4}:{SMTP}", f"[{SERVER6}]:{SMTP}"]},
        incidents={"block_at": 10, "block_for": f"{BLOCK_FOR}s", "window": "1h"},
        lists={"whitelist": {"type": "ip", "entries": [WHITELISTED]}},
        rules=RULES,
        scan={"files": [str(dovecot.log)], "formats": ["dovecot"]},
        firewall={"ports": [SMTP, IMAP]},
    )
    config = write_config(base / "palisade.toml", sections)
    pair.palisade("serve", "--config", str(config), cwd=base)
    wait_for(lambda: pair.server_socket_ready(SERVER4, SMTP), timeout=20)
    firewall = pair.palisade("firewall", "--config", str(config), "--interval", "0.5", cwd=base)
    firewall.wait_line("firewall: started")

    # the bot: refused ten times; the tenth refusal blocks it
    for n in range(10):
        assert smtp_helo(pair, BOT, "ylmf-pc") == 550, n
    wait_for(lambda: blocked_in_store(base) == {BOT})  # the gateway records in the background
    wait_for(lambda: BOT in pair.blocked(), timeout=10)
    assert pair.greeting(BOT) is None  # SMTP: dropped
    assert not imap_reachable(pair, BOT)  # and IMAP (Dovecot's port is listed)
    assert smtp_helo(pair, GOOD, "good.test") == 250  # everybody else gets in

    # the whitelisted address: refused twelve times, never blocked
    for n in range(12):
        assert smtp_helo(pair, WHITELISTED, "ylmf-pc") == 550, n
    wait_for(lambda: incidents(base, WHITELISTED) == 12)  # counted, every one of them
    assert WHITELISTED not in blocked_in_store(base)

    # Dovecot: ten failed logins from another address, read by palisade scan
    for _ in range(5):
        dovecot.fail(IMAP_ABUSER, 2)
    wait_for(lambda: dovecot.log.read_text().count(f"rip={IMAP_ABUSER}") >= 5)
    scanned = palisade("scan", "--once", "--config", str(config), cwd=base)
    assert scanned.returncode == 0, scanned.stderr
    assert IMAP_ABUSER in blocked_in_store(base)
    wait_for(lambda: IMAP_ABUSER in pair.blocked(), timeout=10)
    assert not imap_reachable(pair, IMAP_ABUSER)
    assert pair.greeting(IMAP_ABUSER) is None

    # the bot's block runs out: the kernel drops the element, the bot is let in again
    wait_for(lambda: BOT not in pair.blocked(), timeout=BLOCK_FOR + 10)
    greeting = pair.greeting(BOT, timeout=5)
    assert greeting is not None and greeting.startswith(b"220")
    assert pair.drops() >= 3
    assert WHITELISTED not in pair.blocked()
    assert pair.greeting(WHITELISTED, timeout=5) is not None
    firewall.stop()
    assert f"firewall: blocked {BOT} until" in firewall.text()
    assert f"firewall: blocked {IMAP_ABUSER} until" in firewall.text()
    assert WHITELISTED not in firewall.text()
