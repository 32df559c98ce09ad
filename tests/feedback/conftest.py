"""Fixtures of the feedback tests: the network-namespace pair (tests/feedback/netns.py)."""

from tests.feedback.netns import netns_pair

__all__ = ["netns_pair"]
