"""Several replicas of one served model behind one chat model: an :class:`EndpointPool`.

The pool sits under the OpenAI client as its HTTP transport, so a :class:`ChatVLLM` with a
pool behaves like one with a single server (structured outputs, streaming, retries within
one deadline), and each request goes to the replica with the fewest requests in flight
among those that are up. A replica that refuses connections, drops one, or answers 502,
503 or 504 is taken out and probed again later (``GET <replica>/models``, after 1 s, then
2, 4, ... up to 30 s); a request whose replica fails before answering is sent again at once
to another replica, so it is not lost. A generation request has no effect on the server, so
sending it again is safe; what is written from its reply (records, predictions) is
written once by the caller.

>>> pool = EndpointPool(["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"])
>>> [replica.url for replica in pool.stats()]
['http://10.0.0.1:8000/v1', 'http://10.0.0.2:8000/v1']
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from insightv_agents.errors import ConfigError

FIRST_PROBE_S, MAX_PROBE_S = 1.0, 30.0
PROBE_TIMEOUT_S = 2.0
FAILING_STATUSES = frozenset({502, 503, 504})
"""Statuses that take a replica out (a proxy without a backend, a server shutting down or
overloaded); other errors are the request's own."""
_LATENCY_WEIGHT = 0.2  # of the newest request in the moving average


@dataclass(frozen=True)
class ReplicaStats:
    """One replica as the pool sees it.

    Attributes:
        url: its API root.
        up: taken as working (``False``: out, until a probe answers).
        in_flight: requests sent to it and not yet answered.
        requests, errors: requests sent to it, and those that failed with it.
        latency_s: moving average of its request times (seconds; ``None`` before the first).
    """

    url: str
    up: bool
    in_flight: int
    requests: int
    errors: int
    latency_s: float | None


class _Replica:
    def __init__(self, url: str) -> None:
        self.url = url
        self.up = True
        self.in_flight = self.requests = self.errors = self.failures_in_row = 0
        self.latency_s: float | None = None
        self.probe_at = 0.0
        self.probing = False


class EndpointPool:
    """Replicas of one served model (their API roots, e.g. ``http://host:8000/v1``), each
    request sent to the least busy one that is up; thread-safe, shared by the sync and async
    clients of a model and by several models (the teacher and the scorer, say).

    Args:
        urls: the replicas' API roots (at least one; duplicates refused).

    Raises:
        ConfigError: for no URL, a URL that is not http(s), or one given twice.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        if isinstance(urls, str) or not urls:
            raise ConfigError("an endpoint pool needs a list of one or more API roots.")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ConfigError(f"an endpoint must be an http(s) URL, not {url!r}.")
        cleaned = [url.rstrip("/") for url in urls]
        if len(set(cleaned)) != len(cleaned):
            raise ConfigError(f"an endpoint is given twice: {', '.join(urls)}.")
        self._replicas = [_Replica(url) for url in cleaned]
        self._lock = threading.Lock()
        self._turn = 0

    @property
    def urls(self) -> list[str]:
        return [replica.url for replica in self._replicas]

    def stats(self) -> list[ReplicaStats]:
        """Each replica's state now."""
        with self._lock:
            return [ReplicaStats(r.url, r.up, r.in_flight, r.requests, r.errors,
                                 r.latency_s) for r in self._replicas]

    def describe(self) -> str:
        """One line per replica: whether it is up, in flight, errors, mean latency."""
        lines = []
        for replica in self.stats():
            latency = "-" if replica.latency_s is None else f"{replica.latency_s:.2f} s"
            lines.append(f"{replica.url}  {'up' if replica.up else 'DOWN'}  "
                         f"{replica.in_flight} in flight  {replica.requests} requests  "
                         f"{replica.errors} errors  {latency}")
        return "\n".join(lines)

    def transport(self, library: ModuleType, inner: Any) -> Any:
        """A synchronous HTTP transport of ``library`` (httpx) over this pool, sending
        through ``inner`` (a transport)."""
        return _transport_class(library, asynchronous=False)(self, library, inner)

    def async_transport(self, library: ModuleType, inner: Any) -> Any:
        """The asynchronous counterpart of :meth:`transport`."""
        return _transport_class(library, asynchronous=True)(self, library, inner)

    # --- choosing, and learning from what happened ---

    def _choose(self, tried: set[str]) -> tuple[_Replica | None, bool]:
        """The replica for the next attempt of a request that has ``tried`` these, and
        whether it needs a probe first: the least busy one that is up; else one out whose
        probe is due; else (all out) the one out longest, probed. ``None``: all tried."""
        now = time.monotonic()
        with self._lock:
            fresh = [r for r in self._replicas if r.url not in tried]
            if not fresh:
                return None, False
            due = [r for r in fresh if not r.up and not r.probing and r.probe_at <= now]
            if due:
                replica = min(due, key=lambda r: r.probe_at)
                replica.probing = True
                return replica, True
            up = [r for r in fresh if r.up]
            if up:
                self._turn += 1
                order = {id(r): (i - self._turn) % len(self._replicas)
                         for i, r in enumerate(self._replicas)}
                return min(up, key=lambda r: (r.in_flight, order[id(r)])), False
            replica = min(fresh, key=lambda r: r.probe_at)
            replica.probing = True
            return replica, True

    def _probed(self, replica: _Replica, answered: bool) -> None:
        with self._lock:
            replica.probing = False
            if answered:
                replica.up, replica.failures_in_row = True, 0
            else:
                self._out(replica)

    def _started(self, replica: _Replica) -> float:
        with self._lock:
            replica.in_flight += 1
            replica.requests += 1
        return time.monotonic()

    def _finished(self, replica: _Replica, started: float, failed: bool,
                  take_out: bool) -> None:
        seconds = time.monotonic() - started
        with self._lock:
            replica.in_flight -= 1
            if failed:
                replica.errors += 1
                if take_out:
                    self._out(replica)
                return
            replica.up, replica.failures_in_row = True, 0
            replica.latency_s = seconds if replica.latency_s is None else \
                (1 - _LATENCY_WEIGHT) * replica.latency_s + _LATENCY_WEIGHT * seconds

    def _out(self, replica: _Replica) -> None:  # with the lock held
        replica.up = False
        replica.failures_in_row += 1
        replica.probe_at = time.monotonic() + min(
            MAX_PROBE_S, FIRST_PROBE_S * 2 ** (replica.failures_in_row - 1))


class _PoolTransport:
    """Sends each request to a replica of the pool: the URL's API root (the model's
    ``base_url``, the pool's first replica) replaced by the chosen replica's."""

    def __init__(self, pool: EndpointPool, library: ModuleType, inner: Any) -> None:
        self._pool = pool
        self._library = library
        self._inner = inner

    def _attempts(self, request: Any) -> Iterator[tuple[_Replica | None, bool, Any]]:
        """(replica, needs a probe, the request for it) for each attempt of ``request``;
        ``(None, False, request)`` for a URL outside the pool (sent as it is)."""
        url = str(request.url)
        root = self._pool.urls[0]
        if not url.startswith(root):
            yield None, False, request
            return
        tried: set[str] = set()
        while True:
            replica, probe = self._pool._choose(tried)
            if replica is None:
                return
            tried.add(replica.url)
            headers = [(name, value) for name, value in request.headers.raw
                       if name.lower() != b"host"]
            yield replica, probe, self._library.Request(
                request.method, replica.url + url[len(root):], headers=headers,
                content=request.content, extensions=request.extensions)

    def _probe(self, replica: _Replica) -> Any:
        return self._library.Request("GET", replica.url + "/models", extensions={
            "timeout": dict.fromkeys(("connect", "read", "write", "pool"), PROBE_TIMEOUT_S)})

    def _give_up(self, request: Any, last: BaseException | None) -> BaseException:
        if last is not None:
            return last
        return self._library.ConnectError(
            f"no replica of {', '.join(self._pool.urls)} answers its probe", request=request)

    def _passes_over(self, err: BaseException) -> bool:
        """Whether the next replica is tried at once after ``err``: the replica failed
        before answering (a request that timed out has used its deadline)."""
        library = self._library
        return isinstance(err, library.TransportError) and (
            isinstance(err, library.ConnectTimeout)
            or not isinstance(err, library.TimeoutException))


class _SyncPoolTransport(_PoolTransport):
    def handle_request(self, request: Any) -> Any:
        request.read()
        last: BaseException | None = None
        for replica, probe, attempt in self._attempts(request):
            if replica is None:
                return self._inner.handle_request(attempt)
            if probe and not self._answers(replica):
                continue
            started = self._pool._started(replica)
            try:
                response = self._inner.handle_request(attempt)
            except Exception as err:
                self._pool._finished(replica, started, True, self._passes_over(err))
                if not self._passes_over(err):
                    raise
                last = err
                continue
            return self._library.Response(
                response.status_code, headers=response.headers, extensions=response.extensions,
                stream=_tracked(self._library, False)(response, _release(
                    self._pool, replica, started, response.status_code)))
        raise self._give_up(request, last)

    def _answers(self, replica: _Replica) -> bool:
        try:
            response = self._inner.handle_request(self._probe(replica))
            response.read()
            response.close()
            answered = response.status_code < 500
        except Exception:
            answered = False
        self._pool._probed(replica, answered)
        return answered

    def close(self) -> None:
        self._inner.close()


class _AsyncPoolTransport(_PoolTransport):
    async def handle_async_request(self, request: Any) -> Any:
        await request.aread()
        last: BaseException | None = None
        for replica, probe, attempt in self._attempts(request):
            if replica is None:
                return await self._inner.handle_async_request(attempt)
            if probe and not await self._answers(replica):
                continue
            started = self._pool._started(replica)
            try:
                response = await self._inner.handle_async_request(attempt)
            except BaseException as err:  # a cancelled request ends its replica's count too
                self._pool._finished(replica, started, True, self._passes_over(err))
                if not self._passes_over(err):
                    raise
                last = err
                continue
            return self._library.Response(
                response.status_code, headers=response.headers, extensions=response.extensions,
                stream=_tracked(self._library, True)(response, _release(
                    self._pool, replica, started, response.status_code)))
        raise self._give_up(request, last)

    async def _answers(self, replica: _Replica) -> bool:
        try:
            response = await self._inner.handle_async_request(self._probe(replica))
            await response.aread()
            await response.aclose()
            answered = response.status_code < 500
        except Exception:
            answered = False
        self._pool._probed(replica, answered)
        return answered

    async def aclose(self) -> None:
        await self._inner.aclose()


def _release(pool: EndpointPool, replica: _Replica, started: float,
             status: int) -> Callable[[bool], None]:
    """What ends a response's count on its replica, once: ``release(failed)``, failed when
    its body could not be read whole."""
    done = threading.Event()

    def release(failed: bool) -> None:
        if not done.is_set():
            done.set()
            failing = status in FAILING_STATUSES
            pool._finished(replica, started, failed or failing, failed or failing)
    return release


@functools.cache
def _transport_class(library: ModuleType, asynchronous: bool) -> type:
    """The pool transport as a transport class of ``library`` (httpx or httpx2)."""
    if asynchronous:
        return type("AsyncPoolTransport", (_AsyncPoolTransport, library.AsyncBaseTransport), {})
    return type("PoolTransport", (_SyncPoolTransport, library.BaseTransport), {})


class _Tracked:
    """A response body that ends its request's count on its replica when closed (a body
    that breaks off counts as the replica's failure)."""

    def __init__(self, response: Any, release: Callable[[bool], None]) -> None:
        self._response = response
        self._release = release

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._response.stream
        except Exception:
            self._release(True)
            raise

    def close(self) -> None:
        try:
            self._response.close()
        finally:
            self._release(False)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.stream:
                yield chunk
        except Exception:
            self._release(True)
            raise

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            self._release(False)


@functools.cache
def _tracked(library: ModuleType, asynchronous: bool) -> type[_Tracked]:
    base = library.AsyncByteStream if asynchronous else library.SyncByteStream
    return type("TrackedStream", (_Tracked, base), {})
