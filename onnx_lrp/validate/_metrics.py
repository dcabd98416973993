"""Agreement measures between a reference array ``a`` and a candidate ``b`` of the same shape (numpy only).

Forward values of the residual stream: :func:`row_err`. Relevance: :func:`relevance_agreement`
(``rel_err = max|a - b| / max|a|``, Spearman's rho and Kendall's tau-b with ties, top-k overlap of the largest
``|a|`` and ``|b|``, sign agreement where ``|a|`` is not negligible).
Outputs: :func:`output_agreement` (max absolute / relative difference, same argmax, KL of the softmax
distributions).
"""
from __future__ import annotations

import numpy as np

SIGN_FLOOR = 0.01  # sign agreement counts entries with |a| > SIGN_FLOOR * max|a|


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (flattened), ties getting their mean rank."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    mean_rank = (starts + ends + 1) / 2.0  # ranks start+1 .. end, averaged
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks; NaN when either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _tied_pairs(x: np.ndarray) -> int:
    """Pairs of equal entries in sorted ``x``."""
    counts = np.diff(np.flatnonzero(np.r_[True, x[1:] != x[:-1], True]))
    return int((counts * (counts - 1) // 2).sum())


def _inversions(y: np.ndarray) -> int:
    """Pairs ``i < j`` with ``y[i] > y[j]`` (strictly), by a bottom-up merge sort: O(n log^2 n), vectorised."""
    a = np.asarray(y, dtype=np.int64)
    n = a.size
    idx = np.arange(n)
    total, width = 0, 1
    while width < n:
        block = idx // (2 * width)
        right = (idx % (2 * width)) >= width
        key = a + block * (n + 1)  # each block's values in its own range: one global sorted search
        left_keys = key[~right]  # sorted: blocks ascend, and each half is sorted by the previous pass
        r, rb = key[right], block[right]
        above = np.searchsorted(left_keys, (rb + 1) * (n + 1), "left") - np.searchsorted(left_keys, r, "right")
        total += int(above.sum())
        a = np.sort(key) - block * (n + 1)
        width *= 2
    return total


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (ties in either array handled as scipy does); NaN when either is constant."""
    x = np.unique(np.ravel(a), return_inverse=True)[1].astype(np.int64)  # dense integer ranks
    y = np.unique(np.ravel(b), return_inverse=True)[1].astype(np.int64)
    n = x.size
    order = np.lexsort((y, x))  # by x, then y: pairs tied in x are never counted as inversions
    xs, ys = x[order], y[order]
    n0 = n * (n - 1) // 2
    tx, ty, txy = _tied_pairs(xs), _tied_pairs(np.sort(y)), _tied_pairs(xs * (n + 1) + ys)
    con_minus_dis = n0 - tx - ty + txy - 2 * _inversions(ys)
    den = np.sqrt(float(n0 - tx) * float(n0 - ty))
    return float(con_minus_dis / den) if den > 0 else float("nan")


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """``|top_k(|a|) & top_k(|b|)| / k`` (``k`` capped at the size)."""
    a, b = np.abs(np.ravel(a)), np.abs(np.ravel(b))
    k = min(k, a.size)
    if k == 0:
        return float("nan")
    ta = np.argsort(-a, kind="mergesort")[:k]
    tb = np.argsort(-b, kind="mergesort")[:k]
    return float(np.intersect1d(ta, tb).size / k)


def sign_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of entries with ``|a| > SIGN_FLOOR * max|a|`` where ``b`` has the sign of ``a``."""
    a, b = np.ravel(a), np.ravel(b)
    scale = np.abs(a).max() if a.size else 0.0
    keep = np.abs(a) > SIGN_FLOOR * scale
    if not keep.any():
        return float("nan")
    return float(np.mean(np.sign(a[keep]) == np.sign(b[keep])))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max|a|`` (0 when both are all zero, inf when only ``a`` is)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(a).max()) if a.size else 0.0
    if scale == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / scale


def row_err(a: np.ndarray, b: np.ndarray) -> float:
    """``max_t ||a_t - b_t|| / ||a_t||`` over the rows ``t`` (tokens) of ``(..., hidden)`` arrays: the relative
    error of the worst token, not hidden by a few massive activations elsewhere (0 for equal rows, inf for a
    zero row of ``a`` that ``b`` does not share)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, dtype=np.float64).reshape(a.shape)
    diff, norm = np.linalg.norm(a - b, axis=-1), np.linalg.norm(a, axis=-1)
    ratio = np.where(norm > 0, diff / np.where(norm > 0, norm, 1.0), np.where(diff > 0, np.inf, 0.0))
    return float(ratio.max()) if ratio.size else 0.0


def relevance_agreement(a: np.ndarray, b: np.ndarray, k: int) -> dict[str, float]:
    """The relevance measures of ``b`` against the reference ``a`` (see the module docstring)."""
    return {"rel_err": rel_err(a, b), "spearman": spearman(a, b), "kendall": kendall(a, b),
            "topk": topk_overlap(a, b, k), "sign": sign_agreement(a, b)}


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def output_agreement(a: np.ndarray, b: np.ndarray, distribution: bool) -> dict[str, float | bool | None]:
    """Max absolute and relative difference of two outputs; with ``distribution`` (logits over classes or tokens:
    ``a`` and ``b`` are one row each) also whether the argmax is the same and ``KL(softmax(a) || softmax(b))``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    out: dict[str, float | bool | None] = {
        "max_abs": float(np.abs(a - b).max()) if a.size else 0.0, "max_rel": rel_err(a, b),
        "same_prediction": None, "kl": None}
    if distribution:
        la, lb = log_softmax(a), log_softmax(b)
        out["same_prediction"] = bool(np.argmax(a) == np.argmax(b))
        out["kl"] = float(max(0.0, (np.exp(la) * (la - lb)).sum()))
    return out
