"""Servers that the test suite and the benchmarks start on loopback (127.0.0.0/8) and share.

Owns: the DNS zone server (``dnsserver``) that both ``tests/`` and ``bench/`` use, so neither
imports the other. Not part of the installed package; never used by Palisade at run time.
"""
