"""The DSN text: the original Message-ID quoted as a msg-id in In-Reply-To and References."""

from __future__ import annotations

import dataclasses
import email
import email.policy

import pytest

from palisade.delivery.dsn import build_dsn
from palisade.delivery.outcome import RecipientResult
from tests.delivery.deliverykit import envelope

FAILED = RecipientResult("bob@corp.test", "failed", "550 no such user", "relay", "smtp")


def dsn(message_id: str | None) -> bytes:
    original = dataclasses.replace(envelope(), message_id=message_id)
    return build_dsn(
        original,
        [FAILED],
        b"Subject: hello\r\n\r\n",
        reporting_mta="mx.example.test",
        message_id="<bounce@mx.example.test>",
        now=0.0,
    )


@pytest.mark.parametrize("message_id", ["<m1@outside.test>", "<" + "a" * 970 + "@x.test>"])
def test_original_message_id_is_quoted_verbatim_on_one_line(message_id: str) -> None:
    raw = dsn(message_id)
    assert raw.startswith(f"In-Reply-To: {message_id}\r\nReferences: {message_id}\r\n".encode())
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["In-Reply-To"] == message_id and msg["References"] == message_id
    assert msg["Message-ID"] == "<bounce@mx.example.test>"
    assert msg.get_content_type() == "multipart/report"


@pytest.mark.parametrize(
    "message_id",
    [None, "m1@no-brackets", "<a b@x>", "<\u00e9@x>", "<a@x> <b@y>", "<" + "a" * 990 + "@x>"],
)
def test_anything_but_one_msg_id_is_left_out(message_id: str | None) -> None:
    msg = email.message_from_bytes(dsn(message_id), policy=email.policy.default)
    assert msg["In-Reply-To"] is None and msg["References"] is None
    assert msg.get_content_type() == "multipart/report"
