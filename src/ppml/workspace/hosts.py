"""The host names a workspace's TLS server certificate covers: parsing and normalizing them.

Apart from the certificate machinery (`ppml.workspace.pki`), so that reading a workspace's
configuration, which holds its extra host names, does not import it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from ppml.errors import UsageError

__all__ = ["DEFAULT_HOSTS", "IPAddr", "normalize_hosts", "parse_host"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_host(host: str) -> str | IPAddr:
    """An IP literal (returned as an address) or a DNS name (returned lower-cased)."""
    if not isinstance(host, str) or not host or host != host.strip():
        raise UsageError(f"invalid host {host!r}: give a DNS name or an IP address")
    try:
        ip = ipaddress.ip_address(host.strip("[]") if host.startswith("[") else host)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise UsageError(
                f"invalid host {host!r}: scoped IPv6 addresses cannot be in a certificate"
            )
        return ip
    name = host.lower()
    labels = name.split(".")
    if (
        not name.isascii()
        or len(name) > 253
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise UsageError(
            f"invalid host {host!r}: give a DNS name (letters, digits, '-' and '.', "
            "internationalized names in their xn-- form) or an IP address"
        )
    return name


def normalize_hosts(hosts: Iterable[str]) -> tuple[str, ...]:
    """Validate extra host names; returns them normalized, de-duplicated, without the defaults."""
    defaults = {parse_host(h) for h in DEFAULT_HOSTS}
    seen: set[str | IPAddr] = set()
    out: list[str] = []
    for host in hosts:
        parsed = parse_host(host)
        if parsed in defaults or parsed in seen:
            continue
        seen.add(parsed)
        out.append(str(parsed))
    return tuple(out)
