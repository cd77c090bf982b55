"""The one way to Square: a long-lived `httpx.AsyncClient`, per-merchant SDK clients on it, and
a fast path for the high-volume calls.

Every call the product makes sends the SDK's requests (path, JSON body, Bearer token,
Square-Version) straight over the shared client and decodes with our slim models: the SDK's
decoding costs ~3.7 ms per order (square-api.md §15), and ~3 ms of CPU even for a token status,
merchant or location list (a third of a 200-merchant discovery's CPU, issue 11). SearchOrders
pages decode with msgspec. The SDK client stays for `merchants/me` when a token status does
not name its merchant.

Every request made with a merchant's token first needs Square's word on whose token it is
(RetrieveTokenStatus, once per token per process): a token filed under another merchant's id
raises `TokenMerchantMismatch` before anything but that check is sent with it.

Reads retry 429 (after Retry-After, or exponential backoff with jitter), 5xx and timeouts a
bounded number of times, then raise a typed error from `services.errors`. UpdateOrder is never
retried here: the completion engine owns those retries, always with the same idempotency key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from services.credentials import MerchantCredentials
from services.errors import (
    SquareApiError,
    SquareAuthError,
    SquareInvalidRequest,
    SquareNotFound,
    SquareRateLimited,
    SquareScopeError,
    SquareServerError,
    SquareUnavailable,
    TokenMerchantMismatch,
)
from services.http_transport import AiohttpWire, HttpxWire, Wire, WireFailure
from services.square_models import (
    Location,
    Merchant,
    OrderStruct,
    TokenStatus,
    decode_order_envelope,
    decode_orders_batch,
    decode_search_page,
)

if TYPE_CHECKING:
    # The SDK (~0.4 s of start-up with its pydantic models) and httpx (~70 ms) are imported
    # where they are used: the SDK client's rare calls, and a client handed in by tests.
    import httpx
    from square import AsyncSquare

__all__ = ["SQUARE_VERSION", "RetryPolicy", "SquareGateway", "error_from_response"]

SQUARE_VERSION = "2026-09-16"
T = TypeVar("T")


def error_from_response(status: int, body: Any, headers: Any = None) -> SquareApiError:
    """Square's error envelope -> our typed error (never includes the request's token)."""
    errors = body.get("errors") if isinstance(body, dict) else None
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) \
        else {}
    code = str(first.get("code") or "UNKNOWN")
    detail = str(first.get("detail") or f"HTTP {status}")[:500]
    field = first.get("field")
    category = str(first.get("category") or "")
    retry_after = None
    if headers is not None:
        raw = headers.get("retry-after")
        try:
            retry_after = float(raw) if raw is not None else None
        except ValueError:
            retry_after = None
    kind: type[SquareApiError]
    if status == 429:
        kind = SquareRateLimited
    elif status == 403 and code == "INSUFFICIENT_SCOPES":
        kind = SquareScopeError
    elif status in (401, 403):
        kind = SquareAuthError
    elif status == 404:
        kind = SquareNotFound
    elif status >= 500:
        kind = SquareServerError
    else:
        kind = SquareInvalidRequest
    return kind(status=status, code=code, detail=detail, field=field, category=category,
                retry_after=retry_after)


def is_transient(error: BaseException) -> bool:
    return isinstance(error, (SquareRateLimited, SquareServerError, SquareUnavailable))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries for reads: Retry-After when Square gives one, else backoff with jitter."""

    attempts: int = 5
    base_delay_s: float = 0.25
    max_delay_s: float = 20.0
    rng: random.Random = random.Random()  # noqa: RUF009 - shared jitter source is fine

    def delay(self, attempt: int, error: BaseException | None) -> float:
        if isinstance(error, SquareApiError) and error.retry_after is not None:
            return min(self.max_delay_s, max(0.0, error.retry_after))
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return backoff * (0.5 + self.rng.random() / 2)

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        return self.delay(state.attempt_number, error)

    async def run(self, call: Callable[[], Awaitable[T]],
                  on_retry: Callable[[BaseException, float], None] | None = None) -> T:
        def before_sleep(state: RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None:
                error = state.outcome.exception()
                if error is not None:
                    on_retry(error, state.next_action.sleep if state.next_action else 0.0)

        retrying = AsyncRetrying(stop=stop_after_attempt(self.attempts), wait=self._wait,
                                 retry=retry_if_exception(is_transient), reraise=True,
                                 before_sleep=before_sleep)
        async for attempt in retrying:
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover


class SquareGateway:
    """Talks to one Square base URL for many merchants over one pooled HTTP client."""

    def __init__(self, base_url: str, http: httpx.AsyncClient | None = None, *,
                 timeout_s: float = 20.0, retry: RetryPolicy | None = None,
                 max_connections: int = 64) -> None:
        self.base_url = base_url.rstrip("/")
        self._owns_http = http is None
        self._http = http
        self._max_connections = max_connections
        # Our own requests: over the client handed in (in-process tests), else over aiohttp,
        # a quarter of httpx's CPU per request (services/http_transport.py).
        self._wire: Wire = HttpxWire(http) if http is not None else AiohttpWire(max_connections)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._sdk: dict[str, AsyncSquare] = {}
        # Whose token it is, as Square said, keyed by a digest of the token (never the token).
        self._owners: dict[str, str] = {}
        # Owners recalled from the store (`recall_owner`), apart: Square's answers this run
        # (`_owners`) come first, and a recalled one never stands in for one of them.
        self._recalled: dict[str, str] = {}
        self._identity_locks: dict[str, asyncio.Lock] = {}

    @property
    def http(self) -> httpx.AsyncClient:
        """The SDK's HTTP client: the one handed in, or our own, made when first needed."""
        if self._http is None:
            import httpx

            from services.sdk_transport import ShardedTransport

            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                transport=ShardedTransport(shards=max(1, self._max_connections // 2)))
        return self._http

    async def aclose(self) -> None:
        await self._wire.aclose()
        if self._owns_http and self._http is not None:
            await self._http.aclose()

    # ------------------------------------------------------------------ token identity
    def recall_owner(self, creds: MerchantCredentials, confirmed_sha256: object) -> None:
        """Take `creds`'s token as its merchant's without asking, if `confirmed_sha256` (what
        the store kept when Square last confirmed this merchant's token) is this token's
        digest (`confirmation_sha256`). A token's owner never changes; another token, this
        one filed under another merchant, or one confirmed by another Square (the emulator,
        the sandbox) is still asked about before anything is sent with it."""
        key = _token_key(creds)
        if isinstance(confirmed_sha256, str) and key not in self._owners and \
                hmac.compare_digest(confirmed_sha256.encode(),  # bytes: any text compares
                                    self.confirmation_sha256(creds).encode()):
            self._recalled[key] = creds.merchant_id

    def confirmation_sha256(self, creds: MerchantCredentials) -> str:
        """What the store keeps once this Square has confirmed whose the token is: a digest
        of this Square's address and the token (never the token itself)."""
        return hashlib.sha256(f"{self.base_url}\n".encode()
                              + creds.access_token.get_secret_value().encode()).hexdigest()

    def owner_confirmed(self, creds: MerchantCredentials) -> bool:
        """Whether Square has said (this run, or as recalled) that the token is `creds`'s
        merchant's: requests with it then go out without waiting for the check."""
        return self._owner(_token_key(creds)) == creds.merchant_id

    def _owner(self, key: str) -> str | None:
        """Whose the token is: as Square said this run, else as recalled, else unknown."""
        return self._owners.get(key, self._recalled.get(key))

    async def ensure_identity(self, creds: MerchantCredentials) -> None:
        """Raise `TokenMerchantMismatch` unless Square said this token is `creds.merchant_id`'s.
        Asks once per token (one attempt: callers sit inside their own retries); concurrent
        callers wait for that one answer."""
        key = _token_key(creds)
        owner = self._owner(key)
        if owner is None:
            lock = self._identity_locks.setdefault(key, asyncio.Lock())
            async with lock:
                owner = self._owners.get(key)
                if owner is None:
                    owner = await self._ask_owner(creds)
                    self._owners[key] = owner
        if owner != creds.merchant_id:
            raise TokenMerchantMismatch(creds.merchant_id, owner)

    async def _ask_owner(self, creds: MerchantCredentials) -> str:
        status = await self._fetch_token_status(creds)
        if status.merchant_id:
            return status.merchant_id
        # Square always names the merchant here; if it ever does not, merchants/me does.
        response = await self._sdk_once(lambda: self._client(creds).merchants.get(
            "me", request_options=self._NO_SDK_RETRY))
        if response.merchant is None or not response.merchant.id:
            raise SquareApiError(status=200, code="UNEXPECTED_RESPONSE",
                                 detail="Square did not say whose access token this is.")
        return response.merchant.id

    async def _fetch_token_status(self, creds: MerchantCredentials) -> TokenStatus:
        # The identity check itself: the one request sent before Square named the owner.
        content = await self._send_unchecked(creds, "POST", "/oauth2/token/status")
        return _validate(TokenStatus, content)

    # ------------------------------------------------------------------ SDK (low volume)
    def _client(self, creds: MerchantCredentials) -> AsyncSquare:
        """The official SDK client for one merchant, on the shared HTTP client. Private: every
        use goes through `_sdk_call`, which checks the token's identity first."""
        # Keyed by the token, not the merchant: a re-read credentials file with a new token
        # must not reuse a client that sends the old (unchecked) one.
        key = _token_key(creds)
        client = self._sdk.get(key)
        if client is None:
            from square import AsyncSquare

            secret = creds.access_token
            client = AsyncSquare(base_url=self.base_url, token=lambda: secret.get_secret_value(),
                                 httpx_client=self.http, version=SQUARE_VERSION,
                                 timeout=self.timeout_s)
            self._sdk[key] = client
        return client

    async def _sdk_once(self, call: Callable[[], Awaitable[T]]) -> T:
        import httpx
        from square.core.api_error import ApiError

        try:
            # A total deadline as in `send`: httpx's own ones do not bound an ASGI answer.
            async with asyncio.timeout(self.timeout_s):
                return await call()
        except TimeoutError:
            raise SquareUnavailable(f"Square ({self.base_url}) did not answer within "
                                    f"{self.timeout_s:g} s: check the network and retry.") from None
        except ApiError as error:
            raise error_from_response(error.status_code or 0, error.body,
                                      error.headers or {}) from None
        except httpx.TransportError as error:
            raise SquareUnavailable(_transport_sentence(
                self.base_url, type(error).__name__,
                isinstance(error, httpx.TimeoutException))) from None

    async def _sdk_call(self, creds: MerchantCredentials,
                        call: Callable[[AsyncSquare], Awaitable[T]]) -> T:
        async def once() -> T:
            await self.ensure_identity(creds)
            return await self._sdk_once(lambda: call(self._client(creds)))
        return await self.retry.run(once)

    _NO_SDK_RETRY: Any = {"max_retries": 0}

    async def token_status(self, creds: MerchantCredentials) -> TokenStatus:
        """The token's scopes and expiry; also the identity check (raises on a mismatch)."""
        async def once() -> TokenStatus:
            status = await self._fetch_token_status(creds)
            if status.merchant_id:
                # Not over an owner Square named meanwhile: merchants/me, asked beside the
                # status of a recalled token, may have said it is another merchant's.
                self._owners.setdefault(_token_key(creds), status.merchant_id)
            await self.ensure_identity(creds)
            return status
        return await self.retry.run(once)

    async def merchant(self, creds: MerchantCredentials) -> Merchant:
        content = await self.retry.run(partial(self.send, creds, "GET", "/v2/merchants/me"))
        merchant = _validate(_MerchantEnvelope, content).merchant
        if merchant.id != creds.merchant_id:  # Square's second word on it must agree too
            self._owners[_token_key(creds)] = merchant.id
            raise TokenMerchantMismatch(creds.merchant_id, merchant.id)
        return merchant

    async def locations(self, creds: MerchantCredentials) -> list[Location]:
        content = await self.retry.run(partial(self.send, creds, "GET", "/v2/locations"))
        return list(_validate(_LocationList, content).locations or ())

    # ------------------------------------------------------------------ fast path
    def _headers(self, creds: MerchantCredentials) -> dict[str, str]:
        return {"Authorization": f"Bearer {creds.access_token.get_secret_value()}",
                "Square-Version": SQUARE_VERSION, "Content-Type": "application/json",
                "Accept": "application/json"}

    async def send(self, creds: MerchantCredentials, method: str, path: str,
                   body: dict[str, Any] | None = None, *, timeout_s: float | None = None
                   ) -> bytes:
        """One request, no retries: the body of a 2xx answer, or a typed error."""
        await self.ensure_identity(creds)
        return await self._send_unchecked(creds, method, path, body, timeout_s=timeout_s)

    async def _send_unchecked(self, creds: MerchantCredentials, method: str, path: str,
                              body: dict[str, Any] | None = None, *,
                              timeout_s: float | None = None) -> bytes:
        """`send` without the identity check: only the check itself uses it."""
        limit = timeout_s or self.timeout_s
        try:
            # A total deadline as well as the wire's own: a trickling or in-process (ASGI)
            # answer is bounded too.
            async with asyncio.timeout(limit):
                status, content, headers = await self._wire.request(
                    method, self.base_url + path, self._headers(creds),
                    orjson.dumps(body) if body is not None else None, limit)
        except TimeoutError:
            raise SquareUnavailable(f"Square ({self.base_url}) did not answer within {limit:g} s: "
                                    "check the network and retry.") from None
        except WireFailure as failure:
            raise SquareUnavailable(_transport_sentence(self.base_url, failure.kind,
                                                        failure.timeout)) from None
        if status >= 400:
            try:
                data = orjson.loads(content) if content else {}
            except orjson.JSONDecodeError:
                data = {"errors": [{"code": "NOT_JSON", "category": "API_ERROR",
                                    "detail": f"Square answered {status} with "
                                              "a body that is not JSON."}]}
            raise error_from_response(status, data, headers)
        return content or b"{}"

    async def raw(self, creds: MerchantCredentials, method: str, path: str,
                  body: dict[str, Any] | None = None, *, timeout_s: float | None = None
                  ) -> Any:
        """One request, no retries: the decoded JSON body, or a typed error."""
        return orjson.loads(await self.send(creds, method, path, body, timeout_s=timeout_s))

    async def search_orders(self, creds: MerchantCredentials, location_ids: list[str],
                            query: dict[str, Any], limit: int = 1000
                            ) -> AsyncIterator[list[OrderStruct]]:
        """Every page of SearchOrders, resending the original query with each cursor."""
        cursor: str | None = None
        while True:
            body: dict[str, Any] = {"location_ids": location_ids, "query": query,
                                    "limit": limit}
            if cursor:
                body["cursor"] = cursor
            content = await self.retry.run(
                partial(self.send, creds, "POST", "/v2/orders/search", body))
            # Straight from bytes to slim msgspec Structs: no dicts in between (issue 11).
            page = _decode(decode_search_page, content)
            yield page.orders
            cursor = page.cursor
            if not cursor:
                return

    async def batch_retrieve(self, creds: MerchantCredentials, order_ids: list[str]
                             ) -> list[OrderStruct]:
        found: list[OrderStruct] = []
        for start in range(0, len(order_ids), 100):
            chunk = order_ids[start:start + 100]
            content = await self.retry.run(partial(
                self.send, creds, "POST", "/v2/orders/batch-retrieve", {"order_ids": chunk}))
            found.extend(_decode(decode_orders_batch, content))
        return found

    async def update_order(self, creds: MerchantCredentials, order_id: str,
                           body: dict[str, Any], timeout_s: float | None = None
                           ) -> OrderStruct | None:
        """One UpdateOrder attempt; the caller retries with the same idempotency key."""
        content = await self.send(creds, "PUT", f"/v2/orders/{order_id}", body,
                                  timeout_s=timeout_s)
        return _decode(decode_order_envelope, content)


class _MerchantEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore")
    merchant: Merchant


class _LocationList(BaseModel):
    model_config = ConfigDict(extra="ignore")
    locations: tuple[Location, ...] | None = None


def _token_key(creds: MerchantCredentials) -> str:
    """The digest a token is known by in this process (never the token itself)."""
    return hashlib.sha256(creds.access_token.get_secret_value().encode()).hexdigest()


def _decode(decoder: Callable[[bytes], T], data: bytes) -> T:
    """A msgspec decoder's answer, or Square's answer named as the wrong shape."""
    try:
        return decoder(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise SquareApiError(status=200, code="UNEXPECTED_RESPONSE",
                             detail="Square's answer did not have the expected shape: "
                                    f"{str(error)[:200]}") from None


def _validate(model: type[T], data: Any) -> T:
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data)  # type: ignore[attr-defined]
        return model.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as error:
        raise SquareApiError(status=200, code="UNEXPECTED_RESPONSE",
                             detail=f"Square's answer did not have the expected shape: "
                                    f"{error.errors()[0]['msg']}") from None


def _transport_sentence(base_url: str, kind: str, timeout: bool) -> str:
    if timeout:
        return f"Square ({base_url}) did not answer in time: check the network and retry."
    return (f"Cannot reach Square at {base_url} ({kind}): check the network "
            "or --square-base-url and retry.")
