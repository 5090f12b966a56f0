"""Session settings, validated once at construction."""

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from authsessions._records import MAX_COUNT

__all__ = ["MAX_DURATION", "MIN_DURATION", "SessionConfig"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Host name labels: 1 to 63 letters, digits and inner hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"\.?{_LABEL}(?:\.{_LABEL})*")
_MAX_DOMAIN_LENGTH = 253

MIN_DURATION = timedelta(seconds=1)
"""The shortest ``ttl`` or ``absolute_ttl``: a cookie's Max-Age counts whole seconds, so a
shorter session would be sent with ``Max-Age=0``, which deletes it at once."""

MAX_DURATION = timedelta(days=36525)
"""The longest ``ttl`` or ``absolute_ttl``, 100 years: an expiry beyond year 9999 is no
``datetime`` (listing such a session failed), and no session needs to last longer."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionConfig:
    """Settings for sessions and their cookie, with secure defaults.

    Every field is keyword-only; an invalid value raises ``ValueError`` naming
    the field and what would be valid::

        SessionConfig(ttl=timedelta(days=7), absolute_ttl=timedelta(days=30))
    """

    ttl: timedelta = timedelta(days=30)
    """Idle (sliding) lifetime: activity moves ``expires_at`` to now + ttl; from
    :data:`MIN_DURATION` (1 second) to :data:`MAX_DURATION` (100 years)."""

    absolute_ttl: timedelta | None = None
    """Hard cap counted from ``created_at``; never extended by activity or ``rotate``; from
    :data:`MIN_DURATION` to :data:`MAX_DURATION`."""

    touch_interval: timedelta = timedelta(minutes=5)
    """At most one "last active" write per session per interval: activity within it,
    data writes included, leaves ``last_active_at`` and ``expires_at`` as they are."""

    max_sessions_per_user: int = 10
    """On login, the least recently active sessions beyond this many are destroyed (at most
    2**31 - 1, as ``max_data_bytes``)."""

    validate_fingerprint: bool = True
    """End a session when a request's client fingerprint differs from the stored one."""

    cookie_name: str = "__Host-session"
    cookie_secure: bool = True
    """``False`` only for plain-HTTP development."""

    cookie_http_only: bool = True
    cookie_same_site: Literal["lax", "strict"] = "lax"
    cookie_path: str = "/"
    cookie_domain: str | None = None

    trusted_proxies: tuple[str, ...] = ()
    """CIDRs whose X-Forwarded-For / X-Real-IP headers are believed; empty: never believed.
    A network with host bits set ("10.1.2.3/8") is refused: a typo must not widen it.
    IPv4 peers seen as IPv4-mapped IPv6 (``::ffff:a.b.c.d``) match the IPv4 networks and
    any IPv6 network holding that address ("::/0"). ``"unix"`` trusts a proxy that
    reaches the app over a Unix socket (uvicorn ``--uds``, gunicorn ``--bind unix:``),
    which the server reports with no address."""

    max_data_bytes: int = 65536
    """Cap on the serialised JSON data of one session (at most 2**31 - 1)."""

    # Derived once for the per-request path.
    trusted_networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)
    trusts_unix_socket: bool = field(init=False, repr=False, compare=False)
    ttl_seconds: float = field(init=False, repr=False, compare=False)
    touch_interval_seconds: float = field(init=False, repr=False, compare=False)
    absolute_ttl_seconds: float | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _require_timedelta("ttl", self.ttl)
        _require_timedelta("touch_interval", self.touch_interval)
        _require_duration("ttl", self.ttl)
        if self.absolute_ttl is not None:
            _require_timedelta("absolute_ttl", self.absolute_ttl)
            _require_duration("absolute_ttl", self.absolute_ttl, or_none=True)
        if not timedelta(0) <= self.touch_interval < self.ttl:
            # The default's 5 minutes meet a short ttl the app set alone: say what to do.
            raise ValueError(
                f"touch_interval must be at least 0 and shorter than ttl ({self.ttl!r}), "
                f"got {self.touch_interval!r} (5 minutes by default: give a ttl that short "
                "a shorter touch_interval too, e.g. a tenth of it)."
            )
        _require_int("max_sessions_per_user", self.max_sessions_per_user, minimum=1)
        _require_int("max_data_bytes", self.max_data_bytes, minimum=2)
        for flag in ("validate_fingerprint", "cookie_secure", "cookie_http_only"):
            # "false" from an environment variable is truthy: it would read as True.
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
        self._check_cookie()
        derived = {
            "trusted_networks": _parse_networks(self.trusted_proxies),
            "trusts_unix_socket": UNIX_SOCKET in self.trusted_proxies,
            "ttl_seconds": self.ttl.total_seconds(),
            "touch_interval_seconds": self.touch_interval.total_seconds(),
            "absolute_ttl_seconds": self.absolute_ttl.total_seconds()
            if self.absolute_ttl
            else None,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))

    def _check_cookie(self) -> None:
        name = self.cookie_name
        if (
            not isinstance(name, str)
            or not name
            or any(ch in name for ch in ' \t\r\n;,="()<>@:\\/[]?{}')
            or not name.isascii()
            or not name.isprintable()
        ):
            raise ValueError(f"cookie_name must be a non-empty cookie token, got {name!r}.")
        if self.cookie_same_site not in ("lax", "strict"):
            raise ValueError(
                f'cookie_same_site must be "lax" or "strict", got {self.cookie_same_site!r}.'
            )
        path = self.cookie_path
        # A header value takes printable ASCII; ";" would start another attribute.
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or not path.isascii()
            or not path.isprintable()
            or ";" in path
        ):
            raise ValueError(
                'cookie_path must start with "/" and hold only printable ASCII but ";", '
                f"got {path!r}."
            )
        domain = self.cookie_domain
        if domain is not None and not (
            isinstance(domain, str)
            and _DOMAIN.fullmatch(domain)
            and len(domain.removeprefix(".")) <= _MAX_DOMAIN_LENGTH
        ):
            raise ValueError(
                "cookie_domain must be a host name such as 'example.com' (labels of letters, "
                "digits and inner '-', at most 63 characters each and 253 in all, joined by "
                f"'.'; an international name in its xn-- form) or None, got {domain!r}."
            )
        lowered = name.lower()
        if not self.cookie_secure and lowered.startswith(("__host-", "__secure-", "__http-")):
            raise ValueError(
                f"cookie_name {name!r} needs cookie_secure=True: browsers drop __Host-, "
                "__Secure- and __Http- cookies without Secure. For plain-HTTP development pick "
                'another name, e.g. cookie_name="session".'
            )
        if not self.cookie_http_only and lowered.startswith(("__http-", "__host-http-")):
            raise ValueError(
                f"cookie_name {name!r} needs cookie_http_only=True: browsers drop __Http- and "
                "__Host-Http- cookies without HttpOnly; choose another name to let scripts "
                "read the cookie."
            )
        if lowered.startswith("__host-") and (
            self.cookie_domain is not None or self.cookie_path != "/"
        ):
            raise ValueError(
                f"cookie_name {name!r} requires cookie_path='/' and no cookie_domain "
                "(the __Host- prefix forbids both); choose another name to use them."
            )


def _require_timedelta(name: str, value: object) -> None:
    if not isinstance(value, timedelta):
        raise ValueError(f"{name} must be a datetime.timedelta, got {value!r}.")


def _require_duration(name: str, value: timedelta, *, or_none: bool = False) -> None:
    if value < MIN_DURATION:
        raise ValueError(
            f"{name} must be at least 1 second{' or None' if or_none else ''} (a cookie's "
            f"Max-Age counts whole seconds), got {value!r}."
        )
    if value > MAX_DURATION:
        raise ValueError(
            f"{name} must be at most {MAX_DURATION.days} days (100 years), got {value!r}."
        )


def _require_int(name: str, value: object, *, minimum: int) -> None:
    # At most MAX_COUNT: stores bind these as integers (PostgreSQL's int4).
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        raise ValueError(
            f"{name} must be an integer >= {minimum} and <= {MAX_COUNT}, got {value!r}."
        )


# What trusted_proxies holds for a proxy on a Unix socket, beside the CIDRs.
UNIX_SOCKET = "unix"


def _parse_networks(cidrs: object) -> tuple[IPNetwork, ...]:
    if isinstance(cidrs, str) or not isinstance(cidrs, tuple | list | frozenset | set):
        raise ValueError(
            "trusted_proxies must be a tuple of CIDR strings such as ('10.0.0.0/8',), "
            f"got {cidrs!r}."
        )
    networks: list[IPNetwork] = []
    for cidr in cidrs:
        # An int would be read as one address; a string with host bits set is a typo
        # that strict=False would widen ("10.1.2.3/0" into every address there is).
        if not isinstance(cidr, str):
            raise ValueError(f"trusted_proxies must hold CIDR strings, got {cidr!r}.")
        if cidr == UNIX_SOCKET:
            continue
        try:
            network = ipaddress.ip_network(cidr)
        except ValueError as exc:
            hint = ""
            if cidr.strip().lower().startswith(UNIX_SOCKET) or cidr.startswith("/"):
                hint = f" (a proxy on a Unix socket is {UNIX_SOCKET!r})"
            raise ValueError(f"trusted_proxies has an invalid CIDR {cidr!r}: {exc}{hint}") from None
        networks.extend(_as_read_by_client_ip(network))
    return tuple(networks)


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _as_read_by_client_ip(network: IPNetwork) -> tuple[IPNetwork, ...]:
    """``network`` as client_ip compares addresses: it reads IPv4-mapped peers and hops
    as IPv4, which no IPv6 network contains. ``::ffff:10.0.0.0/104`` becomes
    ``10.0.0.0/8``; a wider network that holds every mapped address (``::/0``) also
    stands for every IPv4 address.
    """
    if not isinstance(network, ipaddress.IPv6Network):
        return (network,)
    if network.subnet_of(_IPV4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return (ipaddress.IPv4Network((mapped, network.prefixlen - 96)),)
    if network.supernet_of(_IPV4_MAPPED):
        return (network, ipaddress.IPv4Network("0.0.0.0/0"))
    return (network,)
