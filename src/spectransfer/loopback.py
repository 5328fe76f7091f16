"""The one answer to "does this address stay on this machine?" (127.0.0.0/8, ::1, localhost).

The inspection server binds without a token only to such an address and then accepts only
such Host headers (a DNS-rebinding guard); fetch ignores proxy settings for such URLs.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(host: str | None) -> bool:
    """True for localhost, every 127.x.y.z, ::1 (bracketed or not) and IPv4-mapped loopback."""
    if not host:
        return False
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def host_header_name(value: str) -> str:
    """The host name of an HTTP Host header ('127.0.0.2:8000' -> '127.0.0.2', '[::1]:80' -> '::1')."""
    value = value.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def url_is_loopback(url: str) -> bool:
    return is_loopback(urlsplit(url).hostname)
