"""Who is on the other end: client IP behind trusted proxies, device, fingerprint."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import ua_parser
from starlette.types import Scope

from authsessions._config import IPNetwork
from authsessions._records import DeviceType

__all__ = ["Device", "client_ip", "describe_device", "device_of", "user_agent_of"]

MAX_USER_AGENT_LENGTH = 512

# The longest peer a server may name: a Unix socket's path (sun_path holds 108 bytes);
# an IP address is at most 45 characters.
MAX_PEER_LENGTH = 108

_OS_NAMES = {"Mac OS X": "macOS", "Mac OS": "macOS", "Chrome OS": "ChromeOS"}
_BROWSER_NAMES = {
    "Mobile Safari": "Safari",
    "Mobile Safari UI/WKWebView": "Safari",
    "Chrome Mobile": "Chrome",
    "Chrome Mobile iOS": "Chrome",
    "Chrome Mobile WebView": "Chrome WebView",
    "Firefox Mobile": "Firefox",
    "Firefox iOS": "Firefox",
    "Edge Mobile": "Edge",
    "Opera Mobile": "Opera",
}
_MOBILE_OSES = {
    "iOS",
    "Android",
    "Windows Phone",
    "BlackBerry OS",
    "KaiOS",
    "Firefox OS",
    "Symbian OS",
}
_DESKTOP_OSES = {
    "Windows", "macOS", "Linux", "Ubuntu", "Debian", "Fedora", "ChromeOS", "FreeBSD",
    "OpenBSD", "NetBSD", "Solaris", "Mandriva", "Red Hat", "SUSE", "Gentoo", "Arch Linux",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Device:
    """What a User-Agent says about the client, reduced to stable traits."""

    name: str
    """"<browser family> on <OS family>", e.g. "Chrome on macOS"."""
    type: DeviceType
    fingerprint: str
    """Digest of browser family, OS family and device type; no versions, so updates keep it."""


def user_agent_of(scope: Scope) -> str:
    """The request's User-Agent, decoded leniently and capped in length."""
    value: bytes
    for name, value in scope["headers"]:
        if name == b"user-agent":
            return _decoded_user_agent(value[:MAX_USER_AGENT_LENGTH])
    return ""


def device_of(scope: Scope) -> Device:
    """The :class:`Device` a request's User-Agent describes (cached by the header's first
    ``MAX_USER_AGENT_LENGTH`` bytes, all that is parsed).
    """
    value: bytes
    for name, value in scope["headers"]:
        if name == b"user-agent":
            # Capped before the cache: keyed on the whole header, a client could fill the
            # cache with long headers that differ only past what is parsed.
            return _device_of_header(value[:MAX_USER_AGENT_LENGTH])
    return _device_of_header(b"")


@lru_cache(maxsize=4096)
def _device_of_header(value: bytes) -> Device:
    return describe_device(_decoded_user_agent(value))


def _decoded_user_agent(value: bytes) -> str:
    # HTTP parsers refuse a NUL in a header, but an ASGI server need not pass on only what
    # they accept; PostgreSQL's text cannot hold one, and the parser copies it into names.
    return value.decode("latin-1").replace("\x00", "\N{REPLACEMENT CHARACTER}")


def describe_device(user_agent: str) -> Device:
    """What a User-Agent string says about the client (a parse costs about a millisecond)."""
    result = ua_parser.parse(user_agent)
    browser = result.user_agent.family if result.user_agent else "Unknown"
    browser = _BROWSER_NAMES.get(browser, browser)
    os_family = result.os.family if result.os else "Unknown"
    os_family = _OS_NAMES.get(os_family, os_family)
    if browser == "Other":
        browser = "Unknown"
    if os_family == "Other":
        os_family = "Unknown"
    device_type = _device_type(user_agent, os_family, result.device)
    traits = f"{browser}\x1f{os_family}\x1f{device_type}".encode()
    return Device(
        name=f"{browser} on {os_family}",
        type=device_type,
        fingerprint=hashlib.sha256(traits).hexdigest()[:32],
    )


def _device_type(user_agent: str, os_family: str, device: ua_parser.Device | None) -> DeviceType:
    family = device.family if device else ""
    brand = (device.brand or "") if device else ""
    if family == "Spider" or brand == "Spider":
        return "bot"
    if family == "iPad" or "Tablet" in family or "Tablet" in brand or "Kindle" in family:
        return "tablet"
    if os_family == "Android":
        # Android phones say "Mobile"; Android tablets do not.
        return "mobile" if "Mobile" in user_agent else "tablet"
    if os_family in _MOBILE_OSES or family in ("iPhone", "iPod", "Generic Smartphone"):
        return "mobile"
    if os_family in _DESKTOP_OSES:
        return "desktop"
    return "other"


def client_ip(
    scope: Scope, trusted: Sequence[IPNetwork], *, unix_socket_trusted: bool = False
) -> str | None:
    """The client's IP address.

    The peer address is the answer unless it lies in ``trusted``; only then
    are X-Forwarded-For (its right-most hop that is not itself trusted) and
    X-Real-IP believed. A hop that is not an IP address (one with a port, or in
    brackets, as some proxies write them, is) stops the walk at the last
    address known good. IPv4 addresses mapped into IPv6 (``::ffff:a.b.c.d``,
    what a server listening on ``::`` reports for IPv4 clients) are given as
    IPv4. A peer longer than any address or socket path gives ``None``.

    A server listening on a Unix socket reports no peer; with ``unix_socket_trusted``
    that peer is a trusted proxy with no address of its own, so the headers are
    believed as from one in ``trusted`` (and without them the answer is ``None``).
    """
    client = scope.get("client")
    if not client:
        return _forwarded_ip(scope, trusted, None) if unix_socket_trusted else None
    host: str = client[0]
    if len(host) > MAX_PEER_LENGTH:
        # A server that believes forwarded headers itself (uvicorn does, from 127.0.0.1,
        # unless started with --no-proxy-headers) hands on the header's text as the peer.
        return None
    if not trusted and not host.startswith("::ffff:"):
        return host  # the usual case, without ipaddress's parse on every login
    peer = _parse_ip(host)
    if peer is None:
        return host  # not an IP address (a socket path, a test client's name)
    if not any(peer in network for network in trusted):
        return str(peer)
    return _forwarded_ip(scope, trusted, str(peer))


def _forwarded_ip(scope: Scope, trusted: Sequence[IPNetwork], peer: str | None) -> str | None:
    """What the headers a trusted ``peer`` (``None``: one without an address) sent say."""
    forwarded: list[str] = []
    real_ip: str | None = None
    value: bytes
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            forwarded.extend(value.decode("latin-1").split(","))
        elif name == b"x-real-ip":
            real_ip = value.decode("latin-1").strip()
    if forwarded:
        nearest = peer
        for hop in reversed(forwarded):
            address = _parse_forwarded_ip(hop.strip())
            if address is None:
                return nearest
            if not any(address in network for network in trusted):
                return str(address)
            nearest = str(address)
        return nearest
    if real_ip is not None:
        address = _parse_forwarded_ip(real_ip)
        return str(address) if address is not None else peer
    return peer


def _parse_forwarded_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A forwarded address, also as some proxies write it (Azure Application Gateway, IIS
    ARR): with the client's port, ``a.b.c.d:port`` or ``[v6]:port``, or in brackets.
    """
    if text.startswith("["):
        inside, bracket, after = text[1:].partition("]")
        if not bracket or (after and not (after.startswith(":") and _is_port(after[1:]))):
            return None
        return _parse_ip(inside) if ":" in inside else None  # brackets hold IPv6 only
    host, colon, port = text.partition(":")
    if colon and ":" not in port:  # one colon: IPv4 and a port; more: IPv6
        return _parse_ip(host) if _is_port(port) else None
    return _parse_ip(text)


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit() and int(text) <= 65535


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        # Without an IPv6 scope: ipaddress takes any text after "%" as one, which would
        # let a forwarded header store whatever it likes as the session's address.
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    # A server listening on "::" sees IPv4 clients as ::ffff:a.b.c.d, which no IPv4
    # network of trusted_proxies contains.
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped or address
    return address
