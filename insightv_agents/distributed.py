"""Synthesis and evaluation spread over the workers of a Ray cluster (``--ray``).

:func:`run_on_ray` runs a per-item job (synthesis's :func:`~insightv_agents.synthesize.
synthesis_step`, evaluation's :func:`~insightv_agents.evaluate.prediction_step`) on Ray
actors. Worker ``i`` appends each item's group of records to its own shard,
``<out>/<stem>.<i>.jsonl`` (a :class:`~insightv_agents.records.RecordLog`, as a single run
writes), and the driver hands out items a batch at a time. When a worker dies, the driver
reads what its shard holds (without writing to it), starts another worker on a new shard and
hands out the rest of its batches again; when all items are done, the shards are merged into
``<out>/<stem>.jsonl``, each item's group once, and removed. A killed driver resumes from
the main file and the shards: rerun the same command.

Each worker builds its own models (``build`` runs in the worker: an endpoint pool of the
servers, or a model in-process), so nothing but items and records crosses the cluster. The
workers write the output folder and read the data folder themselves: on a cluster of several
machines both must be on storage every node mounts at the same path (NFS, a cluster file
system), as Ray's own jobs require of their storage.

Ray is an optional extra: ``pip install 'insightv-agents[ray]'``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insightv_agents.errors import ConfigError, InsightVError, check_int, check_number
from insightv_agents.records import RecordLog, finished_groups, merge_shards, shards
from insightv_agents.synthesize import Item

ItemStep = Callable[[Item], Awaitable[list[dict[str, Any]]]]
"""One item's job: its group of records (an error raised is the item's error)."""
MAX_RESTARTS = 3
"""Workers started in place of dead ones, per worker of the run, before the run gives up."""
WORKER_START_S = 600.0
"""How long the workers may take to start (each builds its models)."""


@dataclass
class RayReport:
    """What a run on Ray did.

    Attributes:
        total, skipped, written: items asked for, already done before, done now.
        errors: (id, message) of items whose job raised (left for the next run).
        workers: workers the run started with.
        restarts: workers started in place of one that died.
        per_worker: items each worker wrote, by its shard's number.
        merged: groups moved from the shards into the main file.
        seconds: the run's time, from reading what was done to the merge.
    """

    total: int = 0
    skipped: int = 0
    written: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    workers: int = 0
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

    async def ready(self) -> bool:
        return True

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


def check_ray() -> None:
    """Raise :class:`ConfigError` unless Ray is installed (before any other work)."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("--ray needs Ray: pip install 'insightv-agents[ray]'")


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
            that runs a model in-process).
        on_item: called as items finish (progress); ``on_error(id, message)`` for each item
            whose job raised.

    Raises:
        ConfigError: when Ray is not installed or the cluster cannot be reached, for bad
            numbers, when no worker starts, or when workers kept dying.
        InsightVError: when a worker's own code fails (writing its shard, say).
    """
    try:
        import ray
        import ray.exceptions
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("--ray needs Ray: pip install 'insightv-agents[ray]'") from None
    check_int("concurrency", concurrency, 1, 4096)
    if workers is not None:
        check_int("workers", workers, 1, 4096)
    check_number("cpus_per_worker", cpus_per_worker, 0, 4096)
    check_number("gpus_per_worker", gpus_per_worker, 0, 4096)
    folder = Path(out)
    main = folder / f"{stem}.jsonl"
    report = RayReport(total=len(items))
    started = time.perf_counter()
    done = finished_groups(main, size)
    for shard in shards(folder, stem):
        done |= finished_groups(shard, size)
    pending = [item for item in items if item.id not in done]
    report.skipped = len(items) - len(pending)
    if pending:
        joined = _connect(ray, address)
        try:
            count = workers or _nodes_with_room(ray, cpus_per_worker, gpus_per_worker)
            _Dispatch(ray, build, pending, folder, stem, size, concurrency, report, on_item,
                      on_error).run(count, cpus_per_worker, gpus_per_worker)
        finally:
            if joined:
                ray.shutdown()
    report.merged = merge_shards(folder, stem, size)
    report.seconds = time.perf_counter() - started
    return report


def _connect(ray: Any, address: str) -> bool:
    """Join the cluster (``True``), unless this process already has (``False``)."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    try:
        if address == "local":
            ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"--ray {address}: cannot reach a Ray cluster ({err}). Start one "
                          "with `ray start --head`, or pass --ray local.") from None
    return True


class _Dispatch:
    """Batches of half ``concurrency`` items handed out, three per worker at a time (a worker
    runs ``concurrency`` items at once; the third keeps it fed). A worker that dies is
    replaced by one on a new shard: its batches are handed out again, less what its shard
    holds (read, never written to again)."""

    def __init__(self, ray: Any, build: Callable[[], ItemStep], pending: list[Item],
                 folder: Path, stem: str, size: str, concurrency: int, report: RayReport,
                 on_item: Callable[[RayReport], None] | None,
                 on_error: Callable[[str, str], None] | None) -> None:
        self.ray, self.build, self.folder, self.stem, self.size = ray, build, folder, stem, size
        self.concurrency, self.report = concurrency, report
        self.on_item, self.on_error = on_item, on_error
        per_batch = max(1, concurrency // 2)
        self.batches: deque[list[Item]] = deque(
            pending[start:start + per_batch] for start in range(0, len(pending), per_batch))
        self.actors: dict[int, Any] = {}
        self.running: dict[Any, tuple[int, list[Item]]] = {}
        taken = [int(path.name[len(stem) + 1:-len(".jsonl")]) for path in shards(folder, stem)]
        self.next_shard = max(taken, default=-1) + 1

    def run(self, workers: int, cpus: float, gpus: float) -> None:
        ray = self.ray
        self.remote = ray.remote(ShardWorker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=3,
            scheduling_strategy="SPREAD")
        for _ in range(min(workers, len(self.batches))):
            self._start()
        self._await_ready(workers)
        self.report.workers = len(self.actors)
        replacements = MAX_RESTARTS * len(self.actors)
        for index in list(self.actors):
            self._feed(index)
        while self.running:
            (ref,), _ = ray.wait(list(self.running), num_returns=1)
            index, batch = self.running.pop(ref)
            try:
                results = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if replacements == 0:
                    raise ConfigError(f"Ray workers died {MAX_RESTARTS} times for each "
                                      f"started; the last: {str(err)[:2000]}") from None
                replacements -= 1
                self._died(index, batch)
            except ray.exceptions.RayTaskError as err:  # the worker's own code failed
                raise InsightVError(f"a Ray worker failed: {str(err)[:4000]}") from None
            else:
                self._record(index, results)
            if self.on_item is not None:
                self.on_item(self.report)
            for other in list(self.actors):
                self._feed(other)
        for actor in self.actors.values():
            ray.kill(actor)

    def _start(self) -> int:
        index, self.next_shard = self.next_shard, self.next_shard + 1
        shard = self.folder / f"{self.stem}.{index}.jsonl"
        self.actors[index] = self.remote.remote(self.build, str(shard), self.size,
                                                self.concurrency)
        return index

    def _await_ready(self, wanted: int) -> None:
        """Wait for the workers to start (each builds its models); go on with those that
        did within WORKER_START_S (the cluster may lack room for them all)."""
        ray = self.ray
        ready = {actor.ready.remote(): index for index, actor in self.actors.items()}
        done, late = ray.wait(list(ready), num_returns=len(ready), timeout=WORKER_START_S)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as err:  # its models failed to build, say
                raise ConfigError(f"a Ray worker could not start: {str(err)[:4000]}") from None
        for ref in late:
            ray.kill(self.actors.pop(ready[ref]))
        if not self.actors:
            raise ConfigError(f"no Ray worker started within {WORKER_START_S:g} s: the "
                              "cluster has no room for one (see `ray status`; "
                              "--workers, the CPUs and GPUs each reserves).")

    def _feed(self, index: int) -> None:
        while self.batches and sum(1 for i, _ in self.running.values() if i == index) < 3:
            batch = self.batches.popleft()
            self.running[self.actors[index].run.remote(batch)] = (index, batch)

    def _record(self, index: int, results: list[tuple[str, str | None]]) -> None:
        for identifier, error in results:
            if error is None:
                self._written(index, 1)
            else:
                self.report.errors.append((identifier, error))
                if self.on_error is not None:
                    self.on_error(identifier, error)

    def _written(self, index: int, count: int) -> None:
        self.report.written += count
        self.report.per_worker[index] = self.report.per_worker.get(index, 0) + count

    def _died(self, index: int, batch: list[Item]) -> None:
        """Worker ``index`` died with ``batch`` (and maybe more) in its hands."""
        lost = [batch] + [other for i, other in self.running.values() if i == index]
        self.running = {ref: held for ref, held in self.running.items() if held[0] != index}
        self.ray.kill(self.actors.pop(index))
        finished = finished_groups(self.folder / f"{self.stem}.{index}.jsonl", self.size)
        for items in lost:
            rest = [item for item in items if item.id not in finished]
            self._written(index, len(items) - len(rest))
            if rest:
                self.batches.appendleft(rest)
        self.report.restarts += 1
        self._start()


def _nodes_with_room(ray: Any, cpus: float, gpus: float) -> int:
    """The cluster's live nodes with the CPUs and GPUs one worker reserves (at least 1)."""
    fitting = [node for node in ray.nodes() if node.get("Alive")
               and node.get("Resources", {}).get("CPU", 0) >= cpus
               and node.get("Resources", {}).get("GPU", 0) >= gpus]
    return max(1, len(fitting))
