"""Recurrent ops: ONNX ``LSTM``, ``GRU``, ``RNN`` and com.microsoft ``DynamicQuantizeLSTM``, unrolled in time.

The backward recomputes the forward from the captured input and initial states (``X (T, B, I)``,
``Y (T, D, B, H)``, states ``(D, B, H)``) and propagates ``G`` back through the steps. Each part
of a step takes the rule the composite gives the unfused op it stands for (:meth:`OpContext.rule_of`):

- *linear maps* ``a = X W^T + H_prev R^T + Wb + Rb`` (the pre-activation of every gate; GRU's reset product
  inside its candidate): the linear rule of a ``MatMul``. ``Epsilon(eps)`` scales ``G_a`` by ``a / stab(a)``
  (AttnLRP Eq. 4: the biases absorb their share; ``eps = 0`` is the plain gradient). Gamma is refused.
- *gated products* ``f * C_prev``, ``i * g``, ``o * tanh(C)`` (LSTM), ``z * H_prev``, ``(1 - z) * h``,
  ``r * H_prev`` (GRU): the rule of kind ``gate`` (a product whose factor is a sigmoid), the node's own rule
  (LSTM and GRU are declared of kind ``gate``: ``overrides={"op:LSTM": Uniform()}`` changes it). ``ConstantGate`` (AttnLRP,
  CP-LRP) holds the gate constant and the signal takes all the relevance (Arras et al. 2017, "Explaining recurrent
  neural network predictions in sentiment analysis": a gate is a weight, not a source); ``Uniform`` gives each
  factor half; ``Gradient`` the full gradient to both. The gate's own ``sigmoid`` takes the rule of kind
  ``nonlinear`` (its derivative; ``Constant`` stops it).
- *squashing* ``tanh`` (LSTM's candidate ``g`` and ``tanh(C)``, GRU's candidate, RNN's activation): the unary rule
  of a ``Tanh`` (RNN, declared of kind ``unary``: its own rule). ``Identity``: ``G_a = G_y * tanh(a) / stab(a)``
  (AttnLRP Eq. 9); ``Gradient``: ``1 - tanh(a)^2``.

With every part ``Gradient`` (Gradient x Input) the result is the exact VJP of the op. Supported: directions
forward / reverse / bidirectional; ``sequence_lens`` (a step past a sequence's length leaves its state unchanged and
its ``Y`` zero, so ``Y_h``/``Y_c`` are the state after its last step); ``initial_h``/``initial_c`` (relevance
reaches them when they carry it); LSTM peepholes ``P`` and ``input_forget``; ``clip`` (derivative 1 inside the
bounds); GRU's ``linear_before_reset``; relevance arriving at any of the outputs. Refused with a clear error:
non-default activations, ``layout=1`` (onnxruntime refuses it too), weights that carry relevance or are not
constant, the gamma rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..rules import Constant, ConstantGate, Epsilon, Gradient, Identity, Uniform
from ._base import MS, OpContext, register

_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}


@dataclass(frozen=True)
class _Rules:
    """The rule of each part of a step: eps-LRP of the linear maps (None: the plain gradient), the shares of a gated product's signal and gate
    (the gate's share goes on through the sigmoid's derivative), and the identity rule for tanh (None: its
    derivative)."""

    epsilon: Epsilon | None
    signal: float
    gate: float
    identity: Identity | None

    def linear(self, xp, ga, a):
        """eps-LRP at a pre-activation ``a``: ``G_a * a / stab(a)``."""
        return ga * self.epsilon.output_scale(a) if self.epsilon is not None else ga

    def squash(self, g, a, y, dclip):
        """``G_a`` of ``y = tanh(clip(a))``: identity rule ``G_y y / stab(a)``, or the derivative."""
        if self.identity is not None:
            return g * self.identity.ratio(a, y)
        d = 1 - y * y
        return g * d if dclip is None else g * d * dclip


def _rules(ctx: OpContext) -> _Rules:
    lin = ctx.rule_of("linear", "MatMul")
    if not isinstance(lin, (Epsilon, Gradient)):
        raise ctx.fail(f"rule {lin.name} for the linear maps inside a recurrent op is not supported "
                       "(Epsilon or Gradient)")
    # the node's own rule is that of its kind: the gated products' (LSTM, GRU: kind gate) or tanh's (RNN: unary)
    gate = ctx.rule if ctx.kind == "gate" else ctx.rule_of("gate", "Mul")
    if isinstance(gate, ConstantGate):
        signal, through_gate = 1.0, 0.0
    elif isinstance(gate, Uniform):
        signal = through_gate = gate.share(2)
    elif isinstance(gate, Gradient):
        signal = through_gate = 1.0
    else:
        raise ctx.fail(f"rule {gate.name} for the gated products inside a recurrent op is not supported "
                       "(ConstantGate, Uniform or Gradient)")
    sigmoid = ctx.rule_of("nonlinear", "Sigmoid")
    if isinstance(sigmoid, Constant):
        through_gate = 0.0
    elif not isinstance(sigmoid, Gradient):
        raise ctx.fail(f"rule {sigmoid.name} for the gates' sigmoid inside a recurrent op is not supported "
                       "(Gradient or Constant)")
    act = ctx.rule if ctx.kind == "unary" else ctx.rule_of("unary", "Tanh")
    if not isinstance(act, (Identity, Gradient)):
        raise ctx.fail(f"rule {act.name} for tanh inside a recurrent op is not supported (Identity or Gradient)")
    return _Rules(lin if isinstance(lin, Epsilon) and lin.epsilon else None, signal, through_gate,
                  act if isinstance(act, Identity) else None)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class _Param:
    """A weight input: a compile-time constant (or an array derived from one), or a tensor computed from constants
    in the graph, read at run time."""

    def __init__(self, ctx: OpContext, k: int, what: str, array: np.ndarray | None = None):
        self.name = ctx.input(k)
        self.fixed = None
        if self.name is None:
            return
        if ctx.carrying(k):
            raise ctx.fail(f"input {k} ({what}, {self.name!r}) carries relevance; only X and the initial states may")
        value = array if array is not None else ctx.const(k)
        if value is not None:
            self.fixed = ctx.array(value)
        elif self.name in ctx.graph.static:
            ctx.value(self.name)
        else:
            raise ctx.fail(f"input {k} ({what}, {self.name!r}) must be a constant")

    def __call__(self, env):
        if self.name is None:
            return None
        return self.fixed if self.fixed is not None else env[self.name]


def _sigmoid(xp, a):
    return 1.0 / (1.0 + xp.exp(-a))


def _clip(xp, a, clip):
    """(clip(a), d clip(a) / da) or (a, None) without a clip."""
    if clip is None:
        return a, None
    return xp.clip(a, -clip, clip), (xp.abs(a) <= clip).astype(a.dtype)


def _dsigmoid(s, dclip):
    d = s * (1 - s)
    return d if dclip is None else d * dclip


# ---------------------------------------------------------------------------------------------- cells
class _LSTMCell:
    """``i, o, f = sigmoid(a_i + P_i C_prev, a_o + P_o C, a_f + P_f C_prev)``, ``g = tanh(a_c)``,
    ``C = f C_prev + i g`` (``f = 1 - i`` with input_forget), ``H = o tanh(C)``; ``a = x W^T + H_prev R^T + b``."""

    states = 2

    def __init__(self, xp, W, R, B, P, H, clip, input_forget, rules: _Rules):
        self.xp, self.W, self.R, self.H, self.clip, self.coupled, self.rules = xp, W, R, H, clip, input_forget, rules
        self.x_bias = B[: 4 * H] + B[4 * H:] if B is not None else 0
        self.P = (P[:H], P[H:2 * H], P[2 * H:]) if P is not None else None

    def step(self, xw, state):
        xp, H, clip = self.xp, self.H, self.clip
        h, c = state
        a = xw + h @ self.R.T
        ai, ao, af, ag = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        if self.P is not None:
            ai, af = ai + self.P[0] * c, af + self.P[2] * c
        ci, di = _clip(xp, ai, clip)
        i = _sigmoid(xp, ci)
        cf, df = _clip(xp, af, clip)
        f = 1 - i if self.coupled else _sigmoid(xp, cf)
        cg, dg = _clip(xp, ag, clip)
        g = xp.tanh(cg)
        c_new = f * c + i * g
        if self.P is not None:
            ao = ao + self.P[1] * c_new
        co, do = _clip(xp, ao, clip)
        o = _sigmoid(xp, co)
        tc = xp.tanh(c_new)
        cache = dict(a=(ai, ao, af, ag), d=(di, do, df, dg), i=i, f=f, o=o, g=g, c_prev=c, c=c_new, tc=tc)
        return (o * tc, c_new), cache

    def back(self, s, grads):
        xp, rules = self.xp, self.rules
        gh, gc = grads
        ai, ao, af, ag = s["a"]
        di, do, df, dg = s["d"]
        i, f, o, g = s["i"], s["f"], s["o"], s["g"]
        ws, wg = rules.signal, rules.gate
        gc = gc + rules.squash(gh * o * ws, s["c"], s["tc"], None)  # the signal tanh(C) of o * tanh(C)
        zero = xp.zeros_like(gc)
        ga_i = ga_o = ga_f = zero
        # each gate's pre-activation (peepholes included) is one linear map: eps-LRP at it, before its terms
        if wg:
            ga_o = rules.linear(xp, gh * s["tc"] * _dsigmoid(o, do) * wg, ao)
            if self.P is not None:  # o's peephole reads the new cell
                gc = gc + ga_o * self.P[1]
        ga_g = rules.linear(xp, rules.squash(gc * i * ws, ag, g, dg), ag)
        gc_prev = gc * f * ws
        if wg:
            dsi = _dsigmoid(i, di) * wg
            ga_i = gc * g * dsi
            if self.coupled:  # f = 1 - i
                ga_i = ga_i - gc * s["c_prev"] * dsi
            else:
                ga_f = rules.linear(xp, gc * s["c_prev"] * _dsigmoid(f, df) * wg, af)
            ga_i = rules.linear(xp, ga_i, ai)
            if self.P is not None:
                gc_prev = gc_prev + ga_i * self.P[0] + ga_f * self.P[2]
        ga = xp.concatenate([ga_i, ga_o, ga_f, ga_g], axis=-1)
        return ga, (ga @ self.R, gc_prev)


class _GRUCell:
    """``z, r = sigmoid(a_z, a_r)``, ``h = tanh(x W_h^T + (r H_prev) R_h^T + Rb_h + Wb_h)`` or, with
    linear_before_reset, ``tanh(x W_h^T + r (H_prev R_h^T + Rb_h) + Wb_h)``; ``H = (1 - z) h + z H_prev``."""

    states = 1

    def __init__(self, xp, W, R, B, H, clip, lbr, rules: _Rules):
        self.xp, self.W, self.H, self.clip, self.lbr, self.rules = xp, W, H, clip, lbr, rules
        self.Rzr, self.Rh = R[: 2 * H], R[2 * H:]
        self.x_bias = B[: 3 * H] if B is not None else 0
        self.Rb = B[3 * H:] if B is not None else xp.zeros(3 * H, dtype=W.dtype)

    def step(self, xw, state):
        xp, H, clip = self.xp, self.H, self.clip
        (h,) = state
        azr = xw[:, : 2 * H] + h @ self.Rzr.T + self.Rb[: 2 * H]
        az, ar = azr[:, :H], azr[:, H:]
        cz, dz = _clip(xp, az, clip)
        cr, dr = _clip(xp, ar, clip)
        z, r = _sigmoid(xp, cz), _sigmoid(xp, cr)
        if self.lbr:
            u = h @ self.Rh.T + self.Rb[2 * H:]
            ah = xw[:, 2 * H:] + r * u
        else:
            u = None
            ah = xw[:, 2 * H:] + (r * h) @ self.Rh.T + self.Rb[2 * H:]
        ch, dh = _clip(xp, ah, clip)
        n = xp.tanh(ch)
        cache = dict(a=(az, ar, ah), d=(dz, dr, dh), z=z, r=r, n=n, h_prev=h, u=u)
        return ((1 - z) * n + z * h,), cache

    def back(self, s, grads):
        xp, rules = self.xp, self.rules
        (gh,) = grads
        az, ar, ah = s["a"]
        dz, dr, dh = s["d"]
        z, r, n, h = s["z"], s["r"], s["n"], s["h_prev"]
        ws, wg = rules.signal, rules.gate
        gh_prev = gh * z * ws
        ga_h = rules.linear(xp, rules.squash(gh * (1 - z) * ws, ah, n, dh), ah)
        ga_z = ga_r = xp.zeros_like(ga_h)
        if self.lbr:
            gu = ga_h * r * ws
            gh_prev = gh_prev + gu @ self.Rh
            if wg:
                ga_r = ga_h * s["u"] * _dsigmoid(r, dr) * wg
        else:
            grh = ga_h @ self.Rh  # at r * H_prev
            gh_prev = gh_prev + grh * r * ws
            if wg:
                ga_r = grh * h * _dsigmoid(r, dr) * wg
        if wg:
            ga_z = gh * (h - n) * _dsigmoid(z, dz) * wg
        ga_zr = xp.concatenate([rules.linear(xp, ga_z, az), rules.linear(xp, ga_r, ar)], axis=-1)
        return xp.concatenate([ga_zr, ga_h], axis=-1), (gh_prev + ga_zr @ self.Rzr,)


class _RNNCell:
    """``H = tanh(x W^T + H_prev R^T + Wb + Rb)``."""

    states = 1

    def __init__(self, xp, W, R, B, H, clip, rules: _Rules):
        self.xp, self.W, self.R, self.H, self.clip, self.rules = xp, W, R, H, clip, rules
        self.x_bias = B[:H] + B[H:] if B is not None else 0

    def step(self, xw, state):
        (h,) = state
        a = xw + h @ self.R.T
        ca, da = _clip(self.xp, a, self.clip)
        y = self.xp.tanh(ca)
        return (y,), dict(a=a, d=da, y=y)

    def back(self, s, grads):
        ga = self.rules.linear(self.xp, self.rules.squash(grads[0], s["a"], s["y"], s["d"]), s["a"])
        return ga, (ga @ self.R,)


# ---------------------------------------------------------------------------------------------- unrolling
def _attributes(ctx: OpContext, op: str) -> tuple[int, list[str], float | None]:
    """(hidden size, directions, clip), refusing what is not implemented."""
    direction = _text(ctx.attr("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ctx.fail(f"direction={direction!r} is not defined")
    dirs = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    acts = ctx.attr("activations")
    if acts is not None:
        want = list(_DEFAULT_ACTIVATIONS[op]) * len(dirs)
        got = [_text(a) for a in acts]
        if [a.lower() for a in got] != [a.lower() for a in want]:
            raise ctx.fail(f"activations={got} are not supported (only the defaults {want})")
    if ctx.attr("hidden_size") is None:
        raise ctx.fail("the hidden_size attribute is required")
    if int(ctx.attr("layout", 0)):
        raise ctx.fail("layout=1 (batch first) is not supported (onnxruntime's kernels refuse it too)")
    clip = ctx.attr("clip")
    return int(ctx.attr("hidden_size")), dirs, (float(clip) if clip is not None else None)


def _unrolled(ctx: OpContext, op: str, make_cell, state_inputs: tuple[int, ...]):
    """The backward of a recurrent node: ``make_cell(env, d)`` builds direction ``d``'s cell."""
    _, dirs, _ = _attributes(ctx, op)
    xp, node = ctx.xp, ctx.node
    vx = ctx.value(ctx.input(0))
    vlens = ctx.value(ctx.input(4)) if ctx.input(4) else None
    vstates = [ctx.value(ctx.input(k)) if ctx.input(k) else None for k in state_inputs]

    def back(env, gy):
        lead = env.lead
        X = env[vx]
        T, Bsz = X.shape[0], X.shape[1]
        states0 = [None if v is None else env[v] for v in vstates]
        valid = None
        if vlens is not None:
            lens = xp.asarray(env[vlens]).astype(np.int64).reshape(-1)
            if bool((lens < 1).any()) or bool((lens > T).any()):
                raise ctx.fail(f"sequence_lens must be in [1, {T}], got {lens.tolist()}")
            valid = (xp.arange(T)[:, None] < lens[None, :])[..., None]  # (T, B, 1)
        gY, g_final = gy[0], list(gy[1:1 + len(state_inputs)])
        lead_shape = next(g.shape[:lead] for g in gy if g is not None)
        gX = 0
        g_init = [[] for _ in state_inputs]
        for d, direction in enumerate(dirs):
            cell = make_cell(env, d)
            order = list(range(T)) if direction == "forward" else list(range(T - 1, -1, -1))
            state = tuple(s[d] if s is not None else xp.zeros((Bsz, cell.H), dtype=X.dtype) for s in states0)
            xw = X @ cell.W.T + cell.x_bias
            caches = {}
            for t in order:
                new, caches[t] = cell.step(xw[t], state)
                state = new if valid is None else tuple(xp.where(valid[t], a, b) for a, b in zip(new, state))
            g = [gf[..., d, :, :] if gf is not None else xp.zeros(lead_shape + (Bsz, cell.H), dtype=env.dtype)
                 for gf in g_final]
            g += [xp.zeros(lead_shape + (Bsz, cell.H), dtype=env.dtype)] * (len(state_inputs) - len(g))
            gas = [None] * T
            for t in reversed(order):
                if gY is not None:  # Y is zero (a constant) past a sequence's length
                    gy_t = gY[..., t, d, :, :]
                    g[0] = g[0] + (gy_t if valid is None else xp.where(valid[t], gy_t, 0))
                ga, prev = cell.back(caches[t], g)
                if valid is not None:
                    ga = xp.where(valid[t], ga, 0)
                    prev = tuple(xp.where(valid[t], a, b) for a, b in zip(prev, g))
                gas[t], g = ga, list(prev)
            gX = gX + xp.stack(gas, axis=-3) @ cell.W
            for k in range(len(state_inputs)):
                g_init[k].append(g[k])
        out = [gX] + [None] * (len(node.inputs) - 1)
        for k, grads in zip(state_inputs, g_init):
            if ctx.carrying(k):
                out[k] = xp.stack(grads, axis=-3)
        return out

    return back


def _check_inputs(ctx: OpContext, n_outputs: int) -> None:
    if ctx.carrying(4):
        raise ctx.fail(f"input 4 (sequence_lens, {ctx.input(4)!r}) carries relevance")
    if len(ctx.node.outputs) > n_outputs:
        raise ctx.fail(f"{len(ctx.node.outputs)} outputs; {ctx.node.op_type} has {n_outputs}")


def _lstm(ctx: OpContext, op: str, W: _Param, R: _Param):
    H, _, clip = _attributes(ctx, op)
    rules, coupled = _rules(ctx), bool(int(ctx.attr("input_forget", 0)))
    B, P = _Param(ctx, 3, "B"), _Param(ctx, 7, "P")
    _check_inputs(ctx, 3)
    xp = ctx.xp

    def make_cell(env, d):
        b, p = B(env), P(env)
        return _LSTMCell(xp, W(env)[d], R(env)[d], b[d] if b is not None else None, p[d] if p is not None else None,
                         H, clip, coupled, rules)

    return _unrolled(ctx, op, make_cell, (5, 6))


@register("LSTM", kind="gate")
def lstm(ctx: OpContext):
    return _lstm(ctx, "LSTM", _Param(ctx, 1, "W"), _Param(ctx, 2, "R"))


@register("GRU", kind="gate")
def gru(ctx: OpContext):
    H, _, clip = _attributes(ctx, "GRU")
    rules, lbr = _rules(ctx), bool(int(ctx.attr("linear_before_reset", 0)))
    W, R, B = _Param(ctx, 1, "W"), _Param(ctx, 2, "R"), _Param(ctx, 3, "B")
    _check_inputs(ctx, 2)
    xp = ctx.xp

    def make_cell(env, d):
        b = B(env)
        return _GRUCell(xp, W(env)[d], R(env)[d], b[d] if b is not None else None, H, clip, lbr, rules)

    return _unrolled(ctx, "GRU", make_cell, (5,))


@register("RNN", kind="unary")
def rnn(ctx: OpContext):
    H, _, clip = _attributes(ctx, "RNN")
    rules = _rules(ctx)
    W, R, B = _Param(ctx, 1, "W"), _Param(ctx, 2, "R"), _Param(ctx, 3, "B")
    _check_inputs(ctx, 2)
    xp = ctx.xp

    def make_cell(env, d):
        b = B(env)
        return _RNNCell(xp, W(env)[d], R(env)[d], b[d] if b is not None else None, H, clip, rules)

    return _unrolled(ctx, "RNN", make_cell, (5,))


@register("DynamicQuantizeLSTM", kind="gate", domain=MS)
def dynamic_quantize_lstm(ctx: OpContext):
    """onnxruntime's int8 LSTM: ``W (D, I, 4H)`` and ``R (D, H, 4H)`` quantised per direction or per output
    channel (scales and zero points 8-11), the activations quantised inside the kernel. Explained as the LSTM of
    the dequantised weights ``(q - zp) * scale`` (dequantised once, here), activation rounding transparent."""
    weights = []
    for k, ks, kz, what in ((1, 8, 9, "W"), (2, 10, 11, "R")):
        q, scale, zp = ctx.const(k), ctx.const(ks), ctx.const(kz)
        if q is None or scale is None or zp is None:
            raise ctx.fail(f"the quantised {what}, its scale and zero point must be initializers")
        D, G = q.shape[0], q.shape[2]
        if scale.size not in (D, D * G) or zp.size != scale.size:
            raise ctx.fail(f"{what} scale {scale.shape} / zero point {zp.shape} do not fit {what} of shape {q.shape}")
        f = np.float32
        deq = (q.astype(f) - zp.reshape(D, 1, -1).astype(f)) * scale.reshape(D, 1, -1).astype(f)  # (D, I or H, 4H)
        weights.append(_Param(ctx, k, what, np.ascontiguousarray(deq.swapaxes(1, 2))))
    return _lstm(ctx, "LSTM", *weights)
