"""Corpus runs: rows read from a file, cut into shards of consecutive rows, each shard processed by a job (in this
process, or on Ray actors: :mod:`onnx_lrp.scale`), the results written as one Parquet file per shard.

- **Deterministic shards**: shard ``i`` holds rows ``[i * shard_size, (i + 1) * shard_size)`` and is written to
  ``shard-{i:05d}.parquet`` (first to a temporary name, then renamed: a file under its final name is complete).
- **Resumable**: ``manifest.json`` records the job, the shard size and the input's fingerprint; a rerun with the same
  ones skips the shards that exist (a different configuration in the same folder is refused).
- **Bad rows**: a row that cannot be read or explained is reported with its row number; ``on_error="skip"`` stores it
  with its ``error`` and goes on, ``"fail"`` stops the run (the shards written so far stay).

Inputs (:func:`read_rows`): text (one row per line), JSON lines, CSV, Parquet, or a folder written by
``datasets.Dataset.save_to_disk``; a ``text`` column (``text_column``), or ``input_ids`` (token ids). Needs
``pyarrow`` (``pip install 'onnx-lrp[scale]'``). The jobs on text models: :mod:`onnx_lrp.jobs`.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import DatasetError, InputError
from .progress import counter

MANIFEST = "manifest.json"


@dataclass
class Row:
    """One input row: its 0-based number in the input, its fields (``text`` or ``input_ids``), or why it could
    not be read."""

    index: int
    fields: dict | None
    error: str | None = None


# ---------------------------------------------------------------------------------------------- reading
def read_rows(path: str | os.PathLike, text_column: str = "text") -> Iterator[Row]:
    """The rows of a text / JSONL / CSV / Parquet file or a saved ``datasets`` folder, in order.

    Each row's fields hold ``text`` (from ``text_column``) or ``input_ids``; a row without either, not valid JSON,
    or not UTF-8 comes with its ``error`` (the run decides whether to skip it)."""
    p = Path(path)
    if p.is_dir():
        yield from _read_arrow_folder(p, text_column)
        return
    if not p.is_file():
        raise InputError(f"{p}: no such file or folder")
    suffix = "".join(p.suffixes[-1:]).lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        yield from _read_jsonl(p, text_column)
    elif suffix == ".csv":
        yield from _read_csv(p, text_column)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        k = 0
        for batch in pq.ParquetFile(str(p)).iter_batches():
            for rec in batch.to_pylist():
                yield _fields(k, rec, text_column, p)
                k += 1
    else:
        with open(p, "rb") as f:
            for k, line in enumerate(f):
                try:
                    text = line.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    yield Row(k, None, f"{p}: row {k}: not UTF-8 text ({err.reason} at byte {err.start})")
                    continue
                yield Row(k, {"text": text})


def _fields(k: int, rec: Any, text_column: str, src: Path) -> Row:
    if not isinstance(rec, dict):
        return Row(k, None, f"{src}: row {k}: expected an object with a {text_column!r} field, got "
                            f"{type(rec).__name__}")
    if rec.get(text_column) is not None:
        text = rec[text_column]
        if not isinstance(text, str):
            return Row(k, None, f"{src}: row {k}: field {text_column!r} is {type(text).__name__}, not text")
        return Row(k, {"text": text})
    ids = rec.get("input_ids")
    if ids is not None:
        try:
            return Row(k, {"input_ids": [int(i) for i in ids]})
        except (TypeError, ValueError):
            return Row(k, None, f"{src}: row {k}: input_ids is not a list of integers")
    return Row(k, None, f"{src}: row {k}: no {text_column!r} (or input_ids) value; fields: {sorted(rec)}")


def _read_jsonl(p: Path, text_column: str) -> Iterator[Row]:
    with open(p, "rb") as f:
        for k, line in enumerate(f):
            try:
                rec = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                yield Row(k, None, f"{p}: row {k} (line {k + 1}): not valid JSON ({err})")
                continue
            yield _fields(k, rec, text_column, p)


def _read_csv(p: Path, text_column: str) -> Iterator[Row]:
    with open(p, newline="", encoding="utf-8", errors="strict") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or (text_column not in reader.fieldnames
                                         and "input_ids" not in reader.fieldnames):
            raise InputError(f"{p}: CSV without a {text_column!r} column; columns: {reader.fieldnames}")
        k = 0
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                return
            except (UnicodeDecodeError, csv.Error) as err:
                yield Row(k, None, f"{p}: row {k}: unreadable ({err})")
                k += 1
                continue
            if rec.get("input_ids") and not rec.get(text_column):
                try:
                    rec["input_ids"] = json.loads(rec["input_ids"])
                except json.JSONDecodeError:
                    pass
            if rec.get(text_column) == "":
                rec[text_column] = None
            yield _fields(k, rec, text_column, p)
            k += 1


def _read_arrow_folder(p: Path, text_column: str) -> Iterator[Row]:
    """A folder from ``datasets.Dataset.save_to_disk``: ``state.json`` names its Arrow stream files in order."""
    import pyarrow as pa

    state = p / "state.json"
    if state.is_file():
        files = [p / d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    else:
        files = sorted(p.glob("*.arrow"))
        if not files:
            raise InputError(f"{p}: a folder, but no datasets state.json and no .arrow files")
    k = 0
    for f in files:
        with pa.memory_map(str(f)) as src:
            try:
                reader = pa.ipc.open_stream(src)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(src)
            batches = reader if hasattr(reader, "__iter__") else (reader.get_batch(i)
                                                                   for i in range(reader.num_record_batches))
            for batch in batches:
                for rec in batch.to_pylist():
                    yield _fields(k, rec, text_column, p)
                    k += 1


def count_rows(path: str | os.PathLike, text_column: str = "text") -> int:
    return sum(1 for _ in read_rows(path, text_column))


def fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of the input's bytes (all files of a folder, by name): a rerun must read the same rows."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def shards(rows: Iterable[Row], size: int) -> Iterator[tuple[int, list[Row]]]:
    """Consecutive rows in groups of ``size``: (shard index, rows)."""
    block: list[Row] = []
    k = 0
    for r in rows:
        block.append(r)
        if len(block) == size:
            yield k, block
            block, k = [], k + 1
    if block:
        yield k, block


# ---------------------------------------------------------------------------------------------- jobs
class Job:
    """What a corpus run computes, shard by shard.

    ``config()`` identifies the run (stored in the manifest); ``prepare(rows)`` runs where the rows are read (light:
    tokenising) and returns what is sent to a worker; ``setup()`` runs once per worker (loading the model);
    ``process(items)`` runs on the worker and returns the shard's ``pyarrow.Table``. Jobs are pickled to Ray actors:
    keep heavy state out of ``__init__``.
    """

    name = "job"

    def config(self) -> dict:
        raise NotImplementedError

    def prepare(self, rows: list[Row]) -> list[Any]:
        return rows

    def setup(self) -> None:
        pass

    def process(self, items: list[Any]) -> Any:
        raise NotImplementedError

    def finish(self, out: Path, shards: int, data: str) -> None:
        """Runs once all ``shards`` of the input are written (a reduction over them)."""


@dataclass
class RunSummary:
    out: Path
    shards: int  # shards of the input
    written: int  # shards written by this run
    skipped: int  # shards found complete (resume)
    rows: int
    errors: int  # rows stored with an error


def run(job: Job, data: str | os.PathLike, out: str | os.PathLike, *, shard_size: int = 32, workers: int = 0,
        address: str | None = None, text_column: str = "text", progress: bool = True,
        rows: Iterable[Row] | None = None, ray_options: dict | None = None) -> RunSummary:
    """Run ``job`` over the rows of ``data``, writing ``out/shard-*.parquet``; returns what was done.

    workers: 0 = in this process; N >= 1 = N Ray actors (one model each), a local Ray started in this process unless
    one is running or ``address`` names a cluster (``ray://host:10001``). ``rows``: the rows, when ``data`` only
    names them (the fingerprint and row count still read ``data``).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    _require("pyarrow", "writing Parquet shards")
    if workers > 0:
        _require("ray", f"--workers {workers} (Ray actors; --workers 0 runs in this process)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, {"job": job.name, "config": job.config(), "shard_size": shard_size,
                          "input": str(Path(data).absolute()), "fingerprint": fingerprint(data), "text_column": text_column})
    for stale in glob.glob(str(out / ".shard-*.tmp-*")):  # a run stopped while writing
        os.remove(stale)
    total = count_rows(data, text_column)
    done = {int(Path(f).stem.split("-")[1]) for f in glob.glob(str(out / "shard-*.parquet"))}
    n_shards = -(-total // shard_size)
    done_rows = sum(min(shard_size, total - i * shard_size) for i in done if i < n_shards)
    rows = read_rows(data, text_column) if rows is None else rows
    todo = ((i, block) for i, block in shards(rows, shard_size) if i not in done)
    summary = RunSummary(out, n_shards, 0, len(done), total, 0)
    bar = counter(total, f"{job.name} {Path(data).name}", "row", initial=done_rows, enabled=progress)

    def write(index: int, table: Any) -> None:
        write_shard(out, index, table)
        summary.written += 1
        if "error" in table.column_names:
            summary.errors += table.num_rows - table.column("error").null_count
        bar.update(min(shard_size, total - index * shard_size))

    try:
        if workers <= 0:
            _run_here(job, todo, write)
        else:
            from .scale import run_on_ray

            run_on_ray(job, todo, write, workers, address=address, options=ray_options)
    finally:
        bar.close()
    if all(shard_path(out, i).is_file() for i in range(n_shards)):
        job.finish(out, n_shards, str(data))
    return summary


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DatasetError(f"{what} needs {module}: pip install 'onnx-lrp[scale]'")


def _run_here(job: Job, todo: Iterator[tuple[int, list[Row]]], write: Callable[[int, Any], None]) -> None:
    job.setup()
    for index, block in todo:
        write(index, job.process(job.prepare(block)))


def _check_manifest(out: Path, want: dict) -> None:
    path = out / MANIFEST
    if path.is_file():
        have = json.loads(path.read_text())
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k) and k != "input")
        if diff:  # the input is known by its bytes (it may have moved)
            raise DatasetError(f"{out}: holds a run with another {', '.join(diff)} ({path}); resume it with the "
                               "same arguments and input, or write to another folder")
        return
    if glob.glob(str(out / "shard-*.parquet")):
        raise DatasetError(f"{out}: holds shards but no {MANIFEST}; write to another folder")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(want, indent=1))
    os.replace(tmp, path)


def shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.parquet"


def write_shard(out: Path, index: int, table: Any) -> Path:
    """Write a shard atomically: to a temporary name in the same folder, then renamed (Ctrl-C meanwhile is held
    until the rename is done, so a shard under its final name is always complete)."""
    import pyarrow.parquet as pq

    final = shard_path(out, index)
    tmp = out / f".{final.name}.tmp-{os.getpid()}"
    held: list = []
    previous = signal.signal(signal.SIGINT, lambda *a: held.append(a)) if _main_thread() else None
    try:
        pq.write_table(table, str(tmp))
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
    return final


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def read_results(out: str | os.PathLike, columns: Sequence[str] | None = None) -> Any:
    """All shards of a run as one ``pyarrow.Table``, in row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(str(Path(out) / "shard-*.parquet")))
    if not files:
        raise DatasetError(f"{out}: no shard-*.parquet files")
    return pa.concat_tables([pq.read_table(f, columns=list(columns) if columns else None) for f in files])
