"""Which network addresses an untrusted URL may reach: public unicast only.

Refused: private, loopback, link-local, multicast, reserved, unspecified, carrier-grade NAT and
cloud-metadata addresses, IPv4 and IPv6, including IPv4 embedded in IPv4-mapped, 6to4 and NAT64
addresses. Callers may pass `allow_loopback=True` (tests that serve images on 127.0.0.1 do);
there is no environment switch: an SSRF guard must not have an off switch in production.
"""

from __future__ import annotations

import ipaddress

from pipeline.errors import ImageInputError, shorten

# Addresses of instance-metadata services (AWS, GCP, Azure, OpenStack, ECS/EKS, Alibaba, Oracle).
_METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.170.23", "100.100.100.200", "192.0.0.192",
    "fd00:ec2::254", "fd00:ec2::23",
))
_V4_RULES = tuple((ipaddress.ip_network(net), kind) for net, kind in (
    ("0.0.0.0/32", "unspecified"), ("0.0.0.0/8", "reserved"), ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"), ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"), ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
    ("192.0.2.0/24", "reserved"), ("198.51.100.0/24", "reserved"),  # documentation
    ("203.0.113.0/24", "reserved"),  # documentation
    ("192.88.99.0/24", "reserved"),  # 6to4 relay anycast
    ("192.168.0.0/16", "private"), ("198.18.0.0/15", "reserved"),  # benchmarking
    ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"),  # and 255.255.255.255
))
_V6_RULES = tuple((ipaddress.ip_network(net), kind) for net, kind in (
    ("::/128", "unspecified"), ("::1/128", "loopback"),
    ("::/96", "reserved"),  # IPv4-compatible, deprecated
    ("64:ff9b:1::/48", "private"),  # local-use NAT64
    ("100::/64", "reserved"),  # discard
    ("2001::/23", "reserved"),  # IETF protocol assignments, Teredo
    ("2001:db8::/32", "reserved"), ("3fff::/20", "reserved"),  # documentation
    ("5f00::/16", "reserved"),  # SRv6
    ("fc00::/7", "private"),  # unique local
    ("fe80::/10", "link-local"), ("fec0::/10", "private"),  # site-local, deprecated
    ("ff00::/8", "multicast"),
))
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _category(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The kind of non-public address `ip` is, or None for a public unicast address."""
    if ip in _METADATA:
        return "cloud-metadata"
    for network, kind in _V4_RULES if ip.version == 4 else _V6_RULES:
        if ip in network:
            return kind
    if ip.version == 6 and ip not in _GLOBAL_UNICAST_V6:
        return "reserved"
    return None if ip.is_global else "reserved"


def _embedded_v4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    return None


def address_problem(ip: str, *, allow_loopback: bool) -> str | None:
    """Why `ip` may not be fetched from (the message tail after the field), or None if it may."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return f"resolves to {shorten(ip)}, which is not an IP address"
    if addr.version == 6 and (embedded := _embedded_v4(addr)) is not None:
        inner, how = embedded
        kind = _category(inner)
        # A mapped address really reaches the IPv4 host; 6to4/NAT64 of loopback never should.
        if kind is None or (kind == "loopback" and allow_loopback and how == "IPv4-mapped"):
            return None
        shown = f"{addr}, the {how} form of {inner}"
    else:
        kind = _category(addr)
        if kind is None or (kind == "loopback" and allow_loopback):
            return None
        shown = str(addr)
    article = "an" if kind[0] in "aeiou" else "a"
    return f"resolves to {article} {kind} address ({shown}), which is not allowed"


def check_address(ip: str, *, allow_loopback: bool, field: str = "image_url") -> None:
    """Raise ImageInputError unless `ip` is a public unicast address (or loopback, if allowed)."""
    problem = address_problem(ip, allow_loopback=allow_loopback)
    if problem is not None:
        raise ImageInputError(field, problem)


