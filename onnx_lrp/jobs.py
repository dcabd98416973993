"""The jobs of corpus runs on text models (:func:`onnx_lrp.dataset.run`): a :class:`TextJob` tokenises rows where
they are read and holds one :class:`~onnx_lrp.text.TextExplainer` per worker; :class:`ExplainJob` is
``explain-dataset`` (per row the token relevance and the latent top-k), :class:`onnx_lrp.concepts.ConceptsJob`
``concepts``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .dataset import Job, Row
from .errors import DatasetError, OnnxLrpError, TargetError


class TextJob(Job):
    """Base of the jobs on text models: a :class:`~onnx_lrp.text.TextExplainer` per worker, rows tokenised where they
    are read (``prepare``: token ids go to the workers) exactly as :meth:`TextExplainer.explain` tokenises them."""

    def __init__(self, model: str | os.PathLike, composite: str = "attnlrp", *, on_error: str = "skip",
                 max_tokens: int | None = None, threads: int | None = 1):
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
        self.model = str(Path(model).expanduser().absolute())
        self.composite, self.on_error, self.max_tokens, self.threads = composite, on_error, max_tokens, threads
        self._tok = None
        self.tx = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None, "tx": None}  # workers load their own

    def config(self) -> dict:
        return {"model": self.model, "composite": self.composite, "on_error": self.on_error,
                "max_tokens": self.max_tokens}

    def folder(self) -> Path:
        p = Path(self.model)
        return p if p.is_dir() else p.parent

    def prepare(self, rows: list[Row]) -> list[dict]:
        from .text import Tokenizer

        if self._tok is None:
            self._tok = Tokenizer.from_folder(self.folder())
        items = []
        for r in rows:
            item = {"row": r.index, "text": None, "ids": None, "error": r.error}
            if r.fields is not None:
                item["text"] = r.fields.get("text")
                ids = self._tok.encode(item["text"]) if item["text"] is not None else r.fields["input_ids"]
                item["ids"] = ids[: self.max_tokens] if self.max_tokens else ids
                if not item["ids"]:
                    item["error"] = f"row {r.index}: the text encodes to no tokens"
            if item["error"] and self.on_error == "fail":
                raise DatasetError(f"{item['error']} (on_error='fail'; the shards written so far are kept)")
            items.append(item)
        return items

    def setup(self) -> None:
        from ._capture import default_session_options
        from .text import TextExplainer

        opts = default_session_options()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        self.tx = TextExplainer(self.model, self.composite, session_options=opts)

    def feeds(self, batch: list[list[int]]) -> dict[str, Any]:
        """Right-padded ids and mask (one row: exactly the feeds of :meth:`TextExplainer.explain`)."""
        S = max(len(i) for i in batch)
        pad = self.tx.config.get("pad_token_id") or 0  # what a sequence classifier looks for (config.json)
        ids = np.full((len(batch), S), pad, dtype=np.int64)
        mask = np.zeros((len(batch), S), dtype=np.int64)
        for k, i in enumerate(batch):
            ids[k, : len(i)], mask[k, : len(i)] = i, 1
        names = self.tx.explainer.input_names
        return {"input_ids": ids, "attention_mask": mask} if "attention_mask" in names else {"input_ids": ids}

    def batches(self, items: list[dict], size: int) -> Iterator[list[dict]]:
        """Valid rows bucketed by length (sorted, then cut into groups of ``size``); models without an
        ``attention_mask`` input only batch rows of equal length (nothing to pad with)."""
        ok = sorted((it for it in items if not it["error"]), key=lambda it: (len(it["ids"]), it["row"]))
        masked = "attention_mask" in self.tx.explainer.input_names
        group: list[dict] = []
        for it in ok:
            if group and (len(group) == size or (not masked and len(it["ids"]) != len(group[0]["ids"]))):
                yield group
                group = []
            group.append(it)
        if group:
            yield group

    def guarded(self, items: list[dict], size: int, fn: Callable[[list[dict]], None]) -> None:
        """``fn`` on each batch; a batch that fails is redone row by row, so that a bad row is reported alone
        (stored with its error, or the run stops: ``on_error``)."""
        for group in self.batches(items, size):
            try:
                fn(group)
                continue
            except OnnxLrpError as err:
                if len(group) == 1:
                    self._row_failed(group[0], err)
                    continue
            for it in group:
                try:
                    fn([it])
                except OnnxLrpError as err:
                    self._row_failed(it, err)

    def _row_failed(self, item: dict, err: Exception) -> None:
        item["error"] = f"row {item['row']}: {err}"
        if self.on_error == "fail":
            raise DatasetError(f"{item['error']} (on_error='fail'; the shards written so far are kept)") from err


class ExplainJob(TextJob):
    """``explain-dataset``: per row the token relevance of :meth:`TextExplainer.explain` (the model's prediction,
    or ``target``), and optionally the ``top_k`` most relevant units of ``latent`` selectors.

    ``batch_size`` 1 (default) gives exactly the numbers of ``TextExplainer.explain`` row by row. Larger batches
    (rows bucketed by length, right-padded) are faster but differ from them in the last bits (~1e-6 relative,
    measured): the relevance pass merges the rows of a batch into one matrix product, whose rounding in OpenBLAS
    depends on its size.
    """

    name = "explain"

    def __init__(self, model: str | os.PathLike, composite: str = "attnlrp", *, target: int | str | None = None,
                 latent: Sequence[str] = (), top_k: int = 10, batch_size: int = 1, **kw: Any):
        super().__init__(model, composite, **kw)
        self.target, self.latent, self.top_k, self.batch_size = target, list(latent), top_k, batch_size

    def config(self) -> dict:
        return {**super().config(), "target": self.target, "latent": self.latent, "top_k": self.top_k,
                "batch_size": self.batch_size}

    def setup(self) -> None:
        super().setup()
        from .latent import LatentExplainer

        if self.tx.kind == "encoder":
            raise TargetError(f"{self.model}: output {self.tx.output!r} is a hidden state, not a prediction to "
                              "explain per row")
        self.tid = self.tx.resolve_target(self.target)
        self.lat = LatentExplainer(self.tx.explainer) if self.latent else None
        if self.lat is not None:
            for sel in self.latent:
                self.lat.site(sel)  # a bad selector fails the run before any row

    def process(self, items: list[dict]) -> Any:
        import pyarrow as pa

        tx = self.tx
        out: dict[int, dict] = {}

        def explain(group: list[dict]) -> None:
            feeds = self.feeds([it["ids"] for it in group])
            if self.lat is not None:
                lres = self.lat.explain(feeds, self.latent, self.tid, output=tx.output)
                res = lres.explanation
            else:
                res = tx.explainer.explain(feeds, target=self.tid, output=tx.output, full_output=False)
            y = res.outputs[tx.output]  # (batch, 1, vocab) where only the explained rows were computed
            for j, it in enumerate(group):
                n = len(it["ids"])
                row = y[j] if res.position is None else y[j, 0] if y.shape[1] == 1 else y[j, res.position[j]]
                pred, tgt = int(np.argmax(row)), int(res.target[j])
                rec = {"tokens": tx.tokenizer.pieces(it["ids"]), "target": tgt, "target_text": tx._label(tgt),
                       "prediction": pred, "prediction_text": tx._label(pred), "score": float(res.score[j]),
                       "relevance": np.asarray(res.relevance["input_ids"][j, :n], dtype=np.float32)}
                if self.lat is not None:
                    rec["latent"] = []
                    for sel in self.latent:
                        top, val = lres.top(sel, self.top_k)
                        rec["latent"].append({"selector": sel, "units": top[j].astype(np.int32).tolist(),
                                              "relevance": val[j].astype(np.float32).tolist()})
                out[it["row"]] = rec

        self.guarded(items, self.batch_size, explain)
        cols: dict[str, list] = {k: [] for k in ("row", "text", "ids", "tokens", "target", "target_text",
                                                 "prediction", "prediction_text", "score", "relevance", "error")}
        if self.lat is not None:
            cols["latent"] = []
        for it in items:
            rec = out.get(it["row"], {})
            for k in cols:
                cols[k].append(it.get(k) if k in ("row", "text", "ids", "error") else rec.get(k))
        return pa.Table.from_pydict(cols, schema=explain_schema(self.lat is not None))


def explain_schema(latent: bool = False) -> Any:
    """The columns of an ``explain-dataset`` shard (docs/datasets.md)."""
    import pyarrow as pa

    fields = [("row", pa.int64()), ("text", pa.string()), ("ids", pa.list_(pa.int64())),
              ("tokens", pa.list_(pa.string())), ("target", pa.int64()), ("target_text", pa.string()),
              ("prediction", pa.int64()), ("prediction_text", pa.string()), ("score", pa.float64()),
              ("relevance", pa.list_(pa.float32())), ("error", pa.string())]
    if latent:
        fields.append(("latent", pa.list_(pa.struct([("selector", pa.string()), ("units", pa.list_(pa.int32())),
                                                     ("relevance", pa.list_(pa.float32()))]))))
    return pa.schema(fields)
