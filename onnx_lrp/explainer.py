"""The public entry point: :class:`Explainer` (load -> analyse -> forward -> reverse) and :class:`Explanation`."""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from ._analysis import Analysis, analyse, graph_output_is_float
from ._canonize import canonize, needs_canonizing
from ._capture import ForwardCapture, default_session_options
from ._device import Device, resolve_device
from ._engine import Env, Plan, blas_threads, compile_plan, conditionable, run_plan, to_compute
from ._engine import as_numpy as to_numpy
from ._graph import Graph, load_split
from ._inputs import InputChecks, feed_shapes, past_length
from ._kernels import Gemm, usable_cores
from ._memory import Shapes, available_bytes, chunks_for, estimate, human, parse_bytes, return_freed_memory
from ._recompute import Recompute, RecomputeCache
from ._rows import check_rows, find_row_head, is_gather_failure, rows_feed, scatter_rows
from .composites import Composite, get_composite
from ._patterns import output_layout, right_padding_only
from .errors import InputError, RelevanceWarning, ResourceError, TargetError
from .ops.attention_blocks import BLOCK_BYTES, find_blocks
from .ops.contrib_attention import cache_head_size
from .rules import Rule


PREPACK_MIN_BYTES = 16 << 20  # weights below this are not pre-packed automatically (_packing_fits)
SHORT_INPUT = 512  # elements per input up to which attention probabilities are captured (fastest; _fitting_plan)


@dataclass
class Explanation:
    """Result of :meth:`Explainer.explain`.

    ``relevance[input]``: per graph input. Token inputs (ids) get ``(batch, seq)`` (the embedding relevance
    summed over the hidden axis); float inputs get an array of the input's shape. With several targets per
    batch element a target axis follows the batch axis: ``(batch, targets, ...)``.
    ``embedding_relevance[input]``: the un-summed ``(batch, seq, hidden)`` relevance of token inputs.
    ``outputs``: the forward outputs (with ``explain(full_output=False)``, the explained output at the explained
    positions only: ``(batch, k, classes)``). ``score``: the explained quantity ``sum(w * y)`` per batch element
    (the logit for a one-hot start). ``latent[name]``: relevance at collected intermediate tensors;
    ``activations[name]``: their forward values; ``latent_gradient[name]``: the modified gradient ``G`` there
    (``latent = tensor * G``).
    """

    relevance: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    score: np.ndarray
    target: np.ndarray | None
    position: np.ndarray | None
    latent: dict[str, np.ndarray] = field(default_factory=dict)
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    embedding_relevance: dict[str, np.ndarray] = field(default_factory=dict)
    output: str = ""
    latent_gradient: dict[str, np.ndarray] = field(default_factory=dict)


class Explainer:
    """Explain an ONNX transformer with LRP.

    Parameters
    ----------
    model
        path to an ``.onnx`` file (external data next to it is read), a folder holding one, or a
        ``onnx.ModelProto`` (left unchanged; tensors it keeps in external files are read from ``base_dir``).
    composite
        ``"attnlrp"`` (default), ``"cp-lrp"``, ``"gradient-x-input"``, ``"gradient"``, ``"vit-lrp"``
        or a :class:`~onnx_lrp.composites.Composite`.
    overrides
        extra rules by op type or node-name pattern, e.g. ``{"/model/layers.0/*": Gradient()}``.
    providers
        onnxruntime execution providers (default CPU).
    dtype
        compute dtype of the relevance pass, ``"float32"`` (default) or ``"float64"``; fp16/bf16 models
        are explained in this dtype.
    sources
        graph inputs to explain (default: float inputs except ``past_*``, and integer inputs whose embedding
        lookups enter the model as a term: token, segment, learned position ids, not RoPE position ids; see
        :func:`onnx_lrp._analysis.is_additive_lookup`).
    allow_unsupported
        treat ops without a rule as constants instead of failing.
    session_options
        ``onnxruntime.SessionOptions`` for the forward session (default:
        :func:`onnx_lrp._capture.default_session_options` with ``threads`` intra-op threads: priority-based
        execution order, no thread spinning).
    device
        ``"cpu"`` (default), ``"cuda"`` (onnxruntime-gpu forward, captured tensors kept on the GPU, CuPy
        relevance pass; raises :class:`~onnx_lrp._device.DeviceError` naming what is missing) or ``"auto"``
        (CUDA when usable, else CPU with a logged warning). ``self.device`` / ``self.device_reason`` say which.
    threads
        threads of the forward pass (onnxruntime's intra-op pool, unless ``session_options`` say otherwise) and of
        the relevance pass's products with the weights and its float32 attention products (:mod:`onnx_lrp._kernels`,
        onnxruntime's MLAS kernels); default: the cores this process may use. The two passes run one after the
        other, so they never compete for the cores. numpy's BLAS, left with the small products, runs one thread
        (with two, OpenBLAS made explanations up to 22x slower on the shared 2-core machine: docs/performance.md).
    blas_threads
        deprecated (use ``threads``): numpy BLAS threads during the relevance pass (default 1).
    memory_budget
        the most memory an explanation may take beyond the loaded model (bytes, or ``"6GB"``); default: the
        memory available. Long inputs whose estimated need exceeds it raise :class:`~onnx_lrp.errors.ResourceError`
        before anything runs (:mod:`onnx_lrp._memory`); a tighter budget selects the lean plan (more recomputed).
    prepack
        let onnxruntime pre-pack the weights for its matrix kernels, in the forward pass and for the relevance
        pass's products (faster, most on short inputs; costs about one more copy of the weights per use: SmolLM2
        +1.4 GB). ``False``: each weight held once, packed at every product. Default (``None``): on the CPU with
        the Explainer's own session options, short inputs run pre-packed when two more copies of the weights
        take at most an eighth of the memory available (SmolLM2: +1.1 GB; docs/performance.md); the first
        long input (beyond :data:`SHORT_INPUT`) drops the packed copies for good.
    base_dir
        the folder holding the external data files of a ``ModelProto`` ``model`` (never the working
        directory); not needed for paths.

    Notes
    -----
    One Explainer may be used from several threads: plans and sessions are built under a lock.
    """

    def __init__(
        self,
        model: str | os.PathLike | onnx.ModelProto,
        composite: str | Composite = "attnlrp",
        *,
        overrides: Mapping[str, Rule] | None = None,
        providers: Sequence[Any] | None = None,
        dtype: str | np.dtype = "float32",
        sources: Sequence[str] | None = None,
        allow_unsupported: bool = False,
        session_options: Any = None,
        device: str = "cpu",
        threads: int | None = None,
        blas_threads: int | None = None,
        memory_budget: int | str | None = None,
        prepack: bool | None = None,
        base_dir: str | os.PathLike | None = None,
    ):
        self._device: Device = resolve_device(device, list(providers) if providers else None)
        self.graph = load_graph(model, base_dir)
        self.composite = get_composite(composite, overrides)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64 (fp16 relevance underflows), got {self.dtype}")
        self.xp = self._device.xp
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads or usable_cores()
        if blas_threads is not None:
            warnings.warn("Explainer(blas_threads=...) is deprecated: use threads=...", DeprecationWarning, stacklevel=2)
        self.blas_threads = blas_threads or 1
        self.memory_budget = parse_bytes(memory_budget) if memory_budget is not None else None
        own_options = session_options is None
        if own_options:
            session_options = default_session_options()
            session_options.intra_op_num_threads = self.threads
        self._gemm = Gemm(self.threads) if self._device.name == "cpu" else None
        self.analysis: Analysis = analyse(
            self.graph, self.composite, list(sources) if sources is not None else None, allow_unsupported
        )
        self._checks = InputChecks(self.graph, set(self.analysis.sources.values()) | self.analysis.token_inputs)
        self._plans: dict[tuple, Plan] = {}
        self._lock = threading.Lock()
        self._warned = False  # the conservation guard warns once per Explainer
        self._right_padded = right_padding_only(self.graph)
        self._static: dict[str, Any] = {}
        self.default_output = self._default_output()
        blocks = find_blocks(self.graph, self.analysis.carrying, self.analysis.region_of, self.analysis.regions,
                             set(self.graph.output_names))
        # the default output's head runs at the fed rows only (all of them unless explain(full_output=False))
        self._rows = find_row_head(self.graph, self.analysis.carrying, self.default_output)
        # short inputs: attention probabilities captured; long inputs: attention blocks, chunkable (_fitting_plan)
        self._capture = ForwardCapture(self.graph, self._device, session_options, prepack=bool(prepack),
                                       rows=self._rows)
        self._capture_long = ForwardCapture(self.graph, self._device, session_options, blocks, bool(prepack),
                                            share=self._capture, rows=self._rows)
        # prepack=None: short inputs pre-packed while the packed copies are cheap (dropped by _unpack)
        self._auto_packed = (prepack is None and own_options and self._gemm is not None
                             and _packing_fits(self._capture.weights.values()))
        if self._auto_packed:  # options of its own: pre-packing registers the weights with them
            self._capture.set_prepack(True, _threads_like(default_session_options(), session_options))
        if (prepack or self._auto_packed) and self._gemm is not None:  # the relevance pass's products too
            self._gemm.prepack(list(self._capture.weights.values()))
        self._recompute = Recompute(lambda: _threads_like(default_session_options(), session_options))
        self._shapes = Shapes(self.graph)
        self._plan(self.default_output, (), "capture")

    # ------------------------------------------------------------------ public
    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self.graph.output_names)

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"``: where the forward and relevance passes run."""
        return self._device.name

    @property
    def device_reason(self) -> str:
        """Why :attr:`device` was chosen (``"requested"``, or what made ``device="auto"`` fall back to the CPU)."""
        return self._device.reason

    @property
    def providers(self) -> list[str]:
        """The execution providers onnxruntime actually uses."""
        return self._capture.active_providers

    def explain(
        self,
        inputs: Mapping[str, Any],
        target: int | Sequence[int] | np.ndarray | None = None,
        position: int | Sequence[int] | np.ndarray | None = None,
        *,
        output: str | None = None,
        output_relevance: np.ndarray | None = None,
        collect: Sequence[str] = (),
        conditions: Mapping[str, Any] | None = None,
        as_numpy: bool = True,
        batch_axis: int | None = None,
        position_axis: int | None = None,
        check_conservation: bool = True,
        full_output: bool = True,
    ) -> Explanation:
        """Explain ``output`` at ``target`` (class/token id) and ``position`` (sequence index).

        target: an int, one id per batch element, or a ``(batch, k)`` array of k targets per element
            (explained together in one batched pass). Default: the model's prediction (argmax).
        position: for outputs with a sequence axis ``(batch, seq, classes)``: an int, one per batch element,
            or ``(batch, k)`` with k targets. Default: the last non-padding token (from ``attention_mask``).
        output_relevance: start weights ``w`` replacing the one-hot: ``R_out = w * y`` (e.g. ``+1``/``-1``
            for a contrastive explanation); the output's shape, or ``(k,) + shape`` for k explanations.

        collect: intermediate tensor names whose relevance is returned in ``latent``.

        conditions: tensor name -> mask (an array, or a function of the gradient): only the relevance flowing
            through the tensor's unmasked entries reaches the inputs (conditional relevance). The mask multiplies
            the tensor's modified gradient, of shape ``(k,) + tensor shape`` with k targets. See
            :mod:`onnx_lrp.latent`.

        as_numpy: return numpy arrays (default); ``False`` keeps CuPy arrays on ``device="cuda"``.

        batch_axis, position_axis: the output's batch and sequence axes (default: read from the graph, which names
            the output's batch dimension after the inputs' batch, e.g. ``(T, N, C)`` of a CTC recogniser; else from the
            sizes; else ``(batch, seq, classes)``); classes are the last axis.
        full_output: ``False``: a language model's head (the product with the output weight, and soft-capping after
            it: :mod:`onnx_lrp._rows`) is computed at the explained positions only, and ``outputs[output]`` holds
            those rows, ``(batch, k, classes)`` (row j: position ``position[:, j]``) instead of every position's
            logits: faster (SmolLM2: the head is 21% of the forward) and without the ``seq x vocab`` tensors
            (1.6 GB at 8,192 tokens). The same relevance; not with ``output_relevance``, ``collect`` or
            ``conditions`` on the head's tensors, a rule on the head that reads its input (gamma), nor on models
            without such a head: then the full output.
        check_conservation: under a conserving composite, warn once (:class:`~onnx_lrp.errors.RelevanceWarning`)
            when the summed input relevance is more than 10x the explained score, naming the first tensor where it
            blew up (not with ``conditions``: the conditioned part need not conserve the score).
        """
        output = output or self.default_output
        if output not in self.graph.output_names:
            raise TargetError(f"{self.graph.source}: no graph output {output!r}; outputs: {self.graph.output_names}")
        collect = tuple(collect)
        for name in collect:
            if name not in self.analysis.carrying:
                raise TargetError(
                    f"collect: tensor {name!r} carries no relevance (not in the graph, or a constant for the rules)"
                )
        feeds = self.prepare_inputs(inputs)
        self._check_padding(feeds)
        plan, capture, chunks = self._fitting_plan(output, collect, feeds)
        conditions = dict(conditions or {})
        if conditions:
            reachable = conditionable(plan)
            bad = [n for n in conditions if n not in reachable]
            if bad:
                raise TargetError(f"conditions: tensor(s) {bad} are not on the relevance path of output {output!r} "
                                  "(not in the graph, constants for the rules, or inside a fused activation)")
        xp, dtype = self.xp, self.dtype
        head = self._rows if (not full_output and output_relevance is None and self._rows is not None
                              and output == self._rows.output and batch_axis in (None, 0)
                              and position_axis in (None, 1)
                              and not set(self._rows.tensors) & (set(collect) | set(conditions))
                              and self._head_on_rows(plan)) else None
        if head is not None:  # the explained positions are known before the forward
            B, S = feeds[head.feed].shape[0], feeds[head.feed].shape[head.axis]
            tgt0, rows, multi, n_rows = self._targets_positions(target, position, feeds, B, S)
        dynamic = self._captured(plan, feeds)
        static_now = [v for v in dynamic if v in self.graph.static]
        want_values = list(dict.fromkeys(self.graph.output_names + dynamic))
        outs = set(self.graph.output_names)  # returned anyway: their shapes come from their values
        want_shapes = [s for s in plan.shapes
                       if s not in plan.values and s not in feeds and s not in self._static and s not in outs]
        if head is not None and head.h not in feeds:
            want_shapes.append(head.h)  # the rows were chosen for (B, S): check_rows
        try:
            values, shapes = capture.run(rows_feed(head, feeds, rows) if head is not None else feeds, want_values,
                                         want_shapes, chunks)
        except InputError as exc:
            if head is not None and is_gather_failure(exc):
                check_rows(head, None, B, S, self.graph.source)
            raise
        shapes.update((s, tuple(values[s].shape)) for s in plan.shapes if s in outs and s not in plan.values)
        outputs = {k: values[k] for k in self.graph.output_names}
        for v in static_now:
            self._static[v] = to_compute(xp, dtype, values.pop(v))
        graph_dtype = {k: v.dtype for k, v in values.items()}  # recompute programs read leaves in these dtypes
        run_values = {k: to_compute(xp, dtype, v) for k, v in values.items() if k in plan.values}
        for k, v in feeds.items():
            run_values[k] = to_compute(xp, dtype, v)
        del values  # run_values holds the only references: the engine frees each tensor after its last use
        y = outputs[output]
        expand = {}
        if head is not None:
            check_rows(head, feeds[head.h].shape if head.h in feeds else shapes[head.h], B, S, self.graph.source)
            w, lead, tgt, pos = self._one_hot_rows(to_numpy(y), tgt0, rows, multi, n_rows, feeds)
            b = 0
            expand[head.h] = lambda g: scatter_rows(xp, g, xp.asarray(rows), S)
        else:
            w, lead, tgt, pos, b = self._start(to_numpy(y), target, position, output_relevance, feeds, output,
                                               batch_axis, position_axis)
        recomputed = None
        if plan.recompute:
            def leaf(t):
                return feeds[t] if t in feeds else to_numpy(run_values[t]).astype(graph_dtype[t], copy=False)

            recomputed = RecomputeCache(self._recompute, plan.recompute, leaf, lambda a: to_compute(xp, dtype, a))
        env = Env(xp, dtype, lead, run_values, shapes, self._static, recomputed, self._gemm)
        w = xp.asarray(w, dtype=dtype)
        with blas_threads(xp, self.blas_threads):
            grads = run_plan(plan, env, {output: w}, {k: _as_condition(xp, dtype, m) for k, m in conditions.items()},
                             expand)
        # score = sum(w * y) per batch element (and target), without a temporary of the output's size
        wb = xp.moveaxis(w, lead + b, lead)
        w2 = wb.reshape(wb.shape[: lead + 1] + (-1,))
        yb = xp.moveaxis(xp.asarray(y, dtype=dtype), b, 0)
        score = xp.einsum("...bn,bn->...b", w2, yb.reshape(w2.shape[lead], -1))
        relevance, emb_rel = self._source_relevance(grads, env, feeds, lead)
        if check_conservation and not conditions and self.composite.conserving and not self._warned:
            full_w = (lambda: scatter_rows(np, to_numpy(w), rows, S)) if head is not None else (lambda: w)
            self._check_conservation(relevance, score, lead, inputs, output, full_w, y)
        latent, activations, latent_grad = {}, {}, {}
        for name in collect:
            t = env[name]
            g = grads.get(name)
            g = xp.zeros((1,) * lead + t.shape, dtype=dtype) if g is None else g
            latent[name] = _batch_first(t * g, lead)
            latent_grad[name] = _batch_first(g, lead)
            activations[name] = t
        host = to_numpy if as_numpy else (lambda a: a)
        relevance = {k: host(v) for k, v in relevance.items()}
        emb_rel = {k: host(v) for k, v in emb_rel.items()}
        latent = {k: host(v) for k, v in latent.items()}
        activations = {k: host(v) for k, v in activations.items()}
        latent_grad = {k: host(v) for k, v in latent_grad.items()}
        outputs = {k: host(v) for k, v in outputs.items()}
        score = host(_batch_first(score, lead))
        return Explanation(
            relevance=relevance,
            outputs=outputs,
            score=score,
            target=tgt,
            position=pos,
            latent=latent,
            activations=activations,
            embedding_relevance=emb_rel,
            output=output,
            latent_gradient=latent_grad,
        )

    def forward(self, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """A plain forward pass (no relevance), inputs validated and filled as in :meth:`explain`;
        returns ``outputs`` (default: all graph outputs; intermediate tensors computed from the inputs too) by
        name."""
        names = list(outputs) if outputs is not None else self.output_names
        inner = [n for n in names if n not in self.graph.output_names]
        bad = [n for n in inner if n not in self.graph.producer or n in self.graph.static]
        if bad:
            raise TargetError(f"{self.graph.source}: no graph output(s) or computed tensor(s) {bad}; "
                              f"outputs: {self.graph.output_names}")
        feeds = self.prepare_inputs(inputs)
        if max((v.size for v in feeds.values()), default=0) <= SHORT_INPUT:
            if inner:
                self._capture.prepare(set(inner), set())
            values, _ = self._capture.run(feeds, names, [])
        else:  # attention in chunks of rows where long; no probabilities kept
            self._plan(self.default_output, ())
            if inner:
                self._capture_long.prepare(set(inner), set())
            values, _ = self._capture_long.run(feeds, names, [], chunks_for(self._capture_long.chunkable(),
                                                                            self._shapes(feeds)))
        return {k: np.array(to_numpy(v)) for k, v in values.items()}  # copies: values may view ORT's memory

    def prepare_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The feeds :meth:`explain` and :meth:`forward` run the model on: ``inputs`` checked against the
        model (:mod:`onnx_lrp._inputs`: names, kind, rank, fixed and named sizes, finite values, masks, ids and
        positions inside the model's tables; cast to the declared dtypes) and the inputs transformers fills
        itself added (``attention_mask``, ``position_ids``, ``token_type_ids``, empty ``past_*`` caches).
        Raises :class:`~onnx_lrp.errors.InputError` naming the input, what the model expects and what was given."""
        feeds = self._checks.convert(inputs)
        expected = {i.name: i for i in self.graph.inputs}
        self._fill_defaults(feeds, expected)
        missing = [n for n in expected if n not in feeds]
        if missing:
            raise InputError(f"{self.graph.source}: missing input(s) {missing}; the model's inputs are "
                             f"{list(expected)}")
        self._checks.check(feeds, given=inputs)
        return feeds

    # ------------------------------------------------------------------ internals
    def _head_on_rows(self, plan: Plan) -> bool:
        """Whether the plan's steps of the row-restricted head can run on the explained rows: they read no value
        of the head's input ``h`` (which stays whole; the gamma rule on the head's product reads it)."""
        head = set(self._rows.tensors)
        return all(self._rows.h not in r for step, r in zip(plan.steps, plan.reads) if set(step.outputs) <= head)

    def _default_output(self) -> str:
        for name in self.graph.output_names:
            if graph_output_is_float(self.graph, name) and name in self.analysis.carrying:
                return name
        raise TargetError(
            f"{self.graph.source}: no float graph output depends on the relevance sources "
            f"{sorted(set(self.analysis.sources.values()))}; outputs: {self.graph.output_names}"
        )

    def _plan(self, output: str, collect: tuple[str, ...], mode: str = "blocks") -> Plan:
        """The compiled plan (cached): ``mode`` ``"capture"`` (attention probabilities captured), ``"blocks"``
        (attention recomputed in blocks) or ``"lean"`` (and cheap values recomputed), see
        :func:`onnx_lrp._engine.compile_plan`; its tensors are added to the capture session that runs it."""
        key = (output, collect, mode)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        with self._lock:  # one thread compiles a plan and extends the capture session at a time
            return self._compile(key)

    def _compile(self, key: tuple[str, tuple[str, ...], str]) -> Plan:
        output, collect, mode = key
        plan = self._plans.get(key)
        if plan is None:
            if output not in self.analysis.carrying:
                raise TargetError(f"{self.graph.source}: output {output!r} does not depend on any relevance source")
            plan = compile_plan(self.graph, self.analysis, output, self.xp, self.dtype, collect,
                                blocks=mode != "capture", lean=mode == "lean")
            for name in list(plan.values) + list(plan.shapes):
                c = self.graph.constant(name)
                if c is not None and name not in self._static:
                    self._static[name] = to_compute(self.xp, self.dtype, c)
            head_input = {self._rows.h} if self._rows is not None else set()  # its shape: check_rows
            (self._capture if mode == "capture" else self._capture_long).prepare(
                {v for v in plan.values if v not in self._static} | set(self.graph.output_names),
                {s for s in plan.shapes if s not in self._static} | head_input,
            )
            self._plans[key] = plan
        return plan

    def _unpack(self) -> None:
        """End automatic pre-packing (``prepack=None``): drop the packed copies of the weights before a long input
        runs (they would count against its memory) and run unpacked from then on."""
        with self._lock:
            if not self._auto_packed:
                return
            self._auto_packed = False
            self._capture.set_prepack(False, self._capture_long.session_options)
            if self._gemm is not None:
                self._gemm.unpack()
        return_freed_memory()

    def _captured(self, plan: Plan, feeds: Mapping[str, Any]) -> list[str]:
        """The plan's values the forward run returns (not constants, not inputs)."""
        return [v for v in plan.values if v not in self._static and v not in feeds]

    def _fitting_plan(self, output: str, collect: tuple[str, ...], feeds: dict[str, np.ndarray]
                      ) -> tuple[Plan, ForwardCapture, int]:
        """The plan for ``output``, the capture that runs its forward and the chunks per attention block.

        Up to :data:`SHORT_INPUT` elements in an input: the plan that reads captured attention probabilities
        (fastest). Longer: attention blocks recomputed (memory linear in the tokens) if its estimated need
        (:func:`onnx_lrp._memory.estimate`) fits ``memory_budget`` and half the memory available (the machine may
        be shared); else the lean plan (cheap values recomputed too) if it fits the budget and all that is
        available; else :class:`ResourceError`.
        """
        if max((v.size for v in feeds.values()), default=0) <= SHORT_INPUT:
            return self._plan(output, collect, "capture"), self._capture, 1
        self._unpack()
        plan = self._plan(output, collect)
        shapes = self._shapes(feeds)
        cap = self._capture_long
        if not shapes.shapes:  # shape inference gave up: no estimate
            return plan, cap, 1
        chunkable = cap.chunkable()
        chunks = chunks_for(chunkable, shapes)
        avail = available_bytes()
        limits = [(b, w) for b, w in ((avail, "available"), (self.memory_budget, "the memory_budget")) if b]
        if not limits:
            return plan, cap, chunks
        limit, what = min(limits)
        for mode, share in (("blocks", 0.5), ("lean", 1.0)):
            plan = self._plan(output, collect, mode)
            est = estimate(shapes, self._captured(plan, feeds), self.graph.output_names, cap.attention.values(),
                           chunks, self.dtype.itemsize, BLOCK_BYTES, chunked={b.pv.name for b in chunkable})
            if est.total <= min(limit, share * avail if avail else limit):
                return plan, cap, chunks
        ids = next((v for k, v in feeds.items() if "ids" in k and v.ndim == 2), None)
        what_runs = (f"{ids.shape[-1]} tokens (batch {ids.shape[0]})" if ids is not None
                     else f"inputs of shapes {feed_shapes(feeds)}")
        raise ResourceError(
            f"{self.graph.source}: explaining {what_runs} needs about "
            f"{est.describe()}, but {human(limit)} is {what}; explain fewer tokens or a smaller batch"
            + (", or raise memory_budget" if what == "the memory_budget" else ""))

    def _fill_defaults(self, feeds: dict[str, np.ndarray], expected: dict) -> None:
        """Fill the inputs transformers fills itself: attention_mask (ones), position_ids (from the mask),
        token_type_ids and global_attention_mask (zeros; Longformer), empty past key/values caches; and
        GroupQueryAttention's ``seqlens_k`` (valid lengths - 1, from the mask) and ``total_sequence_length`` where a
        graph takes them as inputs."""
        ids = next((feeds[n] for n in ("input_ids", "decoder_input_ids") if n in feeds), None)
        ref = ids if ids is not None else next((v for v in feeds.values() if v.ndim >= 2), None)
        if ref is None:
            return
        # ids: (batch, seq), or (batch, choices, seq) for multiple-choice heads (sequence axis last)
        lead, s = (ref.shape[:-1], ref.shape[-1]) if ids is not None else (ref.shape[:1], ref.shape[1])
        b = ref.shape[0]
        for name, spec in expected.items():
            if name in feeds:
                continue
            if name == "attention_mask":
                past = past_length(feeds)
                feeds[name] = np.ones(lead + (s + past,), dtype=spec.numpy_dtype)
            elif name in ("token_type_ids", "global_attention_mask"):
                feeds[name] = np.zeros(lead + (s,), dtype=spec.numpy_dtype)
            elif name.startswith("past") and spec.is_float:
                dims = [b if k == 0 else (d if isinstance(d, int) and d > 0 else 0) for k, d in enumerate(spec.shape)]
                if len(dims) == 4 and not dims[3]:  # head size left symbolic (onnxruntime-genai graphs)
                    dims[3] = cache_head_size(self.graph, name) or 0
                feeds[name] = np.zeros(dims, dtype=spec.numpy_dtype)
        past = past_length(feeds)
        mask = feeds.get("attention_mask")
        if "seqlens_k" in expected and "seqlens_k" not in feeds:  # GroupQueryAttention: valid length - 1
            lengths = mask.sum(-1) if mask is not None else np.full(b, s + past)
            feeds["seqlens_k"] = (lengths - 1).astype(expected["seqlens_k"].numpy_dtype)
        if "total_sequence_length" in expected and "total_sequence_length" not in feeds:
            feeds["total_sequence_length"] = np.array(s + past, dtype=expected["total_sequence_length"].numpy_dtype)
        if "position_ids" in expected and "position_ids" not in feeds:
            if mask is not None:
                pos = np.cumsum(mask, axis=-1) - 1
                pos = np.where(mask == 0, 1, pos)[..., -s:]
            else:
                pos = np.broadcast_to(np.arange(s), lead + (s,))
            feeds["position_ids"] = np.ascontiguousarray(pos).astype(expected["position_ids"].numpy_dtype)

    def _start(self, y, target, position, output_relevance, feeds, output, batch_axis, position_axis):
        """Start weights ``w`` (one-hot by default, in the output's own layout), the number of leading target axes,
        targets, positions, and the output's batch axis."""
        src = self.graph.source
        self._check_finite(y, feeds)
        if output_relevance is not None:
            w = _integers_or_floats(output_relevance, "output_relevance", src, floats=True).astype(self.dtype)
            b = 0 if batch_axis is None else output_layout(self.graph, output, y.shape, feeds, {}, batch_axis)[0]
            if not np.all(np.isfinite(w)):
                raise TargetError(f"{src}: output_relevance holds NaN/inf values: start weights must be finite")
            if w.shape == y.shape:
                return w, 0, None, None, b
            if w.ndim == y.ndim + 1 and w.shape[1:] == y.shape and w.shape[0] > 0:
                return w, 1, None, None, b
            raise TargetError(f"{src}: output_relevance has shape {w.shape}; expected {y.shape} or (k,) + {y.shape}")
        b, p = output_layout(self.graph, output, y.shape, feeds, self.analysis.sources, batch_axis, position_axis)
        moved = [b] + ([p] if p is not None else [])
        yc = np.moveaxis(y, moved, list(range(len(moved))))
        w, lead, tgt, pos = self._one_hot(yc, target, position, feeds)
        if moved != list(range(len(moved))):
            w = np.moveaxis(w, [lead + k for k in range(len(moved))], [lead + a for a in moved])
        return w, lead, tgt, pos, b

    def _targets_positions(self, target, position, feeds, B: int, S: int | None):
        """Targets (None or ``(B, k)`` ids, not yet checked against the classes) and positions (``(B, k)``, the
        default last token; None without a sequence axis: ``S`` None), whether k targets were asked, and k."""
        src = self.graph.source
        tgt = None if target is None else _integers_or_floats(target, "target", src)
        pos = None if position is None else _integers_or_floats(position, "position", src)
        for what, a in (("target", tgt), ("position", pos)):
            if a is None:
                continue
            if a.ndim > 2 or (a.ndim >= 1 and a.shape[0] != B):
                count = f"{a.shape[0]} {what}s for a batch of {B}" if a.ndim else ""
                raise TargetError(f"{src}: {what} has shape {a.shape} ({count}); expected an int, one per batch "
                                  f"element ({B},), or ({B}, k) for k per element")
            if a.size == 0:
                raise TargetError(f"{src}: {what} of shape {a.shape} is empty: give at least one {what} per "
                                  "batch element")
        ks = {a.shape[1] for a in (tgt, pos) if a is not None and a.ndim == 2}
        if len(ks) > 1:
            raise TargetError(f"{src}: target {tgt.shape} and position {pos.shape} give different numbers of "
                              "explanations per batch element")
        multi = bool(ks)
        k = ks.pop() if ks else 1
        if S is not None:
            if pos is None:
                pos = last_token(feeds, B, S)
            else:
                pos = np.broadcast_to(pos, (B,)) if pos.ndim == 0 else pos
                if np.any(pos >= S) or np.any(pos < -S):
                    raise TargetError(f"{src}: position {pos.tolist()} out of range for sequence length {S}")
                pos = np.where(pos < 0, pos + S, pos)
            pos = np.broadcast_to(pos.reshape(B, -1), (B, k))
        if tgt is not None:
            tgt = np.broadcast_to(tgt, (B,)) if tgt.ndim == 0 else tgt
            tgt = np.broadcast_to(tgt.reshape(B, -1), (B, k)).astype(np.int64)
        return tgt, pos, multi, k

    def _one_hot(self, y, target, position, feeds):
        """The one-hot start of a ``(batch, classes)`` or ``(batch, seq, classes)`` output ``y``."""
        src = self.graph.source
        if y.ndim not in (2, 3):
            raise TargetError(
                f"{src}: output of shape {y.shape} has no (batch, classes) or (batch, seq, classes) layout; "
                "pass output_relevance"
            )
        B, C = y.shape[0], y.shape[-1]
        has_seq = y.ndim == 3
        if position is not None and not has_seq:
            raise TargetError(f"{src}: position given, but the output {y.shape} has no sequence axis")
        tgt, pos, multi, k = self._targets_positions(target, position, feeds, B, y.shape[1] if has_seq else None)
        if tgt is None:
            rows = y[np.arange(B)[:, None], pos] if has_seq else np.broadcast_to(y[:, None, :], (B, k, C))
            tgt = rows.argmax(-1)
        elif np.any(tgt < 0) or np.any(tgt >= C):
            raise TargetError(f"{src}: target {tgt.tolist()} out of range: the output has {C} classes")
        w = np.zeros((k,) + y.shape, dtype=self.dtype)
        for j in range(k):
            if has_seq:
                w[j, np.arange(B), pos[:, j], tgt[:, j]] = 1.0
            else:
                w[j, np.arange(B), tgt[:, j]] = 1.0
        if not multi:
            return w[0], 0, tgt[:, 0], (pos[:, 0] if pos is not None else None)
        return w, 1, tgt, pos

    def _check_finite(self, y, feeds) -> None:
        """An :class:`InputError` when the explained output holds NaN/inf: there is nothing to explain."""
        if not np.isfinite(y).all():
            raise InputError(f"{self.graph.source}: the model's output {y.shape} is not finite (NaN/inf) for inputs "
                             f"{ {k: v.shape for k, v in feeds.items()} }: there is nothing to explain; check the "
                             "inputs' scale (overflow in the model?)")

    def _one_hot_rows(self, y, tgt, pos, multi: bool, k: int, feeds):
        """The one-hot start of a head computed at the explained rows only: ``y`` ``(B, k, classes)``, row ``j`` at
        position ``pos[:, j]``; target ``j`` starts at row ``j`` (:mod:`onnx_lrp._rows`)."""
        self._check_finite(y, feeds)
        B, C = y.shape[0], y.shape[-1]
        if tgt is None:
            tgt = y.argmax(-1)
        elif np.any(tgt < 0) or np.any(tgt >= C):
            raise TargetError(f"{self.graph.source}: target {tgt.tolist()} out of range: the output has {C} classes")
        w = np.zeros((k,) + y.shape, dtype=self.dtype)
        for j in range(k):
            w[j, np.arange(B), j, tgt[:, j]] = 1.0
        if not multi:
            return w[0], 0, tgt[:, 0], pos[:, 0]
        return w, 1, tgt, pos

    def _check_padding(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Refuse left-padded masks on graphs whose attention can only express right padding."""
        mask = feeds.get("attention_mask")
        if not self._right_padded or mask is None or mask.ndim != 2:
            return
        m = mask != 0
        # right padding: every row is ones then zeros, i.e. never a 1 after a 0
        bad = np.nonzero((~m[:, :-1] & m[:, 1:]).any(-1))[0]
        if bad.size:
            raise InputError(
                f"{self.graph.source}: attention_mask rows {bad.tolist()} are not right-padded (a 1 follows a 0), but "
                f"the model's attention ({', '.join(self._right_padded[:3])}) computes one sequence length per row, "
                "which expresses right padding only: onnxruntime would compute something else. Pad on the right, or "
                "export the model without the fused attention")

    def _check_conservation(self, relevance, score, lead: int, inputs, output: str, w: Callable[[], Any], y
                            ) -> None:
        """Warn once when the summed input relevance is more than 10x the explained score (the rules should
        conserve it up to biases), naming the first tensor from the output where it blew up (``w()``: the start
        weights in the full output's shape)."""
        xp = self.xp
        keep = (1,) if lead else ()
        total = sum(xp.asarray(r).sum(axis=tuple(a for a in range(r.ndim) if a not in keep)) for r in relevance.values())
        expected = xp.asarray(score).sum(axis=-1)  # score: (k, batch) or (batch,)
        # biases absorb relevance, so a score near 0 may have a larger relevance sum: the scale is the larger of
        # the score and the explained output's magnitude
        y = xp.asarray(y)  # max |y| without a temporary of the output's size (a LM's logits: T x vocab)
        scale = xp.maximum(xp.abs(expected), max(float(y.max()), -float(y.min())) if y.size else 0.0)
        ratio = float(xp.max(xp.abs(total) / (scale + 1e-12)))
        if ratio <= 10.0 or not np.isfinite(ratio):
            if np.isfinite(ratio):
                return
        self._warned = True
        where = self._first_blow_up(inputs, output, w(), float(xp.max(xp.abs(expected))))
        warnings.warn(
            f"{self.graph.source}: relevance is not conserved under composite {self.composite.name!r}: the input "
            f"relevance sums to {float(xp.max(xp.abs(total))):.3g} for an explained score of "
            f"{float(xp.max(xp.abs(expected))):.3g} ({ratio:.3g}x the output's scale){where}. Check the rules there "
            "(onnx-lrp inspect) or override them; check_conservation=False silences this.",
            RelevanceWarning, stacklevel=3)

    def _first_blow_up(self, inputs, output: str, w, score: float) -> str:
        """``; it first exceeds 10x the score at node ...`` from a diagnostic pass collecting the relevance of every
        step's output, or "" when none does."""
        plan = self._plan(output, ())
        by_name = {n.name: n for n in self.graph.nodes}
        order = [o for st in plan.steps for o in st.outputs[:1]
                 if o in self.analysis.carrying and o != output and o not in self.graph.output_names]
        res = self.explain(inputs, output=output, output_relevance=w, collect=order, check_conservation=False)
        for t in order:  # plan order: from the output towards the inputs
            if float(np.max(np.abs(res.latent[t].sum(axis=tuple(range(2, res.latent[t].ndim)) if w.ndim > len(
                    res.outputs[output].shape) else None)))) > 10 * score:
                n = self.graph.producer[t]
                return (f"; it first exceeds 10x the score at tensor {t!r} (output of {self._describe(n)}), reached "
                        f"from {' <- '.join(self._describe(c) for c in self._downstream(t))}")
        return ""

    def _describe(self, n) -> str:
        d = self.analysis.decisions.get(n.name)
        return f"{n.name!r} ({n.op_type}, kind {d.kind}, rule {d.rule.name})" if d is not None else repr(n.name)

    def _downstream(self, t: str, depth: int = 3) -> list:
        """The carrying consumers of ``t`` its relevance comes back from, following single consumers."""
        out = []
        for _ in range(depth):
            cons = [c for c in self.graph.consumers.get(t, []) if c.name in self.analysis.decisions]
            if not cons:
                break
            out.append(cons[0])
            if len(cons) > 1 or not cons[0].outputs:
                break
            t = cons[0].outputs[0]
        return out

    def _source_relevance(self, grads, env: Env, feeds, lead: int):
        xp = self.xp
        plain_gradient = self.composite.reading == "gradient"
        relevance: dict[str, Any] = {}
        emb: dict[str, Any] = {}
        for tensor, inp in self.analysis.sources.items():
            x = env[tensor]
            g = grads.get(tensor)
            if g is None:
                g = xp.zeros(x.shape if not lead else (1,) + x.shape, dtype=self.dtype)
            r = g if plain_gradient else x * g
            if tensor in self.analysis.token_axis:  # derived from integer ids: one relevance per token
                ids_shape = tuple(feeds[inp].shape)
                axis = _token_axis(r.shape[lead:], ids_shape, self.analysis.token_axis[tensor])
                if axis is None:
                    tok = r
                else:
                    emb[inp] = emb.get(inp, 0) + r
                    tok = xp.sqrt((g * g).sum(axis - len(x.shape))) if plain_gradient else r.sum(axis - len(x.shape))
                if tok.size == int(np.prod(tok.shape[:lead])) * int(np.prod(ids_shape)):
                    tok = tok.reshape(tok.shape[:lead] + ids_shape)
                relevance[inp] = relevance.get(inp, 0) + tok
            else:
                relevance[inp] = relevance.get(inp, 0) + r
        for inp in self.analysis.token_inputs:  # token relevance routed back from moved ids (already relevance)
            g = grads.get(inp)
            if g is None:  # no relevance reached the moved ids
                g = xp.zeros(next(iter(relevance.values())).shape[:lead] + feeds[inp].shape, dtype=self.dtype)
            relevance[inp] = relevance.get(inp, 0) + g
        rel = {k: _batch_first(v, lead) for k, v in relevance.items()}
        emb = {k: _batch_first(v, lead) for k, v in emb.items()}
        return rel, emb


def load_graph(model: str | os.PathLike | onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> Graph:
    """The :class:`~onnx_lrp._graph.Graph` onnx-lrp explains: from a file each weight held once, as an array
    (:func:`~onnx_lrp._graph.load_split`; a ``ModelProto``'s external data read from ``base_dir``); rewritten by the
    canonizers it needs (:mod:`onnx_lrp._canonize`: fused ops that hide a relevance source expanded next to
    themselves, duplicated ``DequantizeLinear`` merged). A ``ModelProto`` is never changed (copied when it must be)."""
    proto, weights, desc = load_split(model, base_dir)
    if needs_canonizing(proto):
        if proto is model:  # never change the user's ModelProto
            proto = onnx.ModelProto()
            proto.CopyFrom(model)
        canonize(proto)
    return Graph(proto, desc, weights)


def _packing_fits(weights: Any) -> bool:
    """Whether automatic pre-packing pays: the weights take at least :data:`PREPACK_MIN_BYTES` (below, packing
    at every product costs less than building the packed sessions) and two more copies of them (the packed ones
    of the forward and of the relevance pass) at most an eighth of the memory available (unknown: no)."""
    avail = available_bytes()
    total = sum(int(w.nbytes) for w in weights)
    return avail is not None and PREPACK_MIN_BYTES <= total and 2 * total <= avail // 8


def _threads_like(opts: Any, like: Any) -> Any:
    """``opts`` with the intra-op thread count of the session options ``like``."""
    opts.intra_op_num_threads = like.intra_op_num_threads
    return opts


def last_token(feeds: Mapping[str, np.ndarray], batch: int, seq: int) -> np.ndarray:
    """The default explained position per batch element: the last non-padding token of ``attention_mask``
    (its last ``seq`` columns), or ``seq - 1`` without a mask."""
    mask = feeds.get("attention_mask")
    if mask is None or mask.shape[-1] < seq:
        return np.full((batch,), seq - 1)
    m = mask[:, -seq:]
    idx = np.arange(seq)[None, :]
    last = np.where(m > 0, idx, -1).max(-1)
    return np.where(last < 0, seq - 1, last)


def _as_condition(xp: Any, dtype: Any, mask: Any) -> Callable[[Any], Any]:
    if callable(mask):
        return mask
    m = xp.asarray(mask, dtype=dtype)
    return lambda g: g * m


def _integers_or_floats(value: Any, what: str, src: str, floats: bool = False) -> np.ndarray:
    """``value`` as an array of integers (ids, positions) or, with ``floats``, of numbers; else a TargetError."""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise TargetError(f"{src}: {what} is not a rectangular array: {exc}") from None
    kinds = "iuf" if floats else "iu"
    if a.dtype.kind not in kinds:
        raise TargetError(f"{src}: {what} must hold {'numbers' if floats else 'integer ids/indices'}, got "
                          f"{a.dtype} {a.shape}" + (" (round or cast them yourself)" if a.dtype.kind == "f" else ""))
    return a


def _token_axis(shape: tuple[int, ...], ids_shape: tuple[int, ...], axis: int | None) -> int | None:
    """The axis (non-negative, of a source of ``shape``) that a token's relevance is summed over: the embedding or
    one-hot axis ``axis`` when given, else the one axis whose removal leaves the ids' shape (None: none)."""
    if axis is not None:
        return axis % len(shape)
    if tuple(shape) == tuple(ids_shape):
        return None
    for k in range(len(shape)):
        if tuple(shape[:k] + shape[k + 1:]) == tuple(ids_shape):
            return k
    return len(shape) - 1


def _batch_first(a: Any, lead: int) -> Any:
    return a.swapaxes(0, 1) if lead and a.ndim >= 2 else a
