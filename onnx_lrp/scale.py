"""Ray back end of :func:`onnx_lrp.dataset.run`: one actor per worker holds the job's model (loaded once, in
``setup``); the driver reads and prepares the shards, sends each to an actor (token ids in), and writes what comes
back (results out) as the shard's Parquet file. Needs ``ray`` (``pip install 'onnx-lrp[scale]'``); the rest of
onnx-lrp never imports it.

An actor that dies (a killed process, a lost node) is restarted by Ray, which runs its unfinished shards again
(``max_restarts``, ``max_task_retries``); a shard is written only once it is complete, so a redone shard replaces
nothing and no row appears twice.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import ray

from .dataset import Job, Row
from .errors import DatasetError, OnnxLrpError

# a small object store: shards are small, and this machine's memory is shared (Ray's default takes 30% of RAM)
LOCAL_OBJECT_STORE = 256 * 1024 * 1024


class _Worker:
    def __init__(self, job: Job):
        self.job, self.failed = job, None
        try:
            job.setup()
        except OnnxLrpError as err:  # a bad model or selector: reported by the first shard, not retried as a crash
            self.failed = err

    def process(self, index: int, items: list[Any]) -> tuple[int, Any]:
        if self.failed is not None:
            raise self.failed
        return index, self.job.process(items)


def start(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray (``address``) or start a local Ray in this process; False if one was already connected."""
    if ray.is_initialized():
        return False
    # Ray lowers its workers' priority to nice 15 by default: beside other jobs they then get a fraction of the CPU
    # the same work gets in this process (measured 1.8x slower on a loaded 2-core machine); keep ours
    os.environ.setdefault("RAY_worker_niceness", "0")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 object_store_memory=LOCAL_OBJECT_STORE)
    return True


def run_on_ray(job: Job, todo: Iterator[tuple[int, list[Row]]], write: Callable[[int, Any], None], workers: int, *,
               address: str | None = None, options: dict | None = None) -> None:
    """Process the shards of ``todo`` on ``workers`` actors, two shards in flight per actor, writing each result
    as it arrives. ``options``: actor options (default ``num_cpus=1, max_restarts=3, max_task_retries=3``)."""
    opts = {"num_cpus": 1, "max_restarts": 3, "max_task_retries": 3, **(options or {})}
    started = start(address, None if address else max(workers * int(opts["num_cpus"] or 1), os.cpu_count() or 1))
    actors = [ray.remote(**opts)(_Worker).remote(job) for _ in range(workers)]
    pending: dict[Any, Any] = {}
    failure: list[Exception] = []  # the first bad row (on_error="fail"): the shards in flight are still written

    def submit(actor: Any) -> None:
        nxt = None if failure else next(todo, None)
        if nxt is None:
            return
        index, rows = nxt
        try:
            items = job.prepare(rows)
        except DatasetError as err:
            failure.append(err)
            return
        pending[actor.process.remote(index, items)] = actor

    try:
        for _ in range(2):
            for a in actors:
                submit(a)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            actor = pending.pop(ref)
            try:
                index, table = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                raise DatasetError(f"a Ray worker died more than {opts['max_restarts']} times; last: {err}") from err
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                failure.append(cause if isinstance(cause, Exception) else err)
                continue
            write(index, table)
            submit(actor)
        if failure:
            raise failure[0]
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
