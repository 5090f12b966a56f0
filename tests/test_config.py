"""SessionConfig: the defaults of API.md's table, and a helpful ValueError for every bad value."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from datetime import timedelta
from typing import Any

import pytest

from authsessions import SessionConfig
from tests.stores.records import make_record, start_time

# API.md, "SessionConfig": field -> default.
API_DEFAULTS: dict[str, Any] = {
    "ttl": timedelta(days=30),
    "absolute_ttl": None,
    "touch_interval": timedelta(minutes=5),
    "max_sessions_per_user": 10,
    "validate_fingerprint": True,
    "cookie_name": "__Host-session",
    "cookie_secure": True,
    "cookie_http_only": True,
    "cookie_same_site": "lax",
    "cookie_path": "/",
    "cookie_domain": None,
    "trusted_proxies": (),
    "max_data_bytes": 65536,
}


@pytest.mark.parametrize(("name", "default"), API_DEFAULTS.items(), ids=list(API_DEFAULTS))
def test_defaults_match_the_api_table(name: str, default: object) -> None:
    value = getattr(SessionConfig(), name)

    assert value == default
    assert type(value) is type(default)


def test_every_documented_field_is_a_keyword_only_init_field() -> None:
    init_fields = {f.name: f for f in dataclasses.fields(SessionConfig) if f.init}

    assert set(API_DEFAULTS) <= set(init_fields)
    assert all(init_fields[name].kw_only for name in API_DEFAULTS)
    with pytest.raises(TypeError):
        SessionConfig(timedelta(days=1))  # type: ignore[call-arg]


def test_config_is_frozen() -> None:
    config = SessionConfig()

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ttl = timedelta(days=1)  # type: ignore[misc]


def test_valid_non_default_values_are_kept() -> None:
    config = SessionConfig(
        ttl=timedelta(hours=2),
        absolute_ttl=timedelta(days=1),
        touch_interval=timedelta(0),
        max_sessions_per_user=1,
        validate_fingerprint=False,
        cookie_name="session",
        cookie_secure=False,
        cookie_http_only=False,
        cookie_same_site="strict",
        cookie_path="/app",
        cookie_domain="example.com",
        trusted_proxies=("10.0.0.0/8", "2001:db8::/32", "192.0.2.1"),
        max_data_bytes=1024,
    )

    assert config.ttl == timedelta(hours=2)
    assert config.cookie_same_site == "strict"
    assert config.trusted_proxies == ("10.0.0.0/8", "2001:db8::/32", "192.0.2.1")
    assert config.trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.1/32"),
    )


@pytest.mark.parametrize(
    ("cidr", "networks"),
    [
        ("::ffff:10.0.0.0/104", ("10.0.0.0/8",)),
        ("::ffff:0:0/96", ("0.0.0.0/0",)),
        ("::/0", ("::/0", "0.0.0.0/0")),
        ("::/64", ("::/64", "0.0.0.0/0")),
        ("::/97", ("::/97",)),
        ("2001:db8::/32", ("2001:db8::/32",)),
    ],
    ids=["mapped-subnet", "all-mapped", "every-ipv6", "zero-prefix", "beside-mapped", "plain"],
)
def test_trusted_ipv6_networks_are_read_as_client_ip_reads_mapped_ipv4(
    cidr: str, networks: tuple[str, ...]
) -> None:
    """client_ip gives ``::ffff:a.b.c.d`` peers and hops as IPv4: the mapped part of a
    trusted IPv6 network must be there as IPv4 too, or ``::/0`` would trust no IPv4 peer
    of a server listening on ``::``."""
    config = SessionConfig(trusted_proxies=(cidr,))

    assert config.trusted_networks == tuple(map(ipaddress.ip_network, networks))
    assert config.trusted_proxies == (cidr,)


def test_trusted_proxies_may_name_a_proxy_on_a_unix_socket() -> None:
    config = SessionConfig(trusted_proxies=("unix", "10.0.0.0/8"))

    assert config.trusts_unix_socket is True
    assert config.trusted_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert config.trusted_proxies == ("unix", "10.0.0.0/8")
    assert SessionConfig(trusted_proxies=("10.0.0.0/8",)).trusts_unix_socket is False


def test_a_list_of_trusted_proxies_is_stored_as_a_tuple() -> None:
    config = SessionConfig(trusted_proxies=["10.0.0.0/8"])  # type: ignore[arg-type]

    assert config.trusted_proxies == ("10.0.0.0/8",)


def test_the_shortest_durations_and_plainest_cookie_attributes_are_taken() -> None:
    config = SessionConfig(
        ttl=timedelta(seconds=1),
        absolute_ttl=timedelta(seconds=1),
        touch_interval=timedelta(0),
        cookie_name="s",
        cookie_path="/a b/~x",
        cookie_domain=".xn--bcher-kva.example-1.com",
        trusted_proxies=("0.0.0.0/0",),  # every peer: a deliberate choice, not a typo
    )

    assert (config.ttl_seconds, config.absolute_ttl_seconds) == (1.0, 1.0)
    assert config.trusted_networks == (ipaddress.ip_network("0.0.0.0/0"),)
    assert SessionConfig(cookie_name="s", cookie_domain="localhost").cookie_domain == "localhost"
    longest = "." + ("a" * 63 + ".") * 3 + "b" * 61  # 253 characters after the dot
    assert SessionConfig(cookie_name="s", cookie_domain=longest).cookie_domain == longest


def test_secure_prefixes_are_fine_with_secure_cookies() -> None:
    assert SessionConfig(cookie_name="__Secure-session", cookie_domain="example.com")
    assert SessionConfig(cookie_name="__Secure-session", cookie_path="/app")
    assert SessionConfig(cookie_name="__Host-Http-session")
    assert SessionConfig(cookie_name="__Http-session", cookie_domain="example.com")


PATH_RULE = 'cookie_path must start with "/" and hold only printable ASCII but ";"'
DOMAIN_RULE = "cookie_domain must be a host name such as 'example.com'"

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("ttl-zero", {"ttl": timedelta(0)}, "ttl must be at least 1 second"),
    ("ttl-negative", {"ttl": timedelta(seconds=-1)}, "ttl must be at least 1 second"),
    # Max-Age counts whole seconds: the cookie would be sent as Max-Age=0, deleted at once.
    ("ttl-under-a-second", {"ttl": timedelta(milliseconds=999)},
     "ttl must be at least 1 second (a cookie's Max-Age counts whole seconds)"),
    ("ttl-not-timedelta", {"ttl": 3600}, "ttl must be a datetime.timedelta"),
    ("touch-equals-ttl", {"ttl": timedelta(hours=1), "touch_interval": timedelta(hours=1)},
     "touch_interval must be at least 0 and shorter than ttl"),
    ("touch-over-ttl", {"ttl": timedelta(minutes=1), "touch_interval": timedelta(minutes=5)},
     "touch_interval must be at least 0 and shorter than ttl"),
    # The default touch_interval, which the app did not set: the message says what to do.
    ("short-ttl-alone", {"ttl": timedelta(seconds=60)},
     "touch_interval must be at least 0 and shorter than ttl (datetime.timedelta(seconds=60)), "
     "got datetime.timedelta(seconds=300) (5 minutes by default: give a ttl that short a "
     "shorter touch_interval too, e.g. a tenth of it)."),
    ("touch-negative", {"touch_interval": timedelta(seconds=-1)},
     "touch_interval must be at least 0"),
    ("touch-not-timedelta", {"touch_interval": 300}, "touch_interval must be a datetime.timedelta"),
    ("absolute-zero", {"absolute_ttl": timedelta(0)},
     "absolute_ttl must be at least 1 second or None"),
    ("absolute-negative", {"absolute_ttl": timedelta(days=-1)},
     "absolute_ttl must be at least 1 second or None"),
    ("absolute-under-a-second", {"absolute_ttl": timedelta(milliseconds=400)},
     "absolute_ttl must be at least 1 second or None"),
    ("absolute-not-timedelta", {"absolute_ttl": 60}, "absolute_ttl must be a datetime.timedelta"),
    ("max-sessions-zero", {"max_sessions_per_user": 0},
     "max_sessions_per_user must be an integer >= 1"),
    ("max-sessions-negative", {"max_sessions_per_user": -3},
     "max_sessions_per_user must be an integer >= 1"),
    ("max-sessions-bool", {"max_sessions_per_user": True},
     "max_sessions_per_user must be an integer >= 1"),
    ("max-sessions-float", {"max_sessions_per_user": 2.5},
     "max_sessions_per_user must be an integer >= 1"),
    ("max-data-zero", {"max_data_bytes": 0}, "max_data_bytes must be an integer >= 2"),
    ("max-sessions-int4", {"max_sessions_per_user": 2**31},
     "max_sessions_per_user must be an integer >= 1 and <= 2147483647, got 2147483648"),
    ("max-data-int4", {"max_data_bytes": 2**31},
     "max_data_bytes must be an integer >= 2 and <= 2147483647, got 2147483648"),
    ("max-data-int8", {"max_data_bytes": 2**63}, "max_data_bytes must be an integer >= 2 and <="),
    ("ttl-max", {"ttl": timedelta.max}, "ttl must be at most 36525 days (100 years)"),
    ("ttl-over-100-years", {"ttl": timedelta(days=36526)}, "ttl must be at most 36525 days"),
    ("absolute-max", {"absolute_ttl": timedelta.max},
     "absolute_ttl must be at most 36525 days (100 years)"),
    ("host-prefix-insecure", {"cookie_secure": False}, "needs cookie_secure=True"),
    ("host-prefix-any-case-insecure", {"cookie_name": "__host-s", "cookie_secure": False},
     "needs cookie_secure=True"),
    ("secure-prefix-insecure", {"cookie_name": "__Secure-s", "cookie_secure": False},
     "needs cookie_secure=True"),
    # RFC 6265bis's HttpOnly prefixes (Chrome, Firefox): the cookie is dropped without
    # HttpOnly (and Secure), so every login would silently fail to stick.
    ("host-http-prefix-not-http-only",
     {"cookie_name": "__Host-Http-session", "cookie_http_only": False},
     "needs cookie_http_only=True"),
    ("http-prefix-any-case-not-http-only", {"cookie_name": "__http-s", "cookie_http_only": False},
     "needs cookie_http_only=True"),
    ("http-prefix-insecure", {"cookie_name": "__Http-s", "cookie_secure": False},
     "needs cookie_secure=True"),
    ("host-prefix-domain", {"cookie_domain": "example.com"},
     "requires cookie_path='/' and no cookie_domain"),
    ("host-prefix-path", {"cookie_path": "/app"}, "requires cookie_path='/' and no cookie_domain"),
    ("same-site-none", {"cookie_same_site": "none"}, 'cookie_same_site must be "lax" or "strict"'),
    ("same-site-capitalised", {"cookie_same_site": "Lax"},
     'cookie_same_site must be "lax" or "strict"'),
    ("path-relative", {"cookie_name": "s", "cookie_path": "app"},
     'cookie_path must start with "/"'),
    ("path-injection", {"cookie_name": "s", "cookie_path": "/; Domain=evil.example"}, PATH_RULE),
    ("path-bare-cr", {"cookie_name": "s", "cookie_path": "/\rX: 1"}, PATH_RULE),
    ("path-bare-lf", {"cookie_name": "s", "cookie_path": "/\nX: 1"}, PATH_RULE),
    # A server refuses a header value holding a control character: every sign-in would fail.
    ("path-nul", {"cookie_name": "s", "cookie_path": "/\x00x"}, PATH_RULE),
    ("path-del", {"cookie_name": "s", "cookie_path": "/\x7f"}, PATH_RULE),
    ("path-non-ascii", {"cookie_name": "s", "cookie_path": "/€"}, PATH_RULE),
    ("domain-injection", {"cookie_name": "s", "cookie_domain": "example.com\r\nX-Evil: 1"},
     DOMAIN_RULE),
    ("domain-bare-lf", {"cookie_name": "s", "cookie_domain": "example.com\nX-Evil: 1"},
     DOMAIN_RULE),
    ("domain-attribute", {"cookie_name": "s", "cookie_domain": "example.com; Secure"},
     DOMAIN_RULE),
    ("domain-space", {"cookie_name": "s", "cookie_domain": "exa mple.com"}, DOMAIN_RULE),
    ("domain-del", {"cookie_name": "s", "cookie_domain": "example.com\x7f"}, DOMAIN_RULE),
    ("domain-port", {"cookie_name": "s", "cookie_domain": "example.com:8000"}, DOMAIN_RULE),
    ("domain-unicode", {"cookie_name": "s", "cookie_domain": "bücher.example"}, DOMAIN_RULE),
    ("domain-empty-label", {"cookie_name": "s", "cookie_domain": "example..com"}, DOMAIN_RULE),
    ("domain-empty", {"cookie_name": "s", "cookie_domain": ""}, DOMAIN_RULE),
    ("domain-not-str", {"cookie_name": "s", "cookie_domain": 5}, DOMAIN_RULE),
    # A browser drops a cookie whose Domain is no host name: every sign-in would be lost.
    ("domain-hyphen", {"cookie_name": "s", "cookie_domain": "-"}, DOMAIN_RULE),
    ("domain-label-edge-hyphens", {"cookie_name": "s", "cookie_domain": "-example-.com"},
     DOMAIN_RULE),
    ("domain-label-over-63", {"cookie_name": "s", "cookie_domain": "a" * 64 + ".com"},
     DOMAIN_RULE),
    ("domain-over-253", {"cookie_name": "s", "cookie_domain": ("a" * 63 + ".") * 3 + "b" * 62},
     DOMAIN_RULE),
    ("secure-from-env", {"cookie_name": "s", "cookie_secure": "false"},
     "cookie_secure must be True or False, got 'false'"),
    ("http-only-from-env", {"cookie_http_only": "no"}, "cookie_http_only must be True or False"),
    ("fingerprint-int", {"validate_fingerprint": 0}, "validate_fingerprint must be True or False"),
    ("name-empty", {"cookie_name": ""}, "cookie_name must be a non-empty cookie token"),
    ("name-with-semicolon", {"cookie_name": "a;b"}, "cookie_name must be a non-empty cookie token"),
    ("name-with-space", {"cookie_name": "a b"}, "cookie_name must be a non-empty cookie token"),
    ("name-non-ascii", {"cookie_name": "séance"}, "cookie_name must be a non-empty cookie token"),
    ("cidr-bad-prefix", {"trusted_proxies": ("10.0.0.0/33",)},
     "trusted_proxies has an invalid CIDR '10.0.0.0/33'"),
    ("cidr-not-ip", {"trusted_proxies": ("proxy.internal",)},
     "trusted_proxies has an invalid CIDR 'proxy.internal'"),
    ("unix-socket-misspelt", {"trusted_proxies": ("unix:",)},
     "(a proxy on a Unix socket is 'unix')"),
    ("unix-socket-as-a-path", {"trusted_proxies": ("/run/app.sock",)},
     "(a proxy on a Unix socket is 'unix')"),
    ("cidr-bare-string", {"trusted_proxies": "10.0.0.0/8"},
     "trusted_proxies must be a tuple of CIDR strings"),
    # A typo that strict=False would widen into every address there is.
    ("cidr-host-bits", {"trusted_proxies": ("10.1.2.3/0",)},
     "trusted_proxies has an invalid CIDR '10.1.2.3/0': 10.1.2.3/0 has host bits set"),
    ("cidr-int", {"trusted_proxies": (0,)}, "trusted_proxies must hold CIDR strings, got 0"),
    ("cidr-network", {"trusted_proxies": (ipaddress.ip_network("10.0.0.0/8"),)},
     "trusted_proxies must hold CIDR strings, got IPv4Network('10.0.0.0/8')"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"), [(k, m) for _, k, m in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_invalid_config_raises_value_error_naming_the_problem(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SessionConfig(**kwargs)


def test_value_errors_suggest_a_remedy() -> None:
    with pytest.raises(ValueError, match=r'cookie_name="session"'):
        SessionConfig(cookie_secure=False)
    with pytest.raises(ValueError, match="choose another name"):
        SessionConfig(cookie_domain="example.com")


@pytest.mark.parametrize("cidr", ["10.1.2.3/8", "proxy.internal", "10.0.0.0/33"])
def test_a_bad_cidr_that_is_no_socket_gets_no_unix_socket_hint(cidr: str) -> None:
    with pytest.raises(ValueError, match="invalid CIDR") as raised:
        SessionConfig(trusted_proxies=(cidr,))
    assert "Unix socket" not in str(raised.value)


def test_the_largest_counts_and_durations_are_taken() -> None:
    config = SessionConfig(
        ttl=timedelta(days=36525),
        absolute_ttl=timedelta(days=36525),
        max_sessions_per_user=2**31 - 1,
        max_data_bytes=2**31 - 1,
    )

    assert config.ttl_seconds == 36525 * 86400
    # What timedelta.max failed at: a listing turns the expiry into a datetime.
    record = make_record(now=start_time(), ttl=config.ttl_seconds)
    assert record.to_data().expires_at.year >= 2125
