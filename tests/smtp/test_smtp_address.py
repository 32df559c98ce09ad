"""RFC 5321 path and parameter grammar, good and bad forms."""

from __future__ import annotations

import pytest

from palisade.smtp.address import Address, AddressError, ParamError, parse_params, parse_path


@pytest.mark.parametrize(
    ("text", "local", "domain", "quoted", "route"),
    [
        ("<a@b>", "a", "b", False, ()),
        ("<First.Last+tag@Sub.Example-1.COM>", "First.Last+tag", "Sub.Example-1.COM", False, ()),
        ('<"john doe"@example.org>', "john doe", "example.org", True, ()),
        ('<"a\\"b"@example.org>', 'a"b', "example.org", True, ()),
        (
            "<@a.example,@b.example:u@c.example>",
            "u",
            "c.example",
            False,
            ("a.example", "b.example"),
        ),
        ("<user%other@example.org>", "user%other", "example.org", False, ()),
        ("<host!user@example.org>", "host!user", "example.org", False, ()),
        ('<"a@b"@example.org>', "a@b", "example.org", True, ()),
        ("<a@[192.0.2.1]>", "a", "[192.0.2.1]", False, ()),
        ("<a@[IPv6:2001:db8::1]>", "a", "[IPv6:2001:db8::1]", False, ()),
        ("<a@[ipv6:::ffff:192.0.2.1]>", "a", "[ipv6:::ffff:192.0.2.1]", False, ()),
        ("<" + "l" * 64 + "@example.org>", "l" * 64, "example.org", False, ()),
    ],
)
def test_good_paths(
    text: str, local: str, domain: str, quoted: bool, route: tuple[str, ...]
) -> None:
    address, rest = parse_path(text, allow_null=False, allow_postmaster=False)
    assert address == Address(local, domain, quoted, route)
    assert rest == ""


def test_text_and_tricks() -> None:
    assert Address("a", "b").text == "a@b"
    assert Address('x"y', "b", quoted=True).text == '"x\\"y"@b'
    assert Address("postmaster", "").text == "postmaster"
    assert Address("u", "c", source_route=("a",)).relay_tricks == ("source_route",)
    assert Address("a@b", "c", quoted=True).relay_tricks == ("quoted_at",)
    assert Address("a%b", "c").relay_tricks == ("percent_hack",)
    assert Address("b!a", "c").relay_tricks == ("bang_path",)
    assert Address("plain", "c").relay_tricks == ()
    assert Address("a", "[192.0.2.1]").is_literal


def test_null_path_only_when_allowed() -> None:
    assert parse_path("<> SIZE=1", allow_null=True, allow_postmaster=False) == (None, " SIZE=1")
    with pytest.raises(AddressError):
        parse_path("<>", allow_null=False, allow_postmaster=True)


@pytest.mark.parametrize("text", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_bare_postmaster_only_when_allowed(text: str) -> None:
    address, _ = parse_path(text, allow_null=False, allow_postmaster=True)
    assert address is not None
    assert address.domain == ""
    assert address.local_part.lower() == "postmaster"
    with pytest.raises(AddressError):
        parse_path(text, allow_null=True, allow_postmaster=False)


LONG_DOMAIN = ".".join(["d" * 50] * 5) + ".example"  # > 255


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "missing"),
        ("a@b", "angle brackets"),
        ("<a@b", "closing"),
        ("<>", "null"),
        ("<a>", "no domain"),
        ("<a@>", "no domain"),
        ("<a b@c>", "space"),
        ("< a@b >", "space"),
        ("<a\x01@b>", "control"),
        ("<\xe9@b.example>", "8-bit"),
        ("<a@b\xe9.example>", "8-bit"),
        ("<a@-b.example>", "domain"),
        ("<a@b-.example>", "domain"),
        ("<a@b..example>", "domain"),
        ("<a@b_c.example>", "domain"),
        ("<a..b@c>", "syntax"),
        ("<.a@c>", "syntax"),
        ("<a@[1.2.3.999]>", "IPv4"),
        ("<a@[1.2.3]>", "IPv4"),
        ("<a@[01.2.3.4]>", "IPv4"),
        ("<a@[IPv6:zz::1]>", "IPv6"),
        ("<a@[IPv6:fe80::1%eth0]>", "IPv6"),
        ("<a@[IPv6:1.2.3.4]>", "IPv6"),
        ("<a@[tag:content]>", "unsupported"),
        ("<" + "l" * 65 + "@example.org>", "local part"),
        ("<a@" + LONG_DOMAIN + ">", "domain longer"),
        ("<a@" + "d" * 64 + ".example>", "label"),
        ("<@a:>", "syntax"),
        ("<@a b:u@c>", "space"),
    ],
)
def test_bad_paths(text: str, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(text, allow_null=False, allow_postmaster=False)
    assert reason.lower() in str(info.value).lower()


@pytest.mark.parametrize(
    ("text", "params"),
    [
        ("", ()),
        (" ", ()),
        (" SIZE=100", (("SIZE", "100"),)),
        (" size=100  body=8bitmime ", (("SIZE", "100"), ("BODY", "8bitmime"))),
        (" X-FLAG", (("X-FLAG", None),)),
    ],
)
def test_good_params(text: str, params: tuple[tuple[str, str | None], ...]) -> None:
    assert parse_params(text) == params


@pytest.mark.parametrize(
    "text",
    ["x", " =1", " -A=1", " SIZE=", " A=b=c", " SIZE=1 size=2", " A=\x01", " A=\xe9", " A\tB"],
)
def test_bad_params(text: str) -> None:
    with pytest.raises(ParamError):
        parse_params(text)
