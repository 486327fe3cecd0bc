"""`pipeline.addresses`: which addresses an untrusted URL may reach, decided on the address alone.

Only the check functions run here (`address_problem`, `check_address`): no name is resolved and
no connection is made, to any address (the autouse guard below fails a test that tries). The
wider table through `pipeline.image_input.check_address` is in tests/test_image_input.py and the
fetcher's use of it, over loopback, in tests/test_url_fetch.py; this module pins the edges of
each refused range, the metadata list, the embedded-IPv4 forms and the exact wording.
"""

from __future__ import annotations

import socket

import pytest

from pipeline.addresses import address_problem, check_address
from pipeline.errors import ImageInputError, InvalidInput


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection or lookup attempt fails the test (the check must decide offline)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the address check tried the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def kind_of(ip: str, allow_loopback: bool = False) -> str | None:
    """The refused kind named in the problem ("private", ...), or None when allowed."""
    problem = address_problem(ip, allow_loopback=allow_loopback)
    if problem is None:
        return None
    assert problem.startswith("resolves to a") and problem.endswith(", which is not allowed")
    return problem.split(" address (")[0].split(" ", 3)[-1]


# Every refused IPv4 range at both of its ends, with the address just outside each end allowed
# (where that neighbour is itself public).
V4_RANGES = [
    ("10.0.0.0", "10.255.255.255", "private", "9.255.255.255", "11.0.0.0"),
    ("172.16.0.0", "172.31.255.255", "private", "172.15.255.255", "172.32.0.0"),
    ("192.168.0.0", "192.168.255.255", "private", "192.167.255.255", "192.169.0.0"),
    ("127.0.0.0", "127.255.255.255", "loopback", "126.255.255.255", "128.0.0.1"),
    ("169.254.0.0", "169.254.255.255", "link-local", "169.253.255.255", "169.255.0.0"),
    ("100.64.0.0", "100.127.255.255", "carrier-grade NAT", "100.63.255.255", "100.128.0.0"),
    ("224.0.0.0", "239.255.255.255", "multicast", "223.255.255.255", None),
    ("0.0.0.1", "0.255.255.255", "reserved", None, "1.0.0.1"),
    ("198.18.0.0", "198.19.255.255", "reserved", "198.17.255.255", "198.20.0.0"),
]


@pytest.mark.parametrize("first, last, kind, below, above", V4_RANGES,
                         ids=[f"{r[0]}-{r[1]}" for r in V4_RANGES])
def test_ipv4_ranges_are_refused_to_their_edges(first, last, kind, below, above):
    assert kind_of(first) == kind and kind_of(last) == kind
    for neighbour in (below, above):
        if neighbour is not None:
            assert address_problem(neighbour, allow_loopback=False) is None, neighbour


@pytest.mark.parametrize("ip, kind", [
    ("0.0.0.0", "unspecified"), ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"),
    ("192.0.2.1", "reserved"), ("198.51.100.7", "reserved"), ("203.0.113.9", "reserved"),
    ("192.88.99.1", "reserved"), ("192.0.0.1", "reserved"),
])
def test_special_ipv4_addresses_are_refused(ip, kind):
    assert kind_of(ip) == kind


# The instance-metadata services of the clouds we may run on: refused by name, also where the
# surrounding range would already refuse them, and in every embedded IPv6 form.
METADATA_V4 = ["169.254.169.254", "169.254.170.2", "169.254.170.23", "100.100.100.200",
               "192.0.0.192"]
METADATA_V6 = ["fd00:ec2::254", "fd00:ec2::23"]


@pytest.mark.parametrize("ip", METADATA_V4 + METADATA_V6)
def test_metadata_addresses_are_refused_as_metadata(ip):
    assert kind_of(ip) == "cloud-metadata"
    assert kind_of(ip, allow_loopback=True) == "cloud-metadata"


@pytest.mark.parametrize("ip", METADATA_V4)
def test_metadata_addresses_in_ipv6_forms_are_refused(ip):
    packed = socket.inet_aton(ip).hex()
    high, low = packed[:4], packed[4:]
    for form, how in ((f"::ffff:{ip}", "IPv4-mapped"), (f"2002:{high}:{low}::", "6to4"),
                      (f"64:ff9b::{high}:{low}", "NAT64")):
        problem = address_problem(form, allow_loopback=True)
        assert problem is not None and "cloud-metadata address" in problem, form
        assert f"the {how} form of {ip})" in problem, problem


@pytest.mark.parametrize("ip, kind", [
    ("::1", "loopback"), ("::", "unspecified"),
    ("fc00::", "private"), ("fc00::1", "private"), ("fd12:3456:789a::1", "private"),
    ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "private"),  # the end of the ULA block
    ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "link-local"),
    ("fec0::1", "private"), ("ff02::1", "multicast"), ("ff0e::1", "multicast"),
    ("2001:db8::1", "reserved"), ("3fff::1", "reserved"), ("2001::1", "reserved"),
    ("100::1", "reserved"), ("5f00::1", "reserved"), ("64:ff9b:1::1", "private"),
    ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated): never the IPv4 host
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),  # just below 2000::/3
    ("4000::", "reserved"), ("fbff::1", "reserved"),  # just above 2000::/3, just below ULA
])
def test_non_public_ipv6_addresses_are_refused(ip, kind):
    assert kind_of(ip) == kind


@pytest.mark.parametrize("ip, kind, inner, how", [
    ("::ffff:127.0.0.1", "loopback", "127.0.0.1", "IPv4-mapped"),
    ("::ffff:10.1.2.3", "private", "10.1.2.3", "IPv4-mapped"),
    ("::ffff:192.168.0.1", "private", "192.168.0.1", "IPv4-mapped"),
    ("::ffff:169.254.9.9", "link-local", "169.254.9.9", "IPv4-mapped"),
    ("::ffff:0.0.0.0", "unspecified", "0.0.0.0", "IPv4-mapped"),
    ("::ffff:100.64.0.1", "carrier-grade NAT", "100.64.0.1", "IPv4-mapped"),
    ("2002:7f00:1::", "loopback", "127.0.0.1", "6to4"),
    ("2002:c0a8:101::1", "private", "192.168.1.1", "6to4"),
    ("64:ff9b::7f00:1", "loopback", "127.0.0.1", "NAT64"),
    ("64:ff9b::a01:203", "private", "10.1.2.3", "NAT64"),
])
def test_embedded_ipv4_is_judged_by_the_ipv4_inside(ip, kind, inner, how):
    problem = address_problem(ip, allow_loopback=False)
    assert kind_of(ip) == kind
    assert f"the {how} form of {inner})" in problem


@pytest.mark.parametrize("ip", [
    "8.8.8.8", "1.1.1.1", "9.9.9.9", "93.184.215.14", "1.0.0.1", "223.255.255.254",
    "2606:4700:4700::1111", "2001:4860:4860::8888", "2a00:1450:4001::1", "2000::1",
    "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808",
])
def test_public_unicast_addresses_are_allowed(ip):
    assert address_problem(ip, allow_loopback=False) is None
    assert address_problem(ip, allow_loopback=True) is None
    check_address(ip, allow_loopback=False)  # no error


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"])
def test_allow_loopback_opens_loopback_only(ip):
    assert kind_of(ip) == "loopback"
    assert address_problem(ip, allow_loopback=True) is None


@pytest.mark.parametrize("ip", [
    "2002:7f00:1::", "64:ff9b::7f00:1",  # translated loopback never reaches this host's loopback
    "::127.0.0.1", "10.0.0.1", "169.254.169.254", "fd00::1", "fe80::1", "0.0.0.0", "::",
])
def test_allow_loopback_keeps_everything_else_refused(ip):
    assert address_problem(ip, allow_loopback=True) is not None


def test_messages_name_kind_value_and_article():
    assert address_problem("10.0.0.5", allow_loopback=False) == (
        "resolves to a private address (10.0.0.5), which is not allowed")
    assert address_problem("::", allow_loopback=False) == (
        "resolves to an unspecified address (::), which is not allowed")
    assert address_problem("fe80::1", allow_loopback=False) == (
        "resolves to a link-local address (fe80::1), which is not allowed")
    assert address_problem("2002:7f00:1::", allow_loopback=False) == (
        "resolves to a loopback address (2002:7f00:1::, the 6to4 form of 127.0.0.1), "
        "which is not allowed")


@pytest.mark.parametrize("text", ["example.com", "localhost", "", "10.0.0", "1.2.3.4.5",
                                  "::ffff:999.0.0.1", "0x7f000001", "[::1]"])
def test_what_is_not_an_ip_address_is_refused(text):
    problem = address_problem(text, allow_loopback=True)
    assert problem is not None and problem.endswith("which is not an IP address")
    assert repr(text) in problem


def test_check_address_raises_image_input_error_naming_the_field():
    with pytest.raises(ImageInputError) as excinfo:
        check_address("169.254.169.254", allow_loopback=False)
    assert isinstance(excinfo.value, InvalidInput) and excinfo.value.field == "image_url"
    assert str(excinfo.value) == ("`image_url` resolves to a cloud-metadata address "
                                  "(169.254.169.254), which is not allowed")
    with pytest.raises(ImageInputError) as excinfo:
        check_address("::1", allow_loopback=False, field="image")
    assert excinfo.value.field == "image" and str(excinfo.value).startswith("`image` ")


def test_check_address_and_address_problem_agree():
    for ip in ["8.8.8.8", "10.0.0.1", "::1", "::ffff:127.0.0.1", "2002:7f00:1::", "nope"]:
        for allow in (False, True):
            problem = address_problem(ip, allow_loopback=allow)
            if problem is None:
                check_address(ip, allow_loopback=allow)
            else:
                with pytest.raises(ImageInputError) as excinfo:
                    check_address(ip, allow_loopback=allow)
                assert str(excinfo.value) == f"`image_url` {problem}"
