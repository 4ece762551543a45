"""Several replicas of one served model behind one chat model: an :class:`EndpointPool`.

The pool sits under the OpenAI client as its HTTP transport, so a :class:`ChatVLLM` with a
pool behaves like one with a single server (structured outputs, streaming, retries within
one deadline), and each request goes to the replica with the fewest requests in flight
among those that are up. A replica that refuses connections, drops one, or answers 502,
503 or 504 is taken out and probed again later (``GET <replica>/models``, at most 2 s, after
1 s, then 2, 4, ... up to 30 s); the request it failed is sent at once to another replica,
within the time the request had, so it is not lost. A generation request has no effect on
the server, so sending it again is safe; what is written from its reply (records,
predictions) is written once by the caller. A request refused for itself (400, 413, 422)
is not sent elsewhere.

>>> pool = EndpointPool(["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"])
>>> pool.urls
['http://10.0.0.1:8000/v1', 'http://10.0.0.2:8000/v1']
>>> pool.stats()[0].up, pool.stats()[0].in_flight
(True, 0)
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
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
_MAX_DOUBLINGS = 6  # 1 s doubled 5 times passes MAX_PROBE_S
_Step = tuple[str, Any]  # a step of a request's routing: ("send", request) or ("drain", response)


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
        whether to probe it first: one out whose probe is due (probed before the request is
        sent, at most ``PROBE_TIMEOUT_S``, once per interval); else the least busy one that
        is up; else (all out) the one whose probe is due soonest, probed unless another
        request is probing it. ``None``: all tried."""
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
            idle = [r for r in fresh if not r.probing]
            if not idle:
                return min(fresh, key=lambda r: r.probe_at), False
            replica = min(idle, key=lambda r: r.probe_at)
            replica.probing = True
            return replica, True

    def _probed(self, replica: _Replica, answered: bool | None) -> None:
        """A probe's end: answered, failed, or ``None``: cut short (cancelled)."""
        with self._lock:
            replica.probing = False
            if answered:
                replica.up, replica.failures_in_row = True, 0
            elif answered is False:
                self._out(replica, failed_probe=True)

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

    def _out(self, replica: _Replica, failed_probe: bool = False) -> None:  # lock held
        """Take ``replica`` out; its next probe 1 s later, doubling with each failed probe
        up to 30 s (more requests failing on it while it is out change nothing)."""
        if not replica.up and not failed_probe:
            return
        replica.up = False
        replica.failures_in_row = min(replica.failures_in_row + 1, _MAX_DOUBLINGS)
        replica.probe_at = time.monotonic() + min(
            MAX_PROBE_S, FIRST_PROBE_S * 2 ** (replica.failures_in_row - 1))


class _PoolTransport:
    """Sends each request to a replica of the pool: the URL's API root (the model's
    ``base_url``, the pool's first replica) replaced by the chosen replica's. Each attempt
    after the first gets the time the first had, less what has passed."""

    def __init__(self, pool: EndpointPool, library: ModuleType, inner: Any) -> None:
        self._pool = pool
        self._library = library
        self._inner = inner
        # the roots as the HTTP library writes URLs (lower-case host, no default port)
        self._roots = {replica.url: str(library.URL(replica.url)).rstrip("/")
                       for replica in pool._replicas}

    def _attempts(self, request: Any) -> Iterator[tuple[_Replica | None, bool, Any]]:
        """(replica, probe it first, the request for it) for each attempt of ``request``;
        ``(None, False, request)`` for a URL outside the pool (sent as it is). Ends when
        every replica was tried or the request's time is up."""
        url = str(request.url)
        root = self._roots[self._pool.urls[0]]
        if not url.startswith(root):
            yield None, False, request
            return
        began = time.monotonic()
        tried: set[str] = set()
        while True:
            extensions = _time_left(request.extensions, time.monotonic() - began)
            if extensions is None:
                return
            replica, probe = self._pool._choose(tried)
            if replica is None:
                return
            tried.add(replica.url)
            headers = [(name, value) for name, value in request.headers.raw
                       if name.lower() != b"host"]
            yield replica, probe, self._library.Request(
                request.method, self._roots[replica.url] + url[len(root):], headers=headers,
                content=request.content, extensions=extensions)

    def _probe(self, replica: _Replica) -> Any:
        return self._library.Request("GET", self._roots[replica.url] + "/models", extensions={
            "timeout": dict.fromkeys(("connect", "read", "write", "pool"), PROBE_TIMEOUT_S)})

    def _give_up(self, request: Any, last: BaseException | None) -> BaseException:
        if last is not None:
            return last
        return self._library.ConnectError(
            f"no replica of {', '.join(self._pool.urls)} answers its probe", request=request)

    def _passes_over(self, err: BaseException) -> bool:
        """Whether the replica failed before answering, so the request goes to the next one
        at once (a request that timed out has used its time)."""
        library = self._library
        return isinstance(err, library.TransportError) and (
            isinstance(err, library.ConnectTimeout)
            or not isinstance(err, library.TimeoutException))

    def _ended(self, replica: _Replica, started: float, err: BaseException) -> None:
        """A request that raised ``err`` on ``replica``: a failure of the replica, or (a
        cancelled call) nobody's."""
        if isinstance(err, Exception):
            self._pool._finished(replica, started, True, self._passes_over(err))
        else:
            with self._pool._lock:
                replica.in_flight -= 1

    def _route(self, request: Any, asynchronous: bool) -> Generator[_Step, Any, Any]:
        """The pool's handling of ``request``, without I/O of its own: it yields each step
        (``("send", request)``: a response; ``("drain", response)``: its body read and the
        response closed), is sent each step's result or has its error thrown in, and returns
        the response to hand back. The sync and async transports run it."""
        last: BaseException | None = None
        final: Any = None
        for replica, probe, attempt in self._attempts(request):
            if replica is None:
                return (yield "send", attempt)
            if probe and not (yield from self._answers(replica)):
                continue
            started = self._pool._started(replica)
            try:
                response = yield "send", attempt
            except BaseException as err:  # a cancelled call ends its count too
                self._ended(replica, started, err)
                if not self._passes_over(err):
                    raise
                last, final = err, None
                continue
            if response.status_code in FAILING_STATUSES and len(self._pool.urls) > 1:
                content = yield "drain", response  # this replica cannot serve it: the next may
                self._pool._finished(replica, started, True, True)
                final = self._library.Response(response.status_code,
                                               headers=response.headers, content=content)
                last = None
                continue
            failing = response.status_code in FAILING_STATUSES
            release = _release(self._pool, replica, started, failing, self._passes_over)
            return self._library.Response(
                response.status_code, headers=response.headers,
                extensions=response.extensions,
                stream=_tracked(self._library, asynchronous)(response, release))
        if final is not None and last is None:
            return final  # the last replica tried answered so: the caller sees that answer
        raise self._give_up(request, last)

    def _answers(self, replica: _Replica) -> Generator[_Step, Any, bool]:
        """Probe ``replica`` (steps of :meth:`_route`): whether it answers."""
        answered: bool | None = None
        try:
            response = yield "send", self._probe(replica)
            yield "drain", response
            answered = response.status_code < 500
        except Exception:
            answered = False
        finally:
            self._pool._probed(replica, answered)
        return answered


class _SyncPoolTransport(_PoolTransport):
    def handle_request(self, request: Any) -> Any:
        request.read()
        route = self._route(request, asynchronous=False)
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                kind, subject = route.throw(error) if error is not None else route.send(result)
            except StopIteration as done:
                return done.value
            try:
                result, error = self._step(kind, subject), None
            except BaseException as err:
                result, error = None, err

    def _step(self, kind: str, subject: Any) -> Any:
        if kind == "send":
            return self._inner.handle_request(subject)
        try:
            return subject.read()
        finally:
            subject.close()

    def close(self) -> None:
        self._inner.close()


class _AsyncPoolTransport(_PoolTransport):
    async def handle_async_request(self, request: Any) -> Any:
        await request.aread()
        route = self._route(request, asynchronous=True)
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                kind, subject = route.throw(error) if error is not None else route.send(result)
            except StopIteration as done:
                return done.value
            try:
                result, error = await self._step(kind, subject), None
            except BaseException as err:
                result, error = None, err

    async def _step(self, kind: str, subject: Any) -> Any:
        if kind == "send":
            return await self._inner.handle_async_request(subject)
        try:
            return await subject.aread()
        finally:
            await subject.aclose()

    async def aclose(self) -> None:
        await self._inner.aclose()


def _time_left(extensions: dict[str, Any], elapsed: float) -> dict[str, Any] | None:
    """``extensions`` with each timeout less ``elapsed`` (``None``: one has run out)."""
    timeouts = extensions.get("timeout")
    if not elapsed or not isinstance(timeouts, dict):
        return extensions
    left = {name: None if value is None else value - elapsed
            for name, value in timeouts.items()}
    if any(value is not None and value <= 0 for value in left.values()):
        return None
    return {**extensions, "timeout": left}


def _release(pool: EndpointPool, replica: _Replica, started: float, failing: bool,
             passes_over: Callable[[BaseException], bool]
             ) -> Callable[[BaseException | None], None]:
    """What ends a response's count on its replica, once: ``release(error)`` with the error
    that broke its body off, if one did (a replica that dropped it is taken out; one too
    slow for the call's time is not)."""
    lock = threading.Lock()
    done = False

    def release(error: BaseException | None) -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        broken = error is not None and passes_over(error)
        failed = failing or error is not None
        pool._finished(replica, started, failed, failing or broken)
    return release


@functools.cache
def _transport_class(library: ModuleType, asynchronous: bool) -> type:
    """The pool transport as a transport class of ``library`` (httpx or httpx2)."""
    if asynchronous:
        return type("AsyncPoolTransport", (_AsyncPoolTransport, library.AsyncBaseTransport), {})
    return type("PoolTransport", (_SyncPoolTransport, library.BaseTransport), {})


class _Tracked:
    """A response body that ends its request's count on its replica when closed, or when
    dropped unclosed (collected)."""

    def __init__(self, response: Any, release: Callable[[BaseException | None], None]) -> None:
        self._response = response
        self._release = release
        weakref.finalize(self, release, None)

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._response.stream
        except Exception as err:
            self._release(err)
            raise

    def close(self) -> None:
        try:
            self._response.close()
        finally:
            self._release(None)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.stream:
                yield chunk
        except Exception as err:
            self._release(err)
            raise

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            self._release(None)


@functools.cache
def _tracked(library: ModuleType, asynchronous: bool) -> type[_Tracked]:
    base = library.AsyncByteStream if asynchronous else library.SyncByteStream
    return type("TrackedStream", (_Tracked, base), {})
