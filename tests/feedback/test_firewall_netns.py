"""``palisade firewall`` against the real kernel: nft inside a server network namespace, a real
gateway listening there, clients connecting from a client namespace (tests/feedback/netns.py).

Blocks are written into the real SQLite state file with the store's own API (as the gateway and
``palisade scan`` write them); the daemon copies them into ``table inet palisade``; a blocked
client's SYN is dropped (its connect times out, the rule's counter counts it) while the others
are greeted; the kernel's time-out lets it in again; ``palisade history remove`` lifts a block
within one interval; a protected address (relay_from_hosts) is never added.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.ports import BlockPolicy
from tests.conftest import ROOT, gateway_sections, wait_for, write_config
from tests.feedback.netns import (
    CLIENT6_OTHER,
    CLIENT6_SAME,
    CLIENTS4,
    SERVER4,
    SERVER6,
    SMTP,
    NetnsPair,
)
from tests.services import need_program

BOT, GOOD, TRUSTED, OTHER = CLIENTS4[1], CLIENTS4[0], CLIENTS4[2], CLIENTS4[3]
INTERVAL = "0.5"


def block(base: Path, ip: str, seconds: float) -> None:
    """A block of ``ip`` (its key) for ``seconds`` from now, through the store's own API."""
    store = SqliteStateStore(base / "var" / "state.sqlite")
    try:
        policy = BlockPolicy(block_at=1, block_for=seconds, block_max=seconds)
        outcome = store.record_incident_sync(ip, 1, "test", time.time(), policy)
        assert outcome.new_block, outcome
    finally:
        store.close()


@pytest.fixture
def site(netns_pair: NetnsPair, tmp_path: Path) -> dict[str, Any]:
    """A gateway in the server namespace (port SMTP, IPv4 and IPv6) and its config, which also
    holds ``[firewall]`` (that port) and a protected address (relay_from_hosts)."""
    base = tmp_path / "site"
    (base / "var").mkdir(parents=True)
    sections = gateway_sections(
        SMTP,
        server={"listen": [f"{SERVER4}:{SMTP}", f"[{SERVER6}]:{SMTP}"]},
        relay={"relay_from_hosts": [f"{TRUSTED}/32"]},
        firewall={"ports": [SMTP], "interval": "1s"},
    )
    config = write_config(base / "palisade.toml", sections)
    gateway = netns_pair.palisade("serve", "--config", str(config), cwd=base)
    wait_for(lambda: netns_pair.server_socket_ready(SERVER4, SMTP), timeout=20)
    return {"base": base, "config": config, "gateway": gateway}


def start_firewall(pair: NetnsPair, site: dict[str, Any], *extra: str) -> Any:
    daemon = pair.palisade(
        "firewall",
        "--config",
        str(site["config"]),
        "--interval",
        INTERVAL,
        *extra,
        cwd=site["base"],
    )
    daemon.wait_line("firewall: started")
    return daemon


def test_blocked_client_is_dropped_until_the_block_ends(
    netns_pair: NetnsPair, site: dict[str, Any]
) -> None:
    firewall = start_firewall(netns_pair, site)
    assert netns_pair.blocked() == {}
    assert netns_pair.greeting(BOT, timeout=5) is not None

    block(site["base"], BOT, 4)
    wait_for(lambda: BOT in netns_pair.blocked(), timeout=10)
    firewall.wait_line(f"firewall: blocked {BOT} until")
    assert netns_pair.greeting(BOT) is None  # the SYN is dropped: connect times out
    assert netns_pair.drops() >= 1
    greeting = netns_pair.greeting(GOOD, timeout=5)  # others are let in
    assert greeting is not None and greeting.startswith(b"220")

    # the kernel's time-out ends the element with the block; the client gets in again
    wait_for(lambda: BOT not in netns_pair.blocked(), timeout=15)
    assert netns_pair.greeting(BOT, timeout=5) is not None


def test_ipv6_clients_are_blocked_by_their_64(netns_pair: NetnsPair, site: dict[str, Any]) -> None:
    start_firewall(netns_pair, site)
    block(site["base"], CLIENT6_OTHER, 3600)
    wait_for(lambda: "fd00:99:0:2::/64" in netns_pair.blocked(), timeout=10)
    assert netns_pair.greeting(CLIENT6_OTHER) is None
    greeting = netns_pair.greeting(CLIENT6_SAME[0], timeout=5)  # another /64: let in
    assert greeting is not None and greeting.startswith(b"220")

    block(site["base"], CLIENT6_SAME[0], 3600)  # ::2 misbehaved: its whole /64 is blocked
    wait_for(lambda: "fd00:99:0:1::/64" in netns_pair.blocked(), timeout=10)
    assert netns_pair.greeting(CLIENT6_SAME[1]) is None


def test_protected_address_is_never_added(netns_pair: NetnsPair, site: dict[str, Any]) -> None:
    firewall = start_firewall(netns_pair, site)
    block(site["base"], TRUSTED, 3600)  # the store says blocked (written behind the policy)
    block(site["base"], OTHER, 3600)
    wait_for(lambda: OTHER in netns_pair.blocked(), timeout=10)
    line = firewall.wait_line(f"firewall: {TRUSTED} is protected")
    assert "relay_from_hosts" in line
    assert TRUSTED not in netns_pair.blocked()
    assert netns_pair.greeting(TRUSTED, timeout=5) is not None
    firewall.stop()
    assert firewall.text().count(f"{TRUSTED} is protected") == 1  # once, not at every sync


def test_rebuild_at_start_holds_the_stores_blocks_and_nothing_else(
    netns_pair: NetnsPair, site: dict[str, Any]
) -> None:
    block(site["base"], BOT, 3600)
    block(site["base"], CLIENT6_OTHER, 3600)
    # a table left by an earlier run, with a block the store no longer has
    stale = netns_pair.palisade_once(
        "firewall", "--once", "--config", str(site["config"]), cwd=site["base"]
    )
    assert stale.returncode == 0, stale.stderr
    netns_pair.exec(
        netns_pair.server,
        "nft",
        "add element inet palisade blocked4 { 10.99.0.8 timeout 1h }",
    )
    assert "10.99.0.8" in netns_pair.blocked()

    start_firewall(netns_pair, site)
    assert set(netns_pair.blocked()) == {BOT, "fd00:99:0:2::/64"}
    assert netns_pair.greeting(BOT) is None
    assert netns_pair.greeting("10.99.0.8", timeout=5) is not None


def test_history_remove_unblocks_within_an_interval(
    netns_pair: NetnsPair, site: dict[str, Any]
) -> None:
    block(site["base"], BOT, 3600)
    firewall = start_firewall(netns_pair, site)
    assert BOT in netns_pair.blocked()
    assert netns_pair.greeting(BOT) is None
    removed = netns_pair.palisade_once(
        "history", "remove", BOT, "--config", str(site["config"]), cwd=site["base"]
    )
    assert removed.returncode == 0, removed.stderr
    wait_for(lambda: BOT not in netns_pair.blocked(), timeout=5)
    firewall.wait_line(f"firewall: unblocked {BOT}")
    assert netns_pair.greeting(BOT, timeout=5) is not None


def test_stop_keeps_the_table_flush_removes_it_reload_changes_ports(
    netns_pair: NetnsPair, site: dict[str, Any]
) -> None:
    block(site["base"], BOT, 3600)
    firewall = start_firewall(netns_pair, site)
    rules = netns_pair.exec(netns_pair.server, "nft", "list", "chain", "inet", "palisade", "input")
    assert f"tcp dport {SMTP} ct state new ip saddr @blocked4" in rules.stdout

    config: Path = site["config"]
    good = config.read_text()
    config.write_text(good.replace(f"ports = [{SMTP}]", f"ports = [{SMTP}, 0]"))  # refused whole
    firewall.proc.send_signal(signal.SIGHUP)
    line = firewall.wait_line("firewall: reload refused, the old config stays")
    assert "firewall.ports" in line
    assert BOT in netns_pair.blocked() and netns_pair.greeting(BOT) is None
    config.write_text(good.replace(f"ports = [{SMTP}]", f"ports = [{SMTP}, 143, 993]"))
    firewall.proc.send_signal(signal.SIGHUP)
    firewall.wait_line("firewall: config reloaded")
    wait_for(
        lambda: (
            f"{{ 143, 993, {SMTP} }}"
            in netns_pair.exec(
                netns_pair.server, "nft", "list", "chain", "inet", "palisade", "input"
            ).stdout
        )
    )
    assert BOT in netns_pair.blocked()

    assert firewall.stop() == 0
    assert "left in place" in firewall.text()
    assert "palisade" in netns_pair.tables()  # a stopped daemon does not open the door
    assert netns_pair.greeting(BOT) is None

    flushed = netns_pair.palisade_once(
        "firewall", "--flush", "--config", str(config), cwd=site["base"]
    )
    assert flushed.returncode == 0, flushed.stderr
    assert "table inet palisade removed" in flushed.stderr
    assert "palisade" not in netns_pair.tables()
    assert netns_pair.greeting(BOT, timeout=5) is not None
    again = netns_pair.palisade_once(
        "firewall", "--flush", "--config", str(config), cwd=site["base"]
    )
    assert again.returncode == 0 and "no table inet palisade" in again.stderr


def test_once_syncs_and_exits(netns_pair: NetnsPair, site: dict[str, Any]) -> None:
    block(site["base"], BOT, 3600)
    done = netns_pair.palisade_once(
        "firewall", "--once", "--config", str(site["config"]), cwd=site["base"]
    )
    assert done.returncode == 0, done.stderr
    assert BOT in netns_pair.blocked()
    block(site["base"], OTHER, 3600)
    done = netns_pair.palisade_once(
        "firewall", "--once", "--config", str(site["config"]), cwd=site["base"]
    )
    assert done.returncode == 0, done.stderr
    assert f"firewall: blocked {OTHER} until" in done.stderr
    assert set(netns_pair.blocked()) == {BOT, OTHER}


def test_no_state_database_yet(netns_pair: NetnsPair, tmp_path: Path) -> None:
    """Before the gateway's first run there is no database: nothing is blocked, the file is not
    created by the firewall, and the daemon picks it up once it appears."""
    state = tmp_path / "var" / "state.sqlite"
    config = write_config(
        tmp_path / "palisade.toml",
        {"paths": {"state": str(state)}, "firewall": {"ports": [SMTP]}},
    )
    done = netns_pair.palisade_once("firewall", "--once", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "firewall: rebuilt, 0 blocked" in done.stderr
    assert not state.exists() and not state.parent.exists()
    assert "palisade" in netns_pair.tables()

    firewall = netns_pair.palisade(
        "firewall", "--config", str(config), "--interval", INTERVAL, cwd=tmp_path
    )
    firewall.wait_line("firewall: started")
    state.parent.mkdir()
    block(tmp_path, BOT, 3600)
    wait_for(lambda: BOT in netns_pair.blocked(), timeout=10)


def test_the_units_capabilities_suffice(netns_pair: NetnsPair, tmp_path: Path) -> None:
    """Run as the unit runs it: root with only the capabilities of the unit's
    CapabilityBoundingSet (``setpriv``), on a state database that belongs to another user
    (the gateway's, mode 0600). They suffice; CAP_NET_ADMIN alone cannot open the database."""
    setpriv = need_program("setpriv", "util-linux")
    unit = (ROOT / "contrib" / "palisade-firewall.service").read_text()
    line = next(ln for ln in unit.splitlines() if ln.startswith("CapabilityBoundingSet="))
    caps = [cap.lower().removeprefix("cap_") for cap in line.split("=", 1)[1].split()]
    block(tmp_path, BOT, 3600)
    var = tmp_path / "var"
    for path in (var, *var.iterdir()):
        os.chown(path, 65534, 65534)
    var.chmod(0o700)
    config = write_config(
        tmp_path / "palisade.toml",
        {"paths": {"state": "var/state.sqlite"}, "firewall": {"ports": [SMTP]}},
    )

    def once(bounding: list[str]) -> subprocess.CompletedProcess[str]:
        return netns_pair.exec(
            netns_pair.server,
            setpriv,
            "--bounding-set",
            ",".join(["-all", *(f"+{cap}" for cap in bounding)]),
            "--inh-caps=-all",
            sys.executable,
            "-m",
            "palisade",
            "firewall",
            "--once",
            "--config",
            str(config),
            check=False,
            cwd=tmp_path,
        )

    alone = once(["net_admin"])
    assert alone.returncode == 1 and "Permission denied" in alone.stderr, alone.stderr
    assert BOT not in netns_pair.blocked()
    done = once(caps)
    assert done.returncode == 0, done.stderr
    assert BOT in netns_pair.blocked()


def test_reload_to_backend_none_stops_and_keeps_the_table(
    netns_pair: NetnsPair, site: dict[str, Any]
) -> None:
    block(site["base"], BOT, 3600)
    firewall = start_firewall(netns_pair, site)
    config: Path = site["config"]
    config.write_text(config.read_text().replace("[firewall]\n", '[firewall]\nbackend = "none"\n'))
    firewall.proc.send_signal(signal.SIGHUP)
    assert firewall.proc.wait(20) == 0
    assert 'backend is now "none": stopped' in firewall.text()
    assert BOT in netns_pair.blocked()


def test_a_flushed_ruleset_is_rebuilt_at_the_next_sync(
    netns_pair: NetnsPair, site: dict[str, Any]
) -> None:
    block(site["base"], BOT, 3600)
    firewall = start_firewall(netns_pair, site)
    assert BOT in netns_pair.blocked()
    netns_pair.exec(netns_pair.server, "nft", "flush", "ruleset")  # nftables.service reloaded
    assert "palisade" not in netns_pair.tables()
    wait_for(lambda: BOT in netns_pair.blocked(), timeout=10)
    assert netns_pair.greeting(BOT) is None
    assert "firewall: rebuilt, 1 blocked" in firewall.text().split("firewall: started")[1]


def test_blocks_shared_on_redis_reach_the_firewall(netns_pair: NetnsPair, tmp_path: Path) -> None:
    """``[state] backend = "redis"``: a block written by any host (here ``palisade history add``
    with ``block_at = 1``) is read from Redis by ``palisade firewall`` and dropped in nftables.
    The redis-server runs in the server namespace, on its loopback."""
    binary = need_program("redis-server", "redis-server")
    need_program("redis-cli", "redis-tools")
    base = tmp_path / "site"
    base.mkdir()
    port = "6390"  # the namespace's own loopback: nothing else listens there
    netns_pair.start(
        binary, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", cwd=base
    )
    wait_for(
        lambda: (
            "PONG"
            in netns_pair.exec(
                netns_pair.server, "redis-cli", "-p", port, "PING", check=False
            ).stdout
        ),
        timeout=10,
    )
    sections = gateway_sections(
        SMTP,
        server={"listen": [f"{SERVER4}:{SMTP}"]},
        firewall={"ports": [SMTP], "interval": "1s"},
        state={"backend": "redis", "url": f"redis://127.0.0.1:{port}/0"},
        incidents={"block_at": 1},
    )
    config = write_config(base / "palisade.toml", sections)
    added = netns_pair.palisade_once("history", "add", BOT, "--config", str(config), cwd=base)
    assert added.returncode == 0, added.stderr
    done = netns_pair.palisade_once("firewall", "--once", "--config", str(config), cwd=base)
    assert done.returncode == 0, done.stderr
    assert set(netns_pair.blocked()) == {BOT}
    assert not (base / "var" / "state.sqlite").exists()  # the shared store, not a local file
