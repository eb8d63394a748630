"""Where a webhook may go: the guard that keeps callers from aiming the service at its own network.

A URL must be http(s), without credentials, to a host that `webhooks.allowed_hosts`
lists ("hooks.example.com", "*.example.com", "*"). Every address the host
resolves to must be public (not loopback, link-local, private, shared,
reserved or a cloud metadata address) unless the host is listed exactly,
without a wildcard. The check runs at submission (a refusal is a 400) and
again inside the connection of every attempt: the delivery session resolves
through `GuardedResolver`, so a name that resolves elsewhere by then (DNS
rebinding) is refused before any byte is sent. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
# Addresses of cloud instance-metadata services that are not already link-local or private.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address) for address in ("100.100.100.200", "fd00:ec2::254", "169.254.169.254", "168.63.129.16")
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 ranges whose last 32 bits are an IPv4 address that a translator or tunnel reaches: NAT64's
# well-known prefix (RFC 6052) and the deprecated IPv4-compatible form. Python counts the first as
# global whatever IPv4 address it carries, so that address is judged instead.
_IPV4_IN_LAST_32_BITS = (
    ipaddress.ip_network("64:ff9b::/96"),
    ipaddress.ip_network("::/96"),
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (RFC 2765's SIIT), not the mapped ::ffff:0:0/96
)
# Never public, though Python counts them global: NAT64's local-use prefix (RFC 8215; where the IPv4
# address sits depends on the operator's prefix length), and the deprecated site-local fec0::/10 (RFC 3879).
_NEVER_PUBLIC = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("fec0::/10"))
# A lookup of a caller's host waits at most this long, on threads of its own: a stalling resolver makes
# a 400 (or a failed attempt), and never holds the default thread pool that gallery files are read on.
RESOLVE_TIMEOUT_S = 5.0
LOOKUP_THREADS = 4


class TargetRefused(ValueError):
    """The URL may not receive webhooks; the message says why (it reaches the client in a 400)."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    literal: IPAddress | None


def _normalise(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _resolvable_name(host: str) -> bool:
    """Whether the resolver can be asked for `host`: its IDNA form has labels of 1 to 63 characters,
    253 in all (else the resolver's own encoding fails, as a UnicodeError rather than an OSError)."""
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        return False
    return len(encoded) <= 253 and all(1 <= len(label) <= 63 for label in encoded.split(b"."))


def _carried_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one leads to (mapped, 6to4, NAT64, IPv4-compatible), if it carries one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _IPV4_IN_LAST_32_BITS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def forbidden_address(address: IPAddress) -> bool:
    """Anything but a public unicast address: loopback, link-local, private, shared, reserved, metadata,
    and IPv6 forms that lead to one of those IPv4 addresses."""
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _NEVER_PUBLIC):
            return True
        carried = _carried_ipv4(address)
        if carried is not None and forbidden_address(carried):
            return True
    return address in METADATA_ADDRESSES or not address.is_global or address.is_multicast


class TargetPolicy:
    def __init__(self, patterns: tuple[str, ...]) -> None:
        self._patterns = tuple(_normalise(pattern) for pattern in patterns if pattern.strip())
        self._lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="imagine-webhook-dns")

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    async def lookup(self, host: str, port: int, family: int = socket.AF_UNSPEC) -> list[tuple[Any, ...]]:
        """getaddrinfo for `host`, within RESOLVE_TIMEOUT_S (else TimeoutError), on the policy's own threads."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            return await loop.run_in_executor(
                self._lookups, functools.partial(socket.getaddrinfo, host, port, family, socket.SOCK_STREAM)
            )

    @property
    def enabled(self) -> bool:
        return bool(self._patterns)

    def _matches(self, host: str) -> bool:
        for pattern in self._patterns:
            if pattern == "*" or pattern == host:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False

    def explicitly_listed(self, host: str) -> bool:
        """Listed as itself, without a wildcard: only such a host may reach private addresses."""
        return _normalise(host) in self._patterns

    def address_allowed(self, host: str, address: IPAddress) -> bool:
        return self.explicitly_listed(host) or not forbidden_address(address)

    def parse(self, url: str) -> Target:
        """The URL's host and port, or TargetRefused for a scheme, form or host that is not allowed."""
        if not self.enabled:
            raise TargetRefused("webhooks are off on this service (webhooks.allowed_hosts lists no host)")
        if len(url) > MAX_URL_LENGTH:
            raise TargetRefused(f"must be at most {MAX_URL_LENGTH} characters")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise TargetRefused("is not a valid URL") from None
        if parts.scheme not in ("http", "https"):
            raise TargetRefused("must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise TargetRefused("must not carry credentials")
        host = _normalise(parts.hostname or "")
        if not host:
            raise TargetRefused("has no host")
        if port == 0:
            raise TargetRefused("must not name port 0")
        if not self._matches(host):
            raise TargetRefused(f"host {host} is not in webhooks.allowed_hosts")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is None and not _resolvable_name(host):
            raise TargetRefused(f"host {host} is not a valid host name")
        if literal is not None and not self.address_allowed(host, literal):
            raise TargetRefused(f"address {literal} is not a public address")
        return Target(host, port or (443 if parts.scheme == "https" else 80), literal)

    async def check(self, url: str) -> None:
        """`parse`, then resolve the host now: TargetRefused unless every address it has is allowed."""
        target = self.parse(url)
        if target.literal is not None:
            return
        try:
            found = await self.lookup(target.host, target.port)
        except TimeoutError:
            raise TargetRefused(f"host {target.host} did not resolve within {RESOLVE_TIMEOUT_S:g} s") from None
        except OSError:
            raise TargetRefused(f"host {target.host} does not resolve") from None
        for *_, address in found:
            ip = ipaddress.ip_address(address[0])
            if not self.address_allowed(target.host, ip):
                # Not naming the address: the answer would tell any caller what the service's own
                # network calls its hosts.
                log.info("webhook target %s refused: it resolves to %s", target.host, ip)
                raise TargetRefused(f"host {target.host} resolves to an address that is not public")


class GuardedResolver(AbstractResolver):
    """The system resolver, refusing a host if any address it resolves to is not allowed for it."""

    def __init__(self, policy: TargetPolicy) -> None:
        self._policy = policy

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            found = await self._policy.lookup(host, port, family)
        except TimeoutError:
            raise OSError(f"webhook host {host} did not resolve within {RESOLVE_TIMEOUT_S:g} s") from None
        results = []
        for address_family, _, proto, _, address in found:
            if not self._policy.address_allowed(host, ipaddress.ip_address(address[0])):
                raise OSError(f"webhook host {host} resolves to {address[0]}, which is not a public address")
            results.append(
                ResolveResult(
                    hostname=host, host=address[0], port=address[1], family=address_family, proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        return results

    async def close(self) -> None:
        """The lookup threads are the policy's, closed with it."""
