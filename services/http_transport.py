"""How the gateway's requests reach Square: one pooled client per process.

Two wires, the same contract (`Wire.request`: status, body bytes, headers; a `WireFailure`
when nothing usable came back):

- `AiohttpWire`, the default for real sockets. Measured on these machines against the loopback
  emulator (issue 11): per 1.16 MB SearchOrders page of 500 orders, httpx 4-5 ms of client CPU,
  httpx on an aiohttp transport ~2.3 ms, aiohttp alone ~0.9 ms; per small request (token
  status, UpdateOrder) 1.3-1.7 ms, 0.6 ms and 0.26 ms. httpx's cost is its own layers plus
  anyio pausing and resuming the socket for every 64 KB read; aiohttp parses in C and reads
  whole buffers. 200 pages and 600 small requests per discovery, 5,000 UpdateOrders per
  completion: seconds of a 2-core machine.
- `HttpxWire`, for an `httpx.AsyncClient` handed in (tests serve the emulator in-process with
  `httpx.ASGITransport`, which aiohttp cannot reach).

The official SDK keeps its own httpx client (`ShardedTransport`, services/sdk_transport.py) for
the few calls it still makes. Same requests either way: path, JSON body, `Authorization: Bearer`,
`Square-Version`; redirects are never followed (httpx's default).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import aiohttp
    import httpx

__all__ = ["AiohttpWire", "HttpxWire", "Wire", "WireFailure", "trust_store_context"]


class WireFailure(Exception):
    """No answer: the connection failed or broke (`timeout`: a transport-level timeout)."""

    def __init__(self, kind: str, timeout: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.timeout = timeout


class Wire(Protocol):
    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes | None, timeout_s: float
                      ) -> tuple[int, bytes, Mapping[str, str]]: ...

    async def aclose(self) -> None: ...


class HttpxWire:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes | None, timeout_s: float
                      ) -> tuple[int, bytes, Mapping[str, str]]:
        import httpx  # loaded already: the caller made the client (kept off start-up)

        try:
            response = await self.http.request(method, url, headers=headers, content=content,
                                               timeout=timeout_s)
        except httpx.TransportError as error:
            raise WireFailure(type(error).__name__,
                              isinstance(error, httpx.TimeoutException)) from None
        return response.status_code, response.content, response.headers

    async def aclose(self) -> None:
        """The client was handed in: its owner closes it."""


def trust_store_context() -> ssl.SSLContext:
    """httpx's trust store (SSL_CERT_FILE, else SSL_CERT_DIR, else certifi), made as
    `httpx.create_ssl_context()` makes it, so the same certificates are trusted whichever wire
    carries a request (tests/test_http_wire.py compares the two): without importing httpx,
    ~0.1 s of CPU on every command that dials Square over https."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


class AiohttpWire:
    """One `aiohttp.ClientSession` (a pool of up to `max_connections` keep-alive connections),
    made on first use in the running event loop, and made anew if a later call runs in
    another loop (a session belongs to the loop it was made in)."""

    def __init__(self, max_connections: int = 64) -> None:
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tls: ssl.SSLContext | None = None
        self._proxies: dict[str, str | None] = {}

    def _tls_context(self) -> ssl.SSLContext:
        # Loading the CA bundle costs ~30 ms: https only.
        if self._tls is None:
            self._tls = trust_store_context()
        return self._tls

    def _client(self, https: bool) -> aiohttp.ClientSession:
        import aiohttp  # only when a socket is really dialled

        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections,
                                               ssl=self._tls_context() if https else True),
                # Deadlines are the caller's (asyncio.timeout around each request). No
                # trust_env: it costs two thread hops per request and lets a ~/.netrc entry
                # clash with our Authorization header; proxies are read once (`_proxy`).
                timeout=aiohttp.ClientTimeout(total=None))
            self._loop = loop
        return self._session

    def _proxy(self, url: str) -> str | None:
        """The environment's proxy for this URL's scheme and host, as httpx would use it."""
        # Keyed by the URL up to its path: no parsing per request (5,000 per completion).
        end = url.find("/", url.find("//") + 2)
        origin = url if end < 0 else url[:end]
        if origin not in self._proxies:
            parts = urlsplit(url)
            proxies = urllib.request.getproxies()
            self._proxies[origin] = None if (parts.hostname and urllib.request.proxy_bypass(
                parts.hostname)) else proxies.get(parts.scheme) or proxies.get("all")
        return self._proxies[origin]

    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes | None, timeout_s: float
                      ) -> tuple[int, bytes, Mapping[str, str]]:
        import aiohttp

        session = self._client(url.startswith("https:"))
        try:
            async with session.request(method, url, headers=dict(headers), data=content,
                                       allow_redirects=False,
                                       proxy=self._proxy(url)) as response:
                return response.status, await response.read(), response.headers
        except aiohttp.ClientError as error:
            raise WireFailure(type(error).__name__,
                              isinstance(error, aiohttp.ServerTimeoutError)) from None
        except OSError as error:
            raise WireFailure(type(error).__name__) from None

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._loop is asyncio.get_running_loop():
            await session.close()
