"""The NumPy reference forward of Qwen3-MoE, traced stage by stage.

Read top to bottom: embedding, then per layer attention and MoE, then the output head. The
forward streams: a layer's attention weights are dequantized when that layer runs, an expert's
weights only when some token chose it (and then once for all those tokens), and the output
projection in row chunks, so peak memory is about one layer's dense weights plus one expert.

Precision: weights are dequantized to the compute dtype (float32, or float64 on request);
``act_dtype`` is what activations are stored in between operations. ``act_dtype=float16``
emulates a half-precision GPU path (each op computed in float32, its result rounded to
float16), which makes half-precision overflow reproducible on any machine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .contract import S
from .faults import dispatch_type, misdispatch_dequantize
from .model import GGUFModel
from .plan import SavePlan
from .trace import Recorder, Trace

LM_HEAD_CHUNK_ROWS = 8192


@dataclass
class ForwardResult:
    logits: np.ndarray  # [T, V] float32
    trace: Trace


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(var + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def rope_neox(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """NEOX RoPE on [T, heads, hd]: rotate the two halves of each head."""
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = base ** (-np.arange(0, half, dtype=np.float64) * 2.0 / hd)
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, half]
    cos = np.cos(ang).astype(x.dtype)[:, None, :]
    sin = np.sin(ang).astype(x.dtype)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def top_k_routing(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts by probability (descending, ties to the lower id) and renormalised weights."""
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, idx, axis=-1)
    return idx, top / np.sum(top, axis=-1, keepdims=True)


class NumpyForward:
    """The reference. ``compute`` is the arithmetic dtype, ``act`` the storage dtype of activations."""

    def __init__(self, model: GGUFModel, compute=np.float32, act=None, name: str = "numpy"):
        self.model = model
        self.cfg = model.config
        self.compute = np.dtype(compute)
        self.act = np.dtype(act or compute)
        self.name = name
        self.faults = []

    # weights -------------------------------------------------------------------------------
    def w(self, layer: int, name: str, expert: int | None = None) -> np.ndarray:
        """A layer weight (or one expert's slice) dequantized by its own quant type."""
        t = self.model.layer(layer, name)
        if expert is not None:
            t = t.expert(expert)
        wrong = dispatch_type(self.faults, layer, name)
        if wrong is not None and wrong != t.type_name:  # planted mis-dispatch (faults.py)
            return misdispatch_dequantize(t.raw, wrong, t.shape[-1], self.compute).reshape(t.shape)
        return t.dequantize(self.compute)

    def _a(self, x: np.ndarray) -> np.ndarray:
        """Store an activation (round to the activation dtype, compute in the compute dtype)."""
        return x.astype(self.act, copy=False).astype(self.compute, copy=False)

    # forward -------------------------------------------------------------------------------
    def run(self, tokens, plan: SavePlan | None = None, *, meta: dict | None = None, faults=(),
            forced_routing: dict | None = None, layer_inputs: dict | None = None) -> ForwardResult:
        """The traced forward.

        ``faults``: planted faults (:mod:`.faults`). ``forced_routing``: ``{layer: ids [T, K]}``, the
        expert choices to use instead of the router's (weights still come from this forward's
        probabilities at those ids). ``layer_inputs``: ``{layer: x [T, H]}`` isolated mode: each
        listed layer runs alone from that input (no embedding, no head); the trace holds those layers.
        """
        # overflow to inf/nan is a result to report (numpy-f16 exists to show it), not a warning
        with np.errstate(over="ignore", invalid="ignore"):
            return self._run(tokens, plan, meta, list(faults), forced_routing or {}, layer_inputs)

    def _run(self, tokens, plan, meta, faults, forced, layer_inputs) -> ForwardResult:
        tokens = self.model.validate_tokens(tokens)
        plan = plan or SavePlan.empty()
        plan.resolve_layers(self.cfg.n_layers)
        rec = Recorder(plan, len(tokens), faults=faults)
        self.faults, self.forced = faults, forced
        a = self._a
        pos = np.arange(len(tokens))
        info = {"backend": self.name, "compute_dtype": self.compute.name, "act_dtype": self.act.name,
                "tokens": json.dumps(tokens), "model": self.model.path.name,
                "model_size": str(self.model.file_size), **(meta or {})}
        if forced:
            info["forced_routing"] = "reference"

        if layer_inputs is not None:  # isolated mode
            info["mode"] = "isolated"
            for layer in sorted(layer_inputs):
                self.layer(layer, a(np.asarray(layer_inputs[layer], dtype=self.compute)), pos, rec)
            return ForwardResult(logits=np.empty((len(tokens), 0), np.float32), trace=rec.trace(info))

        x = a(self.model.tensor("token_embd.weight").dequantize_rows(np.asarray(tokens), self.compute))
        x = rec.tap(S.embedding, None, x)
        for layer in range(self.cfg.n_layers):
            x = self.layer(layer, x, pos, rec)

        h = a(rms_norm(x, self.model.tensor("output_norm.weight").dequantize(self.compute), self.cfg.rms_eps))
        h = rec.tap(S.final_norm, None, h)
        logits = a(self.lm_head(h))
        logits = rec.tap(S.lm_head, None, logits)
        return ForwardResult(logits=logits.astype(np.float32), trace=rec.trace(info))

    def layer(self, layer: int, x: np.ndarray, pos: np.ndarray, rec: Recorder) -> np.ndarray:
        x = self.attention(layer, x, pos, rec)
        return self.moe(layer, x, rec)

    def attention(self, layer: int, x: np.ndarray, pos: np.ndarray, rec: Recorder) -> np.ndarray:
        cfg, a, L = self.cfg, self._a, layer
        T, nh, nkv, hd = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

        h = a(rms_norm(x, self.w(L, "attn_norm"), cfg.rms_eps))
        h = rec.tap(S.attn_norm, L, h)
        q = a(h @ self.w(L, "attn_q").T)
        k = a(h @ self.w(L, "attn_k").T)
        v = a(h @ self.w(L, "attn_v").T)
        q = rec.tap(S.q_proj, L, q)
        k = rec.tap(S.k_proj, L, k)
        v = rec.tap(S.v_proj, L, v)

        q = a(rms_norm(q.reshape(T, nh, hd), self.w(L, "attn_q_norm"), cfg.rms_eps))
        k = a(rms_norm(k.reshape(T, nkv, hd), self.w(L, "attn_k_norm"), cfg.rms_eps))
        q = rec.tap(S.q_norm, L, q)
        k = rec.tap(S.k_norm, L, k)
        q = a(rope_neox(q, pos, cfg.rope_base))
        k = a(rope_neox(k, pos, cfg.rope_base))
        q = rec.tap(S.q_post_rope, L, q)
        k = rec.tap(S.k_post_rope, L, k)

        # GQA: query head i reads kv head i // (nh / nkv)
        kk = np.repeat(k, nh // nkv, axis=1)                       # [T, nh, hd]
        vv = np.repeat(v.reshape(T, nkv, hd), nh // nkv, axis=1)  # [T, nh, hd]
        scores = a(np.einsum("qhd,khd->qhk", q, kk) / np.sqrt(hd).astype(self.compute))  # [T, nh, T]
        scores = rec.tap(S.attn_scores, L, scores)
        causal = np.tril(np.ones((T, T), dtype=bool))[:, None, :]
        p = a(softmax(np.where(causal, scores, -np.inf), axis=-1))
        p = rec.tap(S.attn_softmax, L, p)
        ctx = a(np.einsum("qhk,khd->qhd", p, vv).reshape(T, nh * hd))
        ctx = rec.tap(S.attention, L, ctx)
        out = a(ctx @ self.w(L, "attn_output").T)
        out = rec.tap(S.attn_out, L, out)
        x = a(x + out)
        x = rec.tap(S.post_attn_residual, L, x)
        return x

    def moe(self, layer: int, x: np.ndarray, rec: Recorder) -> np.ndarray:
        cfg, a, L = self.cfg, self._a, layer
        h = a(rms_norm(x, self.w(L, "ffn_norm"), cfg.rms_eps))
        h = rec.tap(S.ffn_norm, L, h)
        logits = a(h @ self.w(L, "ffn_gate_inp").T)                  # [T, E]
        logits = rec.tap(S.moe_router_logits, L, logits)
        probs = a(softmax(logits))
        probs = rec.tap(S.moe_router_probs, L, probs)
        if L in self.forced:  # forced routing: the reference's choices, this forward's probabilities
            idx = np.asarray(self.forced[L], dtype=np.int64)
            top = np.take_along_axis(probs, idx, axis=-1)
            weights = top / np.sum(top, axis=-1, keepdims=True)
        else:
            idx, weights = top_k_routing(probs, cfg.n_experts_used)
        weights = a(weights)
        weights = rec.tap(S.moe_router, L, weights)
        rec.capture(S.moe_router_indices, L, idx.astype(np.int32))

        out = np.zeros_like(h)
        experts_wanted = self._experts_to_capture(L, idx, rec)
        for e in sorted(set(np.unique(idx).tolist()) | set(experts_wanted)):
            wg, wu, wd = (self.w(L, n, e) for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
            tok, slot = np.nonzero(idx == e)
            if tok.size:
                y = self.expert_ffn(h[tok], wg, wu, wd, L, e, rec)[3]
                out[tok] += weights[tok, slot][:, None] * y
            if e in experts_wanted:
                self._capture_expert(L, e, h[rec.positions], wg, wu, wd, rec)
        out = a(out)
        out = rec.tap(S.moe_ffn_out, L, out)
        x = a(x + out)
        x = rec.tap(S.post_ffn_residual, L, x)
        return x

    def expert_ffn(self, h, wg, wu, wd, layer, e, rec: Recorder):
        """One expert on rows of h: (gate, up, swiglu, out), each stored in the activation dtype."""
        a, f = self._a, rec.apply_faults
        g = f(S.moe_expert_gate, layer, a(h @ wg.T), e)
        u = f(S.moe_expert_up, layer, a(h @ wu.T), e)
        s = f(S.moe_expert_swiglu, layer, a(silu(g) * u), e)
        return g, u, s, f(S.moe_expert_out, layer, a(s @ wd.T), e)

    def _experts_to_capture(self, layer: int, idx: np.ndarray, rec: Recorder) -> list[int]:
        if not any(rec.wants(st, layer) for st in (S.moe_expert_gate, S.moe_expert_up, S.moe_expert_swiglu, S.moe_expert_out)):
            return []
        routed = set(np.unique(idx[rec.positions]).tolist())
        return rec.plan.resolve_experts(self.cfg.n_experts, routed)

    def _capture_expert(self, layer, e, h_sel, wg, wu, wd, rec: Recorder) -> None:
        g, u, s, o = self.expert_ffn(h_sel, wg, wu, wd, layer, e, rec)
        for stage, val in ((S.moe_expert_gate, g), (S.moe_expert_up, u), (S.moe_expert_swiglu, s), (S.moe_expert_out, o)):
            rec.capture(stage, layer, val, expert=e, preselected=True)

    def lm_head(self, h: np.ndarray) -> np.ndarray:
        out_t = self.model.output
        V = out_t.shape[0]
        logits = np.empty((h.shape[0], V), dtype=self.compute)
        for r0 in range(0, V, LM_HEAD_CHUNK_ROWS):
            r1 = min(V, r0 + LM_HEAD_CHUNK_ROWS)
            logits[:, r0:r1] = h @ out_t.dequantize_rows(slice(r0, r1), self.compute).T
        return logits


BACKENDS = {
    "numpy": dict(compute=np.float32),
    "numpy-f64": dict(compute=np.float64),
    "numpy-f16": dict(compute=np.float32, act=np.float16),
}


def reference_forward(model: GGUFModel, tokens, plan: SavePlan | None = None, dtype: str = "float32") -> ForwardResult:
    """Convenience: the reference forward in ``float32`` or ``float64``."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, not {dtype!r}")
    name = "numpy" if dtype == "float32" else "numpy-f64"
    return NumpyForward(model, name=name, **BACKENDS[name]).run(tokens, plan)
