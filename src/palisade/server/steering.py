"""Steer every client IP to one worker process (SO_ATTACH_REUSEPORT_CBPF).

Owns: the classic BPF program the kernel runs for each new connection to the shared port. By
default SO_REUSEPORT spreads connections by a hash of the whole 4-tuple (and unsteered, every
worker accepts from every socket), so one client's connections land in different workers; this
program picks the socket, and with it the one worker accepting from it, from the source address
alone (an IPv6 client by its /64), so per-client state (rate counters, the DNS cache of its PTR)
lives in one process and is exact there. Linux only; when the kernel refuses the program the
caller falls back to state shared through the store.
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_NET_OFF = -0x100000  # the network header, for BPF_ABS loads in socket filters

# classic BPF opcodes
_LD_W_ABS = 0x20  # A = word at [k]
_TAX = 0x07  # X = A
_XOR_X = 0xAC  # A ^= X
_MOD_K = 0x94  # A %= k
_RET_A = 0x16  # return A (the index of the socket in the reuseport group)


def _ins(code: int, k: int = 0) -> bytes:
    return struct.pack("HBBI", code, 0, 0, k & 0xFFFFFFFF)


def program(family: int, workers: int) -> bytes:
    """The filter: source IPv4 address (or the /64 of an IPv6 one) modulo ``workers``."""
    if family == socket.AF_INET:
        body = [_ins(_LD_W_ABS, _SKF_NET_OFF + 12)]  # IPv4 source address
    else:
        body = [  # IPv6 source bytes 8..15: the /64
            _ins(_LD_W_ABS, _SKF_NET_OFF + 8),
            _ins(_TAX),
            _ins(_LD_W_ABS, _SKF_NET_OFF + 12),
            _ins(_XOR_X),
        ]
    return b"".join([*body, _ins(_MOD_K, workers), _ins(_RET_A)])


def steer_by_source(sock: socket.socket, workers: int) -> bool:
    """Attaches the program to ``sock``'s reuseport group; False when the kernel refuses."""
    code = program(sock.family, workers)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HP", len(code) // 8, ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError:
        return False
    return True
