"""Synthesis and evaluation spread over the workers of a Ray cluster (``--ray``).

:func:`run_on_ray` runs a per-item job (synthesis's :func:`~insightv_agents.synthesize.
synthesis_step`, evaluation's :func:`~insightv_agents.evaluate.prediction_step`) on Ray
actors. Worker ``i`` appends each item's group of records to its own shard,
``<out>/<stem>.<i>.jsonl`` (a :class:`~insightv_agents.records.RecordLog`, as a single run
writes), and the driver hands out items a batch at a time. When a worker dies, the driver
reads what its shard holds, starts another worker on the same shard and gives it the rest
of the batch; when all items are done, the shards are merged into ``<out>/<stem>.jsonl``,
each item's group once, and removed. A killed driver resumes from the main file and the
shards: rerun the same command.

Each worker builds its own models (``build`` runs in the worker: an endpoint pool of the
servers, a model in-process, or a vLLM server on its node), so nothing but items and
records crosses the cluster. The workers write the output folder and read the data folder
themselves: on a cluster of several machines both must be on storage every node mounts at
the same path (NFS, a cluster file system), as Ray's own jobs require of their storage.

Ray is an optional extra: ``pip install 'insightv-agents[ray]'``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insightv_agents.errors import ConfigError, check_int
from insightv_agents.records import RecordLog, merge_shards, shards
from insightv_agents.synthesize import Item

ItemStep = Callable[[Item], Awaitable[list[dict[str, Any]]]]
"""One item's job: its group of records (an error raised is the item's error)."""
MAX_RESTARTS = 3
"""Workers started again on one shard before its items go to the others."""


@dataclass
class RayReport:
    """What a run on Ray did.

    Attributes:
        total, skipped, written: items asked for, already done before, done now.
        errors: (id, message) of items whose job raised (left for the next run).
        restarts: workers started again after one died.
        per_worker: items each worker index wrote.
        merged: groups moved from the shards into the main file.
    """

    total: int = 0
    skipped: int = 0
    written: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    restarts: int = 0
    per_worker: dict[int, int] = field(default_factory=dict)
    merged: int = 0
    seconds: float = 0.0


class ShardWorker:
    """A Ray actor (an async one) running ``build()``'s step on batches of items, at most
    ``concurrency`` items at a time across the batches it holds, appending each item's group
    to its shard; an item already in the shard is not run again."""

    def __init__(self, build: Callable[[], ItemStep], shard: str, size: str,
                 concurrency: int) -> None:
        self._log = RecordLog(shard, size=size)
        self._step = build()
        self._slots = asyncio.Semaphore(concurrency)

    async def run(self, items: list[Item]) -> list[tuple[str, str | None]]:
        """(id, error or ``None``) for each item of ``items``."""
        return list(await asyncio.gather(*(self._one(item) for item in items)))

    async def _one(self, item: Item) -> tuple[str, str | None]:
        async with self._slots:
            if item.id in self._log.finished:
                return item.id, None
            try:
                records = await self._step(item)
            except Exception as err:
                return item.id, f"{type(err).__name__}: {err}"
            self._log.append(records)
            return item.id, None


def run_on_ray(build: Callable[[], ItemStep], items: Sequence[Item], out: str | Path, *,
               stem: str, size: str, address: str = "auto", workers: int | None = None,
               concurrency: int = 8, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
               on_item: Callable[[RayReport], None] | None = None,
               on_error: Callable[[str, str], None] | None = None) -> RayReport:
    """Run ``build()``'s step on every item of ``items`` not yet in ``<out>/<stem>.jsonl``
    (or a shard), over Ray workers, and merge the shards into it.

    Args:
        build: makes the step, in each worker (a function Ray can send there: one of a module,
            or a ``functools.partial`` of one with plain arguments).
        stem, size: the main file's name without ``.jsonl``, and the field giving a group's
            size (``records.jsonl`` and ``num_paths`` for synthesis; ``predictions`` and
            ``records`` for evaluation).
        address: the cluster: ``auto`` (the one this machine is part of, from ``ray start``
            or ``RAY_ADDRESS``), ``local`` (start one here), or ``host:port`` /
            ``ray://host:port``.
        workers: Ray actors (default: one per node of the cluster).
        concurrency: items in flight in each worker.
        cpus_per_worker, gpus_per_worker: what each worker reserves (a GPU for a worker
            that serves its own model).
        on_item: called as items finish (progress); ``on_error(id, message)`` for each item
            whose job raised.

    Raises:
        ConfigError: when Ray is not installed or the cluster cannot be reached, for bad
            numbers, or when every worker of a shard kept dying.
    """
    try:
        import ray
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("--ray needs Ray: pip install 'insightv-agents[ray]'") from None
    check_int("concurrency", concurrency, 1, 4096)
    if workers is not None:
        check_int("workers", workers, 1, 4096)
    folder = Path(out)
    main = folder / f"{stem}.jsonl"
    report = RayReport(total=len(items))
    started = time.perf_counter()
    done = set(_finished(main, size))
    for shard in shards(folder, stem):
        done |= _finished(shard, size)
    pending = [item for item in items if item.id not in done]
    report.skipped = len(items) - len(pending)
    if pending:
        _connect(ray, address)
        try:
            _dispatch(ray, RayActorError, build, pending, folder, stem, size, workers,
                      concurrency, cpus_per_worker, gpus_per_worker, report, on_item, on_error)
        finally:
            ray.shutdown()
    report.merged = merge_shards(folder, stem, size)
    report.seconds = time.perf_counter() - started
    return report


def _connect(ray: Any, address: str) -> None:
    options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    try:
        if address == "local":
            ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"--ray {address}: cannot reach a Ray cluster ({err}). Start one "
                          "with `ray start --head`, or pass --ray local.") from None


def _dispatch(ray: Any, actor_error: type[BaseException], build: Callable[[], ItemStep],
              pending: list[Item], folder: Path, stem: str, size: str, workers: int | None,
              concurrency: int, cpus: float, gpus: float, report: RayReport,
              on_item: Callable[[RayReport], None] | None,
              on_error: Callable[[str, str], None] | None) -> None:
    """Hand out ``pending`` in batches of half ``concurrency``, three per worker at a time (the
    worker runs ``concurrency`` items at once; the third keeps it fed); a batch whose worker died
    is handed out again, less what that worker's shard holds, and another worker is started
    on that shard."""
    count = workers or max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
    remote = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0,
                                             max_concurrency=3)
    size_of = max(1, concurrency // 2)  # small batches: a short tail at the end
    batches: deque[list[Item]] = deque(
        pending[start:start + size_of] for start in range(0, len(pending), size_of))

    def start(index: int) -> Any:
        shard = folder / f"{stem}.{index}.jsonl"
        return remote.remote(build, str(shard), size, concurrency)

    actors = {index: start(index) for index in range(min(count, len(batches)))}
    restarts = dict.fromkeys(actors, 0)
    running: dict[Any, tuple[int, list[Item]]] = {}

    def feed(index: int) -> None:
        while batches and sum(1 for i, _ in running.values() if i == index) < 3:
            batch = batches.popleft()
            running[actors[index].run.remote(batch)] = (index, batch)

    for index in actors:
        feed(index)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        index, batch = running.pop(ref)
        try:
            results = ray.get(ref)
        except actor_error as err:
            _died(ray, index, batch, actors, restarts, running, batches, start, folder, stem,
                  size, report, err)
            if on_item is not None:
                on_item(report)
            for other in list(actors):
                feed(other)
            continue
        for identifier, error in results:
            if error is None:
                report.written += 1
                report.per_worker[index] = report.per_worker.get(index, 0) + 1
            else:
                report.errors.append((identifier, error))
                if on_error is not None:
                    on_error(identifier, error)
        if on_item is not None:
            on_item(report)
        feed(index)
    for actor in actors.values():
        ray.kill(actor)


def _died(ray: Any, index: int, batch: list[Item], actors: dict[int, Any],
          restarts: dict[int, int], running: dict[Any, tuple[int, list[Item]]],
          batches: deque[list[Item]], start: Callable[[int], Any], folder: Path, stem: str,
          size: str, report: RayReport, error: BaseException) -> None:
    """Worker ``index`` died with ``batch`` (and maybe more) in its hands: what its shard
    holds is done, the rest is handed out again, to a worker started again on the shard."""
    lost = [batch] + [other for ref, (i, other) in list(running.items()) if i == index]
    for ref in [ref for ref, (i, _) in running.items() if i == index]:
        del running[ref]
    ray.kill(actors[index])
    finished = _finished(folder / f"{stem}.{index}.jsonl", size)
    for items in lost:
        rest = [item for item in items if item.id not in finished]
        report.written += len(items) - len(rest)
        report.per_worker[index] = report.per_worker.get(index, 0) + len(items) - len(rest)
        if rest:
            batches.appendleft(rest)
    if restarts[index] < MAX_RESTARTS:
        restarts[index] += 1
        report.restarts += 1
        actors[index] = start(index)
    else:
        del actors[index]
        if not actors:
            raise ConfigError(f"every Ray worker died {MAX_RESTARTS + 1} times; the last: "
                              f"{str(error)[:2000]}")


def _finished(path: Path, size: str) -> set[str]:
    """The groups a record log holds whole (its torn tail, if any, cut)."""
    if not path.exists():
        return set()
    with RecordLog(path, size=size) as log:
        return set(log.finished)
