"""Faithfulness of token attributions, measured by perturbing the model inside its ONNX graph.

Tokens are removed by zeroing their embedding (or replacing it by a baseline vector) through a mask inserted
after the embedding lookup (:mod:`onnx_lrp._perturb`); all perturbed copies of one input run batched.

For one input with ``n`` perturbable tokens, the explained score ``f`` (the logit of the originally predicted
class / next token, at the explained position) is measured after removing ``m_k = floor(k n / K + 1/2)``
tokens, ``k = 0..K``, at ``x_k = k / K`` (fraction removed):

* MoRF: most relevant first (descending relevance); LeRF: least relevant first (ascending).
* ``A(curve) = trapz(f_k, x_k)`` on ``[0, 1]``, in logit units (no normalisation; the curves are returned).
* **faithfulness** ``= A(LeRF) - A(MoRF)`` (symmetric relevance gain, Bluecher et al. 2024, as used for AttnLRP).
  A random ranking gives 0 in expectation: MoRF and LeRF are then the same random process.
* ERASER (DeYoung et al. 2020), on the softmax probability ``p`` of the predicted class, bins
  ``q in {1, 5, 10, 20, 50} %`` with ``m = ceil(q n)`` tokens:
  **comprehensiveness** ``= mean_q [p(x) - p(x without its top m)]``,
  **sufficiency** ``= mean_q [p(x) - p(only the top m of the perturbable tokens)]``.

Attribution methods through the same engine (:meth:`Evaluator.attribute`): ``attnlrp``, ``cp-lrp``,
``gradient-x-input``, ``gradient`` (L2 norm of the gradient over the embedding axis), ``integrated-gradients``
(zero baseline, midpoint rule on ``alpha_j = (j + 1/2) / N``: ``IG = sum_h e * mean_j grad f(alpha_j e)``,
batched through the masked graph), ``random`` (standard normal) and ``rollout`` (Abnar & Zuidema 2020, from the
graph's attention Softmax outputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ._capture import ForwardCapture
from ._device import resolve_device
from ._graph import Graph, load_model
from ._perturb import Perturber
from .errors import InputError, TargetError
from .explainer import Explainer, last_token

METHODS = ("attnlrp", "cp-lrp", "gradient-x-input", "gradient", "integrated-gradients", "random", "rollout")
ERASER_BINS = (0.01, 0.05, 0.1, 0.2, 0.5)


@dataclass
class Faithfulness:
    """Perturbation curves and scores for a batch of inputs (one row per input).

    ``morf``/``lerf``: ``(batch, K+1)`` explained logit after removing ``m_k`` tokens; ``*_prob``: the softmax
    probability of the same class; ``fractions``: ``x_k = k / K``; ``removed``: ``(batch, K+1)`` the ``m_k``.
    """

    fractions: np.ndarray
    removed: np.ndarray
    morf: np.ndarray
    lerf: np.ndarray
    morf_prob: np.ndarray
    lerf_prob: np.ndarray
    comprehensiveness: np.ndarray
    sufficiency: np.ndarray
    target: np.ndarray
    position: np.ndarray | None

    @property
    def area_morf(self) -> np.ndarray:
        return _area(self.morf, self.fractions)

    @property
    def area_lerf(self) -> np.ndarray:
        return _area(self.lerf, self.fractions)

    @property
    def faithfulness(self) -> np.ndarray:
        """``A(LeRF) - A(MoRF)`` per input (logit units)."""
        return self.area_lerf - self.area_morf


def _area(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return ((y[:, 1:] + y[:, :-1]) * 0.5 * np.diff(x)).sum(-1)


def removal_counts(n: int, steps: int) -> np.ndarray:
    """``m_k = floor(k n / K + 1/2)`` tokens removed at step ``k = 0..K``."""
    return np.floor(np.arange(steps + 1) * n / steps + 0.5).astype(np.int64)


class Evaluator:
    """Faithfulness evaluation of token attributions for an ONNX model with an embedding lookup.

    model: path or ``ModelProto``. id_input: the token input (default: the one with an embedding lookup).
    baseline: ``(hidden,)`` vector that replaces removed embeddings (default zero, the AttnLRP protocol).
    max_batch: perturbed copies per onnxruntime run, and rows per Integrated Gradients relevance pass.
    output: the explained graph output (default: the explainer's default output).
    """

    def __init__(
        self,
        model: Any,
        *,
        id_input: str | None = None,
        baseline: np.ndarray | None = None,
        providers: Sequence[Any] | None = None,
        max_batch: int = 64,
        output: str | None = None,
    ):
        self.proto, self.source, _ = load_model(model)
        self.providers = providers
        self.perturber = Perturber(self.proto, id_input=id_input, baseline=baseline, providers=providers,
                                   max_batch=max_batch)
        self.token_input = self.perturber.token_input
        self._explainers: dict[tuple, Explainer] = {}
        self._ig_model: onnx.ModelProto | None = None
        self._rollout: tuple[ForwardCapture, list[str]] | None = None
        ref = self.explainer("gradient-x-input")
        self.output = output or ref.default_output
        if self.output not in ref.output_names:
            raise TargetError(f"{self.source}: no graph output {output!r}; outputs: {ref.output_names}")

    # ------------------------------------------------------------------ attributions
    def explainer(self, composite: str) -> Explainer:
        """The (cached) :class:`Explainer` of the model for ``composite``."""
        key = ("model", composite)
        if key not in self._explainers:
            self._explainers[key] = Explainer(self.proto, composite, providers=self.providers,
                                              sources=[self.token_input])
        return self._explainers[key]

    def release(self) -> None:
        """Drop the cached explainers and rollout session (their copies of the weights) except the one that
        fills default inputs; they are rebuilt on demand."""
        keep = ("model", "gradient-x-input")
        self._explainers = {keep: self._explainers[keep]}
        self._rollout = None

    def feeds(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The model's feeds with defaults filled in (attention_mask, token_type_ids, position_ids)."""
        return self.explainer("gradient-x-input").prepare_inputs(inputs)

    def predict(self, inputs: Mapping[str, Any], target: Any = None, position: Any = None):
        """(target (batch,), position (batch,) or None): the predicted class/next token at the explained
        position (default: the last non-padding token) unless given."""
        feeds = self.feeds(inputs)
        ids = feeds[self.token_input]
        (y,) = self.perturber.forward(feeds, np.ones(ids.shape), [self.output])
        B = ids.shape[0]
        pos = None
        if y.ndim == 3:
            if position is None:
                pos = last_token(feeds, B, y.shape[1])
            else:
                pos = np.broadcast_to(np.asarray(position, dtype=np.int64), (B,)) % y.shape[1]
            y = y[np.arange(B), pos]
        elif position is not None:
            raise TargetError(f"{self.source}: position given, but output {self.output!r} has no sequence axis")
        tgt = y.argmax(-1) if target is None else np.broadcast_to(np.asarray(target, dtype=np.int64), (B,))
        return np.array(tgt), pos

    def attribute(self, method: str, inputs: Mapping[str, Any], target: Any = None, position: Any = None, *,
                  ig_steps: int = 16, seed: int | None = None) -> np.ndarray:
        """Token relevance ``(batch, seq)`` of ``method`` (one of :data:`METHODS`) for ``target`` at ``position``."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        feeds = self.feeds(inputs)
        if method == "random":
            return np.random.default_rng(seed).standard_normal(feeds[self.token_input].shape)
        tgt, pos = self.predict(inputs, target, position)
        if method in ("attnlrp", "cp-lrp", "gradient-x-input", "gradient"):
            res = self.explainer(method).explain(feeds, tgt, pos, output=self.output)
            return res.relevance[self.token_input]
        if method == "integrated-gradients":
            return self._integrated_gradients(feeds, tgt, pos, ig_steps)
        return self._attention_rollout(feeds, pos)

    def _integrated_gradients(self, feeds, tgt, pos, steps: int) -> np.ndarray:
        """``sum_h e * mean_j grad f(alpha_j e)``: gradient x input on the masked graph with ``m = alpha_j``
        gives ``alpha_j * sum_h e * grad f(alpha_j e)`` per row."""
        key = ("ig", "gradient-x-input")
        if key not in self._explainers:
            self._explainers[key] = Explainer(self.perturber.model, "gradient-x-input", providers=self.providers,
                                              sources=[self.token_input])
        ex = self._explainers[key]
        B, S = feeds[self.token_input].shape
        alphas = (np.arange(steps) + 0.5) / steps
        group = max(1, self.perturber.max_batch // steps)  # inputs per relevance pass (bounds the memory)
        out = np.zeros((B, S))
        for b0 in range(0, B, group):
            sl = slice(b0, min(B, b0 + group))
            n = sl.stop - sl.start
            rep = {k: np.repeat(v[sl], steps, axis=0) for k, v in feeds.items()}
            rep[self.perturber.mask_input] = np.broadcast_to(
                np.tile(alphas, n)[:, None, None], (n * steps, S, 1)).astype(self.perturber.mask_dtype)
            res = ex.explain(rep, np.repeat(tgt[sl], steps), None if pos is None else np.repeat(pos[sl], steps),
                             output=self.output)
            r = res.relevance[self.token_input].reshape(n, steps, S)
            out[sl] = (r / alphas[None, :, None]).mean(1)
        return out

    def _attention_rollout(self, feeds, pos) -> np.ndarray:
        """Attention rollout: ``prod_l (A_l + I) / 2`` over layers (heads averaged), read at the explained
        row (the explained position, or the first token for a sequence classifier)."""
        if self._rollout is None:
            graph = Graph(self.proto, self.source)
            names = [n.outputs[0] for n in graph.nodes if n.op_type == "Softmax"]
            if not names:
                raise InputError(f"{self.source}: attention rollout needs the attention weights (Softmax nodes)")
            cap = ForwardCapture(graph, resolve_device("cpu", self.providers))
            cap.prepare(set(names), set())
            self._rollout = (cap, names)
        cap, names = self._rollout
        values, _ = cap.run(feeds, names, [])
        B, S = feeds[self.token_input].shape
        layers = [values[n] for n in names if values[n].ndim == 4 and values[n].shape[-2:] == (S, S)]
        if not layers:
            raise InputError(f"{self.source}: no Softmax output has the attention layout (batch, heads, seq, seq)")
        roll = np.broadcast_to(np.eye(S), (B, S, S))
        for a in layers:
            a = 0.5 * np.nan_to_num(a.astype(np.float64)).mean(1) + 0.5 * np.eye(S)  # fully masked rows: NaN
            roll = a / a.sum(-1, keepdims=True) @ roll
        row = np.zeros(B, dtype=np.int64) if pos is None else pos
        return roll[np.arange(B), row]

    # ------------------------------------------------------------------ perturbation
    def evaluate(
        self,
        inputs: Mapping[str, Any],
        relevance: np.ndarray,
        target: Any = None,
        position: Any = None,
        *,
        steps: int = 10,
        perturbable: np.ndarray | None = None,
        bins: Sequence[float] = ERASER_BINS,
    ) -> Faithfulness:
        """MoRF/LeRF curves in ``steps`` steps and ERASER scores for ``relevance`` ``(batch, seq)``.

        perturbable: ``(batch, seq)`` booleans, the tokens that may be removed (default: ``attention_mask > 0``;
        pass e.g. ``False`` for [CLS]/[SEP]). target/position: default the prediction at the last token.
        """
        feeds = self.feeds(inputs)
        ids = feeds[self.token_input]
        B, S = ids.shape
        rel = np.asarray(relevance, dtype=np.float64)
        if rel.shape != (B, S):
            raise InputError(f"relevance must be (batch, seq) = {(B, S)}, got {rel.shape}")
        if not np.all(np.isfinite(rel)):
            raise InputError("relevance holds NaN or inf")
        if perturbable is None:
            mask = feeds.get("attention_mask")
            perturbable = mask[:, -S:] > 0 if mask is not None else np.ones((B, S), bool)
        perturbable = np.asarray(perturbable, dtype=bool)
        if perturbable.shape != (B, S):
            raise InputError(f"perturbable must be (batch, seq) = {(B, S)}, got {perturbable.shape}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        tgt, pos = self.predict(inputs, target, position)
        nb = len(bins)
        out = {k: np.zeros((B, steps + 1)) for k in ("morf", "lerf", "morf_prob", "lerf_prob")}
        removed = np.zeros((B, steps + 1), dtype=np.int64)
        comp, suff = np.zeros(B), np.zeros(B)
        for b in range(B):
            cand = np.flatnonzero(perturbable[b])
            n = cand.size
            if n == 0:
                raise InputError(f"input {b} has no perturbable token")
            morf_order = cand[np.argsort(-rel[b, cand], kind="stable")]
            lerf_order = cand[np.argsort(rel[b, cand], kind="stable")]
            m = removal_counts(n, steps)
            removed[b] = m
            masks = [_remove(S, morf_order[:k]) for k in m] + [_remove(S, lerf_order[:k]) for k in m[1:-1]]
            top = [min(n, max(1, int(np.ceil(q * n)))) for q in bins]
            masks += [_remove(S, morf_order[:k]) for k in top] + [_remove(S, morf_order[k:]) for k in top]
            logit, prob = self._scores({k: v[b : b + 1] for k, v in feeds.items()}, np.stack(masks), tgt[b],
                                       None if pos is None else pos[b])
            K1 = steps + 1
            out["morf"][b], out["morf_prob"][b] = logit[:K1], prob[:K1]
            out["lerf"][b, 1:-1], out["lerf_prob"][b, 1:-1] = logit[K1 : K1 + steps - 1], prob[K1 : K1 + steps - 1]
            for key in ("lerf", "lerf_prob"):
                src = out["morf" if key == "lerf" else "morf_prob"][b]
                out[key][b, 0], out[key][b, -1] = src[0], src[-1]
            e = K1 + steps - 1
            comp[b] = prob[0] - prob[e : e + nb].mean()
            suff[b] = prob[0] - prob[e + nb : e + 2 * nb].mean()
        return Faithfulness(np.arange(steps + 1) / steps, removed, out["morf"], out["lerf"], out["morf_prob"],
                            out["lerf_prob"], comp, suff, tgt, pos)

    def _scores(self, feeds, masks: np.ndarray, tgt: int, pos: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Logit and softmax probability of ``tgt`` (at ``pos``) for each mask row."""

        def reduce(outs, _rows):
            y = outs[0]
            if y.ndim == 3:
                y = y[:, pos]
            y = y.astype(np.float64)
            z = y - y.max(-1, keepdims=True)
            logp = z[:, tgt] - np.log(np.exp(z).sum(-1))
            return y[:, tgt], np.exp(logp)

        parts = self.perturber.run(feeds, masks, [self.output], reduce)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _remove(seq: int, positions: np.ndarray) -> np.ndarray:
    m = np.ones(seq)
    m[positions] = 0.0
    return m
