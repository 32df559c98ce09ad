"""SO_REUSEPORT steering: every connection from one source IP reaches the same socket."""

from __future__ import annotations

import select
import socket

from palisade.server.steering import steer_by_source
from tests.conftest import free_port


def test_each_source_ip_always_lands_on_one_socket_and_both_sockets_are_used() -> None:
    port = free_port()
    group = []
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        group.append(sock)
    try:
        assert steer_by_source(group[0], 2)
        landed: dict[str, set[int]] = {}
        for source in ("127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"):
            for _ in range(8):  # new source ports each time: the 4-tuple hash would scatter them
                client = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
                ready, _, _ = select.select(group, [], [], 5)
                assert ready
                for sock in ready:
                    accepted, _ = sock.accept()
                    accepted.close()
                    landed.setdefault(source, set()).add(group.index(sock))
                client.close()
        assert all(len(sockets) == 1 for sockets in landed.values()), landed
        assert set().union(*landed.values()) == {0, 1}
    finally:
        for sock in group:
            sock.close()
