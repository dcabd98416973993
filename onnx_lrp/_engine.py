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
from .errors import OnnxLrpError
from .ops import OpContext, region_backward, spec_of
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


class Env:
    """What a backward step reads: forward tensors (run-time and static) and shapes."""

    def __init__(self, xp: Any, dtype: Any, lead: int, values: dict, shapes: dict, static: dict):
        self.xp, self.dtype, self.lead = xp, dtype, lead
        self._values, self._shapes, self._static = values, shapes, static
        self._memo: dict[str, Any] = {}

    def __getitem__(self, name: str):
        v = self._values.get(name)
        if v is None:
            v = self._static.get(name)
            if v is None:
                raise OnnxLrpError(f"tensor {name!r} is not available to the rules (not declared with ctx.value)")
        return v

    def end_step(self, release: tuple[str, ...]) -> None:
        """Drop the tensors no later step reads, and the step's memoised intermediates."""
        for name in release:
            v = self._values.pop(name, None)
            if v is not None and name not in self._shapes:
                self._shapes[name] = tuple(v.shape)  # a later step may still read its shape
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
    graph: Graph, analysis: Analysis, output: str, xp: Any, dtype: Any, collect: tuple[str, ...] = ()
) -> Plan:
    plan = Plan(output, [])
    by_name = {n.name: n for n in graph.nodes}
    kinds = analysis.kinds
    reads: list[set[str]] = []  # values each step reads
    for name in reversed(relevant_nodes(graph, analysis, output)):
        region = analysis.regions.get(name)
        node = by_name[name]
        decision = analysis.decisions[name]
        rule = analysis.region_rules[name] if region is not None else decision.rule
        step_values: set[str] = set()
        ctx = OpContext(graph, node, rule, decision.kind, analysis.carrying, xp, dtype, step_values, plan.shapes,
                        decision.gates, analysis.composite)
        spec = spec_of(node)
        # a region of several nodes, or of one node that reads x more than once (x * x)
        if region is not None and (len(region.nodes) > 1 or [i for i in node.inputs if i in analysis.carrying]
                                   != [region.x]):
            back = region_backward(ctx, region.x, region.y)
            step_values.update((region.x, region.y))
            plan.steps.append(Step(name, "region", rule, [region.x], [region.y], back))
            reads.append(step_values)
            continue
        if spec is None or spec.builder is None:
            raise OnnxLrpError(f"node {name!r}: no rule for op type {node.op_type} (domain {node.domain or 'ai.onnx'})")
        back = spec.builder(ctx)
        if back is None:
            continue
        site, eps_bias = (epsilon_site(graph, node, spec.layer, decision.kind, kinds, analysis.carrying)
                          if isinstance(rule, Epsilon) and rule.epsilon else (False, None))
        if site:
            step_values.add(node.outputs[0])
        inputs = [i if (i and i in analysis.carrying) else None for i in node.inputs]
        plan.steps.append(Step(name, node.op_type, rule, inputs, list(node.outputs), back, site,
                               ctx.array(eps_bias) if eps_bias is not None else None))
        reads.append(step_values)
    plan.keep = set(analysis.sources) | set(collect) | analysis.token_inputs
    for r in reads:
        plan.values |= r
    plan.values.update(analysis.sources)
    plan.values.update(collect)
    plan.release = _last_reads(reads, plan.keep | set(graph.output_names))
    return plan


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
             conditions: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """Propagate the start gradients through the plan; returns the gradients at ``plan.keep``.

    ``conditions``: tensor -> function of its gradient (a mask keeping some neurons). When the gradient of a
    conditioned tensor is complete (the step producing it runs, or at the end for a source), the function is
    applied and the gradients that reached tensors not processed yet by paths around it are dropped: only the
    relevance flowing through the conditioned tensors reaches the inputs (conditional relevance, "relevance through
    a concept": CRP, Achtibat et al. 2023). Gradients have the leading target axes (``env.lead``).
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

    for step, release in zip(plan.steps, plan.release):
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
            raise OnnxLrpError(f"node {step.name!r} ({step.op_type}, rule {step.rule.name}): {type(exc).__name__}: {exc}") from exc
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
    at_end = conditions.keys() - done  # conditioned sources: no step produces them, their gradient is complete now
    if at_end:
        only_through(at_end)
        for k in at_end & grads.keys():
            grads[k] = conditions[k](grads[k])
    return {k: grads[k] for k in keep if k in grads}


_BLAS = None


def blas_threads(xp: Any, n: int | None) -> Any:
    """A context limiting numpy's BLAS to ``n`` threads (via threadpoolctl when installed; else a no-op).

    The relevance pass is a chain of mid-sized GEMMs; on few cores OpenBLAS threading costs more than it
    gains (measured 6x slower on 2 shared cores), and onnxruntime has its own thread pool for the forward.
    """
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
