"""The reverse interpreter: a plan compiled once per explained output, run once per explanation.

A plan is the list of backward steps (node or unary region) on the paths from the relevance sources to the
explained output, in reverse topological order, with the tensors they need from the forward pass. Running it
propagates the modified gradient ``G`` (``R_t = t * G_t``) from the output back to the sources; a tensor read
by several nodes accumulates the sum of what each sends back.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ._analysis import Analysis
from ._graph import Graph
from ._patterns import epsilon_site
from ._recompute import Program, RecomputeCache, find_program
from ._inputs import is_allocation_failure
from .errors import OnnxLrpError, ResourceError
from .ops import OpContext, region_backward, spec_of
from .ops._base import scaled_matmul
from .ops.attention_blocks import Block, ChainUnit, block_backward, find_blocks
from .ops.linear import product_weights
from .rules import Epsilon, Rule


@dataclass
class Step:
    name: str
    op_type: str
    rule: Rule
    inputs: list[str | None]  # carrying inputs, aligned with what ``backward`` returns
    outputs: list[str]
    backward: Callable
    stabilise: bool = False  # eps-LRP on the output gradient: G_z * z / stab(z) (needs the output value)
    eps_bias: Any = None  # bias added to the output for eps-LRP's z (a linear map's bias in the next node)


@dataclass
class Plan:
    output: str
    steps: list[Step]
    values: set[str] = field(default_factory=set)  # tensors read at run time
    shapes: set[str] = field(default_factory=set)  # tensors whose shape is read at run time
    keep: set[str] = field(default_factory=set)  # gradients kept (sources, collected tensors)
    release: list[tuple[str, ...]] = field(default_factory=list)  # per step: values read for the last time
    recompute: dict[str, Program] = field(default_factory=dict)  # values recomputed instead of captured
    reads: list[set[str]] = field(default_factory=list)  # per step: the values it reads


class Env:
    """What a backward step reads: forward tensors (run-time and static) and shapes."""

    def __init__(self, xp: Any, dtype: Any, lead: int, values: dict, shapes: dict, static: dict,
                 recomputed: RecomputeCache | None = None, matmul: Callable | None = None):
        self.xp, self.dtype, self.lead = xp, dtype, lead
        self._values, self._shapes, self._static = values, shapes, static
        self._recomputed = recomputed
        self._memo: dict[str, Any] = {}
        self.matmul = matmul or scaled_matmul  # alpha * (a @ b) (onnx_lrp._kernels.Gemm on the CPU)

    def __getitem__(self, name: str):
        v = self._values.get(name)
        if v is None:
            v = self._static.get(name)
            if v is None:
                if self._recomputed is not None and name in self._recomputed:
                    return self._recomputed.get(name)
                raise OnnxLrpError(f"tensor {name!r} is not available to the rules (not declared with ctx.value)")
        return v

    def end_step(self, release: tuple[str, ...]) -> None:
        """Drop the tensors no later step reads, and the step's memoised intermediates."""
        for name in release:
            v = self._values.pop(name, None)
            if v is not None and name not in self._shapes:
                self._shapes[name] = tuple(v.shape)  # a later step may still read its shape
            if self._recomputed is not None:
                self._recomputed.release(name)
        self._memo.clear()

    def shape(self, name: str) -> tuple[int, ...]:
        s = self._shapes.get(name)
        return tuple(self[name].shape) if s is None else s

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


def relevant_nodes(graph: Graph, analysis: Analysis, output: str) -> list[str]:
    """Names of nodes/regions on carrying paths from the sources to ``output``, in topological order."""
    seen: set[str] = set()
    found: dict[str, int] = {}
    stack = [output]
    while stack:
        t = stack.pop()
        if t in seen or t in analysis.sources:
            continue
        seen.add(t)
        p = graph.producer.get(t)
        if p is None or t not in analysis.carrying:
            continue
        region = analysis.regions.get(analysis.region_of.get(p.name, ""))
        if region is not None:
            found[region.name] = max(n.index for n in region.nodes)
            stack.append(region.x)
            continue
        if p.name not in analysis.decisions:
            continue
        found[p.name] = p.index
        stack.extend(i for i in p.inputs if i and i in analysis.carrying)
    return sorted(found, key=found.get)


def compile_plan(
    graph: Graph, analysis: Analysis, output: str, xp: Any, dtype: Any, collect: tuple[str, ...] = (),
    blocks: bool = True, lean: bool = False,
) -> Plan:
    """The plan explaining ``output``, one step per node (or unary region). ``blocks``: attention blocks
    (:mod:`onnx_lrp.ops.attention_blocks`) become one step each that recomputes their probabilities; their masks
    are recomputed too where their inputs allow (:mod:`onnx_lrp._recompute`), so no tensor of the size ``T x T``
    is captured (without: each node's rule reads the captured probabilities, faster on short inputs). ``lean``:
    also recompute what is cheap to recompute from other captured tensors (:func:`_lean`)."""
    plan = Plan(output, [])
    by_name = {n.name: n for n in graph.nodes}
    kinds = analysis.kinds

    def context(name: str, values: set[str], shapes: set[str] | None = None) -> OpContext:
        decision = analysis.decisions[name]
        rule = analysis.region_rules[name] if name in analysis.regions else decision.rule
        return OpContext(graph, by_name[name], rule, decision.kind, analysis.carrying, xp, dtype, values,
                         plan.shapes if shapes is None else shapes, decision.gates, analysis.composite)

    found = _blocks(graph, analysis, set(collect), kinds) if blocks else {}
    inside = {u for b in found.values() for u in b.units}
    reads: list[set[str]] = []  # values each step reads
    for name in reversed(relevant_nodes(graph, analysis, output)):
        if name in inside:
            continue
        step_values: set[str] = set()
        ctx = context(name, step_values)
        if name in found:
            step = _block_step(graph, analysis, found[name], ctx, context, step_values, plan.recompute, kinds)
        else:
            step = _unit_step(graph, analysis, name, ctx, kinds)
        if step is None:
            continue
        plan.steps.append(step)
        reads.append(step_values)
    plan.keep = set(analysis.sources) | set(collect) | analysis.token_inputs
    if lean:
        _lean(graph, analysis, plan, reads)
    for r in reads:
        plan.values |= r
    plan.values -= set(plan.recompute)
    plan.values.update(analysis.sources)
    plan.values.update(collect)
    plan.release = _last_reads(reads, plan.keep | set(graph.output_names))
    plan.reads = reads
    return plan


def _is_region_step(analysis: Analysis, name: str) -> bool:
    """A region of several nodes, or of one node that reads x more than once (``x * x``): the region's rule."""
    region = analysis.regions.get(name)
    return region is not None and (len(region.nodes) > 1 or [
        i for i in region.nodes[0].inputs if i in analysis.carrying] != [region.x])


def _unit_step(graph: Graph, analysis: Analysis, name: str, ctx: OpContext, kinds: dict[str, str]) -> Step | None:
    """The step of one node, or of a unary region (by the name of its last node)."""
    node, rule = ctx.node, ctx.rule
    if _is_region_step(analysis, name):
        region = analysis.regions[name]
        back = region_backward(ctx, region.x, region.y)
        ctx.value(region.x), ctx.value(region.y)
        return Step(name, "region", rule, [region.x], [region.y], back)
    spec = spec_of(node)
    if spec is None or spec.builder is None:
        raise OnnxLrpError(f"node {name!r}: no rule for op type {node.op_type} (domain {node.domain or 'ai.onnx'})")
    back = spec.builder(ctx)
    if back is None:
        return None
    site, eps_bias = _stabilised(graph, analysis, node, rule, ctx.kind, kinds)
    if site:
        ctx.value(node.outputs[0])
    inputs = [i if (i and i in analysis.carrying) else None for i in node.inputs]
    return Step(name, node.op_type, rule, inputs, list(node.outputs), back, site,
                ctx.array(eps_bias) if eps_bias is not None else None)


def _stabilised(graph: Graph, analysis: Analysis, node: Any, rule: Rule, kind: str, kinds: dict[str, str]
                ) -> tuple[bool, Any]:
    """Whether eps-LRP stabilises the node's output (:func:`onnx_lrp._patterns.epsilon_site`), and the bias."""
    spec = spec_of(node)
    if not (isinstance(rule, Epsilon) and rule.epsilon) or spec is None:
        return False, None
    return epsilon_site(graph, node, spec.layer, kind, kinds, analysis.carrying)


# data movement (and scaling by a constant) that a recomputed head expansion may pass through
_EXPANSION_PATH = {"Reshape", "Expand", "Tile", "Unsqueeze", "Squeeze", "Transpose", "Identity", "Mul", "Div"}


def _lean(graph: Graph, analysis: Analysis, plan: Plan, reads: list[set[str]]) -> None:
    """Recompute instead of capture (memory is short): the output ``y`` of a unary region from its input ``x``
    (``x sigmoid(x)``: ``y`` is read by the region's rule and the product after it, ``x`` is captured anyway),
    and a head expansion (GQA's ``Expand``/``Tile`` of keys and values, maybe transposed and scaled) from the
    tensor before it, a fraction of its size. The leaves stay captured until the recomputed value's last read."""
    values = set().union(*reads) - plan.keep - set(graph.output_names)
    carrying = analysis.carrying
    found = {}
    for r in analysis.regions.values():
        if r.y in values and r.x in values:
            found[r.y] = find_program(graph, carrying, r.y, frozenset({r.x}))
    for v in sorted(values & carrying):
        u, grows = v, False
        while True:
            p = graph.producer.get(u)
            ins = [i for i in (p.inputs if p is not None else []) if i in carrying]
            if p is None or p.op_type not in _EXPANSION_PATH or len(ins) != 1 or u in plan.keep:
                break
            grows = grows or p.op_type in ("Expand", "Tile")
            u = ins[0]
        if grows and v not in found:
            found[v] = find_program(graph, carrying, v, frozenset({u}))
    progs = {v: p for v, p in found.items() if p is not None}
    for r in reads:
        for v in r & set(progs):
            r |= progs[v].captured | progs[v].cuts
    plan.recompute.update(progs)


def _blocks(graph: Graph, analysis: Analysis, collect: set[str], kinds: dict[str, str]) -> dict[str, Block]:
    """The attention blocks whose inner nodes take no eps-LRP stabiliser (it would need their ``T x T`` output)."""
    found = find_blocks(graph, analysis.carrying, analysis.region_of, analysis.regions,
                        collect | set(graph.output_names))
    out = {}
    for name, b in found.items():
        inner = [n for n in b.nodes if n is not b.pv and n.name in analysis.decisions]
        if not any(_stabilised(graph, analysis, n, analysis.decisions[n.name].rule, kinds[n.name], kinds)[0]
                   for n in inner):
            out[name] = b
    return out


def _block_step(graph: Graph, analysis: Analysis, block: Block, ctx: OpContext, context: Callable,
                values: set[str], recompute: dict[str, Program], kinds: dict[str, str]) -> Step:
    """One step for an attention block (by its ``P V`` MatMul): rules of ``A Bt``, the score chain and ``P V``."""
    carrying = analysis.carrying
    ca, cb, cp, cv = (t in carrying for t in (block.a, block.bt, block.pv.inputs[0], block.v))
    wa, wb = (product_weights(context(block.qk.name, set(), set()), [0, 1]) if (ca and cb)
              else (float(ca), float(cb)))
    wp, wv = product_weights(ctx, [0, 1]) if (cp and cv) else (float(cp), float(cv))
    units = []
    for name in dict.fromkeys(analysis.region_of.get(n.name, n.name) for n in block.chain):
        uctx = context(name, set(), set())  # they read the block's own values and shapes (_BlockEnv)
        if _is_region_step(analysis, name):
            region = analysis.regions[name]
            units.append(ChainUnit(region_backward(uctx, region.x, region.y)))
        else:
            chain_in = next(k for k, i in enumerate(uctx.node.inputs) if i in carrying)
            units.append(ChainUnit(spec_of(uctx.node).builder(uctx), chain_in))
    values.update((block.a, block.bt, block.v))
    chain_out = {n.outputs[0] for n in block.chain} | {block.qk.outputs[0]}
    for n in block.chain:
        values.update(i for i in n.inputs if i and i not in chain_out)
    values.update(n.inputs[1] for n in block.after if n.op_type == "Reshape")
    for side in block.sides:
        if side in graph.input_names:
            continue
        prog = recompute.get(side) or find_program(graph, carrying, side)
        if prog is not None:
            recompute[side] = prog
            values.update(prog.cuts)
    site, eps_bias = _stabilised(graph, analysis, block.pv, ctx.rule, ctx.kind, kinds)
    if site:
        values.add(block.pv.outputs[0])
    back = block_backward(block, units, (wa, wb, wp, wv), (ca, cb, cv), ctx.xp)
    inputs = [block.a if ca else None, block.bt if cb else None, block.v if cv else None]
    return Step(block.pv.name, "attention", ctx.rule, inputs, list(block.pv.outputs), back, site,
                ctx.array(eps_bias) if eps_bias is not None else None)


def _last_reads(reads: list[set[str]], keep: set[str]) -> list[tuple[str, ...]]:
    """Per step, the values it is the last step to read (never those in ``keep``)."""
    last: dict[str, int] = {}
    for k, r in enumerate(reads):
        for name in r:
            last[name] = k
    out: list[list[str]] = [[] for _ in reads]
    for name, k in last.items():
        if name not in keep:
            out[k].append(name)
    return [tuple(sorted(x)) for x in out]


def conditionable(plan: Plan) -> set[str]:
    """Tensors whose gradient :func:`run_plan` can condition: outputs of the plan's steps, and its sources."""
    return {o for s in plan.steps for o in s.outputs} | plan.keep


def run_plan(plan: Plan, env: Env, start: dict[str, Any],
             conditions: dict[str, Callable[[Any], Any]] | None = None,
             expand: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """Propagate the start gradients through the plan; returns the gradients at ``plan.keep``.

    ``conditions``: tensor -> function of its gradient (a mask keeping some neurons). When the gradient of a
    conditioned tensor is complete (the step producing it runs, or at the end for a source), the function is
    applied and the gradients that reached tensors not processed yet by paths around it are dropped: only the
    relevance flowing through the conditioned tensors reaches the inputs (conditional relevance, "relevance through
    a concept": CRP, Achtibat et al. 2023). Gradients have the leading target axes (``env.lead``).

    ``expand``: tensor -> function applied to its complete gradient before the step producing the tensor reads it
    (the gradient of a head computed at a few rows, scattered into the tensor's full shape: :mod:`onnx_lrp._rows`).
    """
    xp = env.xp
    grads: dict[str, Any] = dict(start)
    owned: set[str] = set()
    keep = plan.keep
    conditions = conditions or {}
    done: set[str] = set()  # outputs of the steps run so far (their gradients are complete)

    def only_through(names: set[str]) -> None:
        for other in [n for n in grads if n not in done and n not in names]:
            del grads[other]
            owned.discard(other)

    expand = dict(expand or {})  # each applied once
    for step, release in zip(plan.steps, plan.release):
        for o in expand.keys() & step.outputs & grads.keys():
            grads[o] = expand.pop(o)(grads[o])
            owned.discard(o)
        gy = [(grads.get(o) if o in keep else grads.pop(o, None)) for o in step.outputs]
        if conditions and any(o in conditions for o in step.outputs):
            only_through(set(step.outputs))
            gy = [(conditions[o](g) if g is not None else None) if o in conditions else None
                  for o, g in zip(step.outputs, gy)]
            for o, g in zip(step.outputs, gy):
                if o in keep:
                    grads[o] = g
        done.update(step.outputs)
        if all(g is None for g in gy):
            env.end_step(release)
            continue
        if step.stabilise:
            z = env[step.outputs[0]]
            if step.eps_bias is not None:
                z = z + step.eps_bias
            gy[0] = gy[0] * step.rule.output_scale(z)
        try:
            gx = step.backward(env, gy)
        except OnnxLrpError:
            raise
        except Exception as exc:
            where = f"node {step.name!r} ({step.op_type}, rule {step.rule.name})"
            if is_allocation_failure(exc):
                raise ResourceError(f"the relevance pass ran out of memory at {where}: {type(exc).__name__}: "
                                    f"{exc}; explain fewer tokens, a smaller batch or fewer targets at once") from exc
            raise OnnxLrpError(f"{where}: {type(exc).__name__}: {exc}") from exc
        del gy
        env.end_step(release)
        for name, g in zip(step.inputs, gx):
            if name is None or g is None:
                continue
            prev = grads.get(name)
            if prev is None:
                grads[name] = g
            elif name in owned:
                prev += g
            else:
                grads[name] = prev + g
                owned.add(name)
    for k in expand.keys() & grads.keys():  # sources: no step produces them
        grads[k] = expand.pop(k)(grads[k])
    at_end = conditions.keys() - done  # conditioned sources: no step produces them, their gradient is complete now
    if at_end:
        only_through(at_end)
        for k in at_end & grads.keys():
            grads[k] = conditions[k](grads[k])
    return {k: grads[k] for k in keep if k in grads}


_BLAS = None


def blas_threads(xp: Any, n: int | None) -> Any:
    """A context limiting numpy's BLAS to ``n`` threads during the relevance pass (via threadpoolctl when
    installed; else a no-op): the products with the weights run on onnxruntime's kernels
    (:mod:`onnx_lrp._kernels`) with the Explainer's threads, float32 attention products too; numpy's BLAS takes
    the small and float64 products, fastest on one thread (OpenBLAS's threads wait on each other on a loaded machine)."""
    global _BLAS
    if n is None or xp is not np:
        return contextlib.nullcontext()
    if _BLAS is None:
        try:
            import threadpoolctl

            _BLAS = threadpoolctl.ThreadpoolController()
        except ImportError:
            _BLAS = False
    return _BLAS.limit(limits=n, user_api="blas") if _BLAS else contextlib.nullcontext()


def to_compute(xp: Any, dtype: Any, arr: Any) -> Any:
    """Float arrays in the compute dtype on the engine's device; other arrays unchanged in type."""
    a = xp.asarray(arr)
    if a.dtype.kind == "f" and a.dtype != dtype:
        a = a.astype(dtype)
    return a


def as_numpy(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
