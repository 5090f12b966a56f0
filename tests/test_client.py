"""Who is on the other end: device names and types, fingerprints, client IP.

These are the pure functions behind ``SessionData.device_name``,
``device_type``, ``fingerprint`` and ``ip_address``; ``test_middleware.py``
proves the same rules end to end over HTTP.
"""

from __future__ import annotations

import ipaddress

import pytest

from authsessions import SessionConfig
from authsessions._client import (
    MAX_USER_AGENT_LENGTH,
    _device_of_header,
    client_ip,
    describe_device,
    device_of,
    user_agent_of,
)
from authsessions._config import IPNetwork
from tests.apps.session_app import CHROME_MAC, FIREFOX_WINDOWS

UAS = {
    "chrome-macos": CHROME_MAC,
    "safari-iphone": (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
    ),
    "safari-ipad": (
        "Mozilla/5.0 (iPad; CPU OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
    ),
    "chrome-android-phone": (
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36"
    ),
    "chrome-android-tablet": (
        "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/120.0.6099.144 Safari/537.36"
    ),
    "firefox-windows": FIREFOX_WINDOWS,
    "edge-windows": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91"
    ),
    "firefox-linux": "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "googlebot": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "curl": "curl/8.4.0",
    "empty": "",
}


@pytest.mark.parametrize(
    ("ua", "name", "device_type"),
    [
        ("chrome-macos", "Chrome on macOS", "desktop"),
        ("safari-iphone", "Safari on iOS", "mobile"),
        ("safari-ipad", "Safari on iOS", "tablet"),
        ("chrome-android-phone", "Chrome on Android", "mobile"),
        ("chrome-android-tablet", "Chrome on Android", "tablet"),
        ("firefox-windows", "Firefox on Windows", "desktop"),
        ("edge-windows", "Edge on Windows", "desktop"),
        ("firefox-linux", "Firefox on Linux", "desktop"),
        ("googlebot", "Googlebot on Unknown", "bot"),
        ("curl", "curl on Unknown", "other"),
        ("empty", "Unknown on Unknown", "other"),
    ],
)
def test_device_name_and_type_from_real_user_agents(ua: str, name: str, device_type: str) -> None:
    device = describe_device(UAS[ua])

    assert device.name == name
    assert device.type == device_type


def test_an_android_tablet_is_told_by_the_missing_mobile_token() -> None:
    """ua-parser names this tablet's maker without "Tablet"; Android phones say "Mobile"."""
    pixel_c = (
        "Mozilla/5.0 (Linux; Android 12; Pixel C) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
    )

    assert describe_device(pixel_c).type == "tablet"


def test_fingerprint_ignores_browser_and_os_versions() -> None:
    chrome_119_older_macos = CHROME_MAC.replace("10_15_7", "10_14_6").replace(
        "Chrome/120.0.0.0", "Chrome/119.0.6045.199"
    )

    assert (
        describe_device(chrome_119_older_macos).fingerprint
        == describe_device(CHROME_MAC).fingerprint
    )


def test_identical_requests_give_identical_fingerprints() -> None:
    ua = UAS["safari-iphone"]

    fingerprints = {describe_device("".join(list(ua))).fingerprint for _ in range(3)}

    assert len(fingerprints) == 1


def test_fingerprints_differ_across_browser_os_and_device_type() -> None:
    fingerprints = {describe_device(ua).fingerprint for ua in UAS.values()}

    # Every two UAs above differ in browser family, OS family or device type
    # (iPhone and iPad only in device type, curl and "" only in browser).
    assert len(fingerprints) == len(UAS)


def test_fingerprint_does_not_contain_the_user_agent_text() -> None:
    fingerprint = describe_device(CHROME_MAC).fingerprint

    assert "Chrome" not in fingerprint
    assert len(fingerprint) >= 32
    int(fingerprint, 16)


def scope(
    peer: str | None = "192.0.2.1", headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, object]:
    return {
        "type": "http",
        "client": (peer, 1234) if peer is not None else None,
        "headers": headers or [],
    }


def nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


PROXIES = nets("10.0.0.0/8", "fd00::/8")


@pytest.mark.parametrize(
    ("peer", "headers", "trusted", "expected"),
    [
        ("192.0.2.1", [], (), "192.0.2.1"),
        ("192.0.2.1", [(b"x-forwarded-for", b"203.0.113.9")], (), "192.0.2.1"),
        ("10.0.0.1", [(b"x-forwarded-for", b"203.0.113.9")], (), "10.0.0.1"),
        ("192.0.2.1", [(b"x-forwarded-for", b"203.0.113.9")], PROXIES, "192.0.2.1"),
        ("192.0.2.1", [(b"x-real-ip", b"203.0.113.9")], PROXIES, "192.0.2.1"),
        ("10.0.0.1", [(b"x-forwarded-for", b"203.0.113.9")], PROXIES, "203.0.113.9"),
        (
            "10.0.0.1",
            [(b"x-forwarded-for", b"198.51.100.1, 203.0.113.9, 10.1.1.1")],
            PROXIES,
            "203.0.113.9",
        ),
        (
            "10.0.0.1",
            [(b"x-forwarded-for", b"198.51.100.1"), (b"x-forwarded-for", b"203.0.113.9")],
            PROXIES,
            "203.0.113.9",
        ),
        ("10.0.0.1", [(b"x-forwarded-for", b"10.2.2.2, 10.1.1.1")], PROXIES, "10.2.2.2"),
        ("10.0.0.1", [(b"x-forwarded-for", b"203.0.113.9, not-an-ip")], PROXIES, "10.0.0.1"),
        ("10.0.0.1", [(b"x-forwarded-for", b"not-an-ip, 10.1.1.1")], PROXIES, "10.1.1.1"),
        ("10.0.0.1", [(b"x-real-ip", b"203.0.113.9")], PROXIES, "203.0.113.9"),
        ("10.0.0.1", [(b"x-real-ip", b"garbage")], PROXIES, "10.0.0.1"),
        (
            "10.0.0.1",
            [(b"x-real-ip", b"198.51.100.1"), (b"x-forwarded-for", b"203.0.113.9")],
            PROXIES,
            "203.0.113.9",
        ),
        ("fd00::1", [(b"x-forwarded-for", b"2001:db8::7")], PROXIES, "2001:db8::7"),
        ("10.0.0.1", [(b"x-forwarded-for", b"fe80::1%<b>hi</b>")], PROXIES, "fe80::1"),
        ("10.0.0.1", [(b"x-real-ip", b"fe80::1%" + b"x" * 8000)], PROXIES, "fe80::1"),
        ("10.0.0.1", [], PROXIES, "10.0.0.1"),
        ("testclient", [(b"x-forwarded-for", b"203.0.113.9")], PROXIES, "testclient"),
        # What a server listening on "::" reports for IPv4 peers.
        ("::ffff:10.0.0.1", [(b"x-forwarded-for", b"203.0.113.9")], PROXIES, "203.0.113.9"),
        ("::ffff:192.0.2.1", [], (), "192.0.2.1"),
        ("10.0.0.1", [(b"x-forwarded-for", b"::ffff:203.0.113.9")], PROXIES, "203.0.113.9"),
        (
            "10.0.0.1",
            [(b"x-forwarded-for", b"203.0.113.9, ::ffff:10.1.1.1")],
            PROXIES,
            "203.0.113.9",
        ),
        (
            "::ffff:10.0.0.5",
            [(b"x-forwarded-for", b"203.0.113.9")],
            SessionConfig(trusted_proxies=("::ffff:10.0.0.0/104",)).trusted_networks,
            "203.0.113.9",
        ),
        (
            "::ffff:10.0.0.5",
            [(b"x-forwarded-for", b"203.0.113.9")],
            SessionConfig(trusted_proxies=("::/0",)).trusted_networks,
            "203.0.113.9",
        ),
        (None, [(b"x-forwarded-for", b"203.0.113.9")], PROXIES, None),
        # Some proxies (Azure Application Gateway, IIS ARR) write the client's port too.
        ("10.0.0.1", [(b"x-forwarded-for", b"203.0.113.9:51234")], PROXIES, "203.0.113.9"),
        ("10.0.0.1", [(b"x-forwarded-for", b"[2001:db8::1]:443")], PROXIES, "2001:db8::1"),
        ("10.0.0.1", [(b"x-forwarded-for", b"[2001:db8::1]")], PROXIES, "2001:db8::1"),
        ("10.0.0.1", [(b"x-real-ip", b"203.0.113.9:51234")], PROXIES, "203.0.113.9"),
        ("10.0.0.1", [(b"x-forwarded-for", b"203.0.113.9:https")], PROXIES, "10.0.0.1"),
        ("10.0.0.1", [(b"x-forwarded-for", b"[2001:db8::1]:")], PROXIES, "10.0.0.1"),
        ("10.0.0.1", [(b"x-forwarded-for", b"[2001:db8::1]x")], PROXIES, "10.0.0.1"),
        ("10.0.0.1", [(b"x-forwarded-for", b"[203.0.113.9]:80")], PROXIES, "10.0.0.1"),
        ("10.0.0.1", [(b"x-forwarded-for", b"[::ffff:203.0.113.9]:80")], PROXIES, "203.0.113.9"),
        ("10.0.0.1", [(b"x-forwarded-for", b"203.0.113.9:65536")], PROXIES, "10.0.0.1"),
        # A server that trusts forwarded headers itself (uvicorn's default for 127.0.0.1)
        # hands on as the peer whatever text the header held, at any length.
        ("<not an ip> " + "A" * 3000, [], (), None),
        ("<not an ip> " + "A" * 3000, [], PROXIES, None),
    ],
    ids=[
        "peer",
        "xff-ignored-without-trusted-proxies",
        "private-peer-not-trusted-by-default",
        "xff-from-untrusted-peer",
        "x-real-ip-from-untrusted-peer",
        "xff-from-trusted-peer",
        "rightmost-untrusted-hop",
        "several-xff-headers-joined",
        "all-hops-trusted-gives-leftmost",
        "unparsable-hop-stops-at-last-good",
        "unparsable-hop-after-trusted",
        "x-real-ip-from-trusted-peer",
        "garbage-x-real-ip",
        "xff-wins-over-x-real-ip",
        "ipv6",
        "ipv6-scope-text-dropped-from-xff",
        "ipv6-scope-text-dropped-from-x-real-ip",
        "trusted-peer-without-headers",
        "non-ip-peer",
        "ipv4-mapped-trusted-peer",
        "ipv4-mapped-peer",
        "ipv4-mapped-hop",
        "ipv4-mapped-trusted-hop",
        "ipv4-mapped-peer-in-an-ipv4-mapped-network",
        "ipv4-mapped-peer-in-every-ipv6-network",
        "no-peer",
        "xff-hop-with-port",
        "xff-bracketed-ipv6-with-port",
        "xff-bracketed-ipv6",
        "x-real-ip-with-port",
        "xff-hop-with-a-port-that-is-no-number",
        "xff-bracketed-ipv6-with-an-empty-port",
        "xff-bracketed-ipv6-followed-by-text",
        "xff-bracketed-ipv4",
        "xff-bracketed-ipv4-mapped-with-port",
        "xff-hop-with-a-port-out-of-range",
        "peer-too-long-for-an-address",
        "peer-too-long-for-an-address-with-proxies",
    ],
)
def test_client_ip(
    peer: str | None,
    headers: list[tuple[bytes, bytes]],
    trusted: tuple[IPNetwork, ...],
    expected: str | None,
) -> None:
    assert client_ip(scope(peer, headers), trusted) == expected


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        (None, [(b"x-forwarded-for", b"203.0.113.9")], "203.0.113.9"),
        (None, [(b"x-forwarded-for", b"198.51.100.1, 203.0.113.9, 10.1.1.1")], "203.0.113.9"),
        (None, [(b"x-forwarded-for", b"10.2.2.2, 10.1.1.1")], "10.2.2.2"),
        (None, [(b"x-real-ip", b"203.0.113.9")], "203.0.113.9"),
        (None, [(b"x-forwarded-for", b"203.0.113.9, not-an-ip")], None),
        (None, [(b"x-real-ip", b"garbage")], None),
        (None, [], None),
        # A peer with an address is judged by the networks alone.
        ("198.51.100.7", [(b"x-forwarded-for", b"203.0.113.9")], "198.51.100.7"),
        ("10.0.0.1", [(b"x-forwarded-for", b"203.0.113.9")], "203.0.113.9"),
    ],
    ids=[
        "xff",
        "rightmost-untrusted-hop",
        "all-hops-trusted-gives-leftmost",
        "x-real-ip",
        "unparsable-hop-gives-none",
        "garbage-x-real-ip-gives-none",
        "no-headers",
        "untrusted-peer-with-an-address",
        "trusted-peer-with-an-address",
    ],
)
def test_client_ip_behind_a_proxy_on_a_unix_socket(
    peer: str | None, headers: list[tuple[bytes, bytes]], expected: str | None
) -> None:
    """A server on a Unix socket reports no peer: trusted, it is a proxy without an
    address, whose headers are believed as a trusted network's are."""
    assert client_ip(scope(peer, headers), PROXIES, unix_socket_trusted=True) == expected


def test_a_peer_without_an_address_is_not_trusted_by_default() -> None:
    forwarded = scope(None, [(b"x-forwarded-for", b"203.0.113.9")])

    assert client_ip(forwarded, nets("0.0.0.0/0", "::/0")) is None


def test_devices_are_cached_by_the_part_of_the_user_agent_that_is_parsed() -> None:
    """Keyed on the whole header, the cache would keep every long variant a client sends."""
    prefix = CHROME_MAC.encode().ljust(MAX_USER_AGENT_LENGTH, b" ")
    _device_of_header.cache_clear()

    devices = {
        device_of(scope(headers=[(b"user-agent", prefix + tail * 10_000)]))
        for tail in (b"a", b"b", b"c")
    }

    assert len(devices) == 1
    assert _device_of_header.cache_info().currsize == 1


def test_user_agent_is_read_leniently_and_capped() -> None:
    assert user_agent_of(scope(headers=[(b"user-agent", b"x" * 5000)])) == "x" * 512
    assert user_agent_of(scope(headers=[(b"user-agent", "Br\xe9sil".encode("latin-1"))])) == (
        "Br\xe9sil"
    )
    assert user_agent_of(scope()) == ""
