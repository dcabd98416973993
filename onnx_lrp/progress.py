"""Progress messages for slow steps (conversion, export, long explanations), on stderr.

:func:`step` prints ``message ...`` and, when the block ends, the elapsed time. :func:`bar` wraps an iterable
in a tqdm bar when tqdm is installed and the stream is a terminal-like object; otherwise it returns the iterable.
Silence everything with ``ONNX_LRP_QUIET=1``.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _quiet() -> bool:
    return os.environ.get("ONNX_LRP_QUIET", "") not in ("", "0")


def message(text: str) -> None:
    """One progress line on stderr."""
    if not _quiet():
        print(text, file=sys.stderr, flush=True)


@contextmanager
def step(text: str) -> Iterator[None]:
    """``with step("exporting"):`` prints ``exporting ...`` then ``exporting: done in 3.2 s``."""
    t0 = time.perf_counter()
    message(f"{text} ...")
    yield
    message(f"{text}: done in {time.perf_counter() - t0:.1f} s")


def bar(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """A tqdm progress bar over ``items`` if tqdm is installed (and not quiet), else ``items`` unchanged."""
    if _quiet():
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def counter(total: int, desc: str, unit: str, *, initial: int = 0, enabled: bool = True):
    """A tqdm counter with rate and ETA (``update(n)``, ``close()``), or one that shows nothing when tqdm is
    missing, output is quiet or ``enabled`` is false."""
    if not enabled or _quiet():
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, smoothing=0.1)
