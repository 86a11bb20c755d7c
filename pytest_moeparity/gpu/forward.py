"""The CuPy traced forward of Qwen3-MoE, stage for stage the same as :class:`..reference.NumpyForward`.

Arithmetic is float32 everywhere; ``act_dtype`` is the storage precision of activations: after
every operation where the reference rounds (``NumpyForward._a``) this forward rounds too
(float16: through ``astype``; bfloat16: round-to-nearest-even kernel), so ``cupy-f16`` is
comparable with ``numpy-f16``.

Weights stay quantized on the device (:mod:`.weights`); every product with a weight goes through
:func:`.kernels.qmatmul` / :func:`.kernels.qmatmul_experts`, which dispatch on the tensor's own
quant type. The router's top-k and the grouping of (token, slot) pairs by expert run on the
device: a layer needs no host synchronisation unless per-expert stages are planned (their
expert list depends on the routing).
"""
from __future__ import annotations

import itertools
import json

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..contract import S
from ..faults import dispatch_type, misdispatch_dequantize
from ..model import GGUFModel
from ..plan import SavePlan
from ..reference import ForwardResult
from ..trace import Recorder, Trace
from . import kernels as K
from .weights import DeviceWeights, GpuMemoryError, device_weights, memory_error

ACT_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_NAMES = {"float32": "cupy", "float16": "cupy-f16", "bfloat16": "cupy-bf16"}
# TEST-ONLY fault switches (CupyEngine(..., fault=...)): the planted historical bug.
FAULTS = {
    # expert products of every Q4_K ffn_down_exps read its bytes with the Q6_K kernel
    "q4k-as-q6k": ("ffn_down_exps", Q.Q4_K, Q.Q6_K),
}
_QKV = ("attn_q", "attn_k", "attn_v")
_EXPERT_STAGES = (S.moe_expert_gate, S.moe_expert_up, S.moe_expert_swiglu, S.moe_expert_out)


class CupyEngine:
    """Traced forward on the GPU. ``trace(tokens, plan, *, faults=(), forced_routing=None,
    layer_inputs=None) -> Trace`` (the engine protocol of :mod:`..backends`, same semantics as
    ``NumpyForward.run``); ``run`` also returns the logits.

    ``fault`` (keyword only) is for tests of the harness: ``"q4k-as-q6k"`` plants the bug this
    project was built to find. ``backend`` (keyword only) swaps the CuPy backend for the CPU
    emulator (:mod:`.emulator`). ``streaming`` forces the weight mode (None: by free memory).
    """

    def __init__(self, model: GGUFModel, act_dtype: str = "float32", name: str | None = None, *,
                 fault: str | None = None, backend: K.Backend | None = None, streaming: bool | None = None):
        if act_dtype not in ACT_DTYPES:
            raise ValueError(f"act_dtype must be one of {', '.join(ACT_DTYPES)}, not {act_dtype!r}")
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; test-only faults: {', '.join(FAULTS)}")
        self.model = model
        self.cfg = model.config
        self.act_dtype = act_dtype
        self.name = name or DEFAULT_NAMES[act_dtype]
        self.fault = fault
        self.backend = backend if backend is not None else K.get_backend()
        self.xp = self.backend.xp
        self._streaming = streaming
        self._weights: DeviceWeights | None = None
        self._capturing = False  # inside graphed(): no cuBLAS calls
        self._faults: list = []      # planted faults of the current run (faults.py)
        self._forced: dict = {}      # forced routing of the current run
        # the counts of the launches whose last block to get there finishes the launch (norm_rope_attention);
        # each launch leaves them at 0, and the engine's launches run one after another
        self._sync = K.counter_buffer(backend=self.backend)

    # -- weights -----------------------------------------------------------------------------
    @property
    def weights(self) -> DeviceWeights:
        if self._weights is None:
            try:
                self._weights = device_weights(self.model, self.backend, streaming=self._streaming)
            except self.backend.oom_errors as exc:
                raise memory_error(exc, "preparing the weights", self.backend, None) from exc
        return self._weights

    @property
    def upload_count(self) -> int:
        """Tensors uploaded for this engine's model so far (shared by engines on the same file)."""
        return self.weights.uploads

    def _as_qtype(self, layer: int, tensor_kind: str, wt: K.DeviceTensor) -> Q | None:
        """The kernel type to read ``wt`` with when a planted fault says so, else None (its own type)."""
        wrong = dispatch_type(self._faults, layer, tensor_kind) if self._faults else None
        if wrong is not None and wrong != wt.source_qtype.name:  # --moe-inject dispatch=...
            if wt.qtype != wt.source_qtype:
                raise K.KernelError(f"dispatch fault on {wt.name}: its type {wt.source_qtype.name} has no GPU kernel "
                                    f"(uploaded as F32), so its bytes cannot be re-read as {wrong}")
            wrong_q = Q[wrong]
            if wrong_q not in K.KERNEL_QTYPES:
                raise K.KernelError(f"dispatch fault on {wt.name}: no GPU kernel for {wrong}; kernels exist for "
                                    + ", ".join(t.name for t in K.KERNEL_QTYPES))
            return wrong_q
        if self.fault is None:
            return None
        kind, victim, wrong_t = FAULTS[self.fault]
        return wrong_t if (tensor_kind == kind and wt.qtype == victim) else None

    def _layer_mm(self, x, layer: int, name: str, weights: DeviceWeights, digits=None):
        return self._layer_mms(x, layer, (name,), weights, digits)[0]

    def _layer_tensors(self, layer: int, names, weights: DeviceWeights) -> tuple[list, list]:
        """A layer's matrices and the kernel type each is read with (None: its own)."""
        wts = [weights.layer(layer, n) for n in names]
        return wts, [self._as_qtype(layer, n, wt) for n, wt in zip(names, wts)]

    def _layer_mms(self, x, layer: int, names, weights: DeviceWeights, digits=None) -> list:
        """Products of one input with several of a layer's matrices (one launch where their types agree);
        ``digits``: x's, written by the kernel that wrote x (see _wants_digits)."""
        wts, as_qtypes = self._layer_tensors(layer, names, weights)
        return K.qmatmul_shared_input(self._c(x), wts, as_qtypes=as_qtypes, digits=digits, backend=self.backend)

    def _wants_digits(self, rec: Recorder, layer: int, stage: str, n_tokens: int, wts, as_qtypes) -> bool:
        """Whether the kernel writing ``stage``'s value should write its digits too: the products reading
        the value take the tensor cores, and nothing changes it in between (float32, no planted fault on
        the stage)."""
        return (bool(K.FUSE_DIGITS) and self._fusable(rec, layer, (stage,))
                and K.reads_digits(n_tokens, wts, as_qtypes, backend=self.backend))

    def _vec(self, layer: int, name: str, weights: DeviceWeights):
        """A layer's 1-D weight (norm), honouring a planted dispatch fault as the reference does."""
        wrong = dispatch_type(self._faults, layer, name) if self._faults else None
        if wrong is not None:
            t = self.model.layer(layer, name)
            if wrong != t.type_name:
                vals = misdispatch_dequantize(t.raw, wrong, t.shape[-1], np.float32).reshape(t.shape)
                return self.backend.to_device(np.ascontiguousarray(vals, dtype=np.float32))
        return weights.layer_vector(layer, name)

    def _expert_faults(self, rec: Recorder, stage: str, layer: int, val, ids):
        """Planted faults of a per-expert stage on the grouped [T, k, ...] values: each fault acts on
        the rows of the (token, slot) pairs routed to its expert (all pairs without an expert), as
        the reference applies it to each expert's rows."""
        fs = self._stage_faults(rec, stage, layer)
        if not fs:
            return val
        xp = self.xp
        flat = xp.ascontiguousarray(val).reshape(ids.shape[0] * ids.shape[1], -1)
        ids_flat = ids.reshape(-1)
        for f in fs:
            if f.expert is None:
                flat = f.apply(flat)
            else:
                rows = xp.nonzero(ids_flat == f.expert)[0]
                if int(rows.size):
                    flat[rows] = f.apply(flat[rows])
        return flat.reshape(val.shape)

    # -- elementwise helpers -------------------------------------------------------------------
    def _a(self, x):
        """Store an activation: round to the activation dtype, keep float32 for arithmetic."""
        xp = self.xp
        if self.act_dtype == "float32":
            return x if x.dtype == np.float32 else x.astype(np.float32)
        if self.act_dtype == "float16":
            return x.astype(np.float16).astype(np.float32)
        y = xp.array(x, dtype=np.float32, copy=True, order="C")
        return K.round_bf16_(y, backend=self.backend)

    def _c(self, x):
        return self.xp.ascontiguousarray(x, dtype=np.float32)

    def _mm(self, x, wt: K.DeviceTensor, as_qtype: Q | None = None):
        return K.qmatmul(self._c(x), wt, as_qtype=as_qtype, backend=self.backend)

    def _rms_norm(self, x, weight):
        return K.rms_norm(x, weight, self.cfg.rms_eps, backend=self.backend)

    def _norm(self, x, weight, digits: bool):
        """The stored RMSNorm of x and, where ``digits``, its digits from the same launch (else None)."""
        if digits:
            return K.rms_norm(x, weight, self.cfg.rms_eps, digits=True, backend=self.backend)
        return self._a(self._rms_norm(x, weight)), None

    def _rope_tables(self, n_tokens: int):
        """cos/sin [T, 1, hd/2] computed on the host exactly as reference.rope_neox does."""
        hd = self.cfg.head_dim
        half = hd // 2
        inv_freq = self.cfg.rope_base ** (-np.arange(0, half, dtype=np.float64) * 2.0 / hd)
        ang = np.arange(n_tokens).astype(np.float64)[:, None] * inv_freq[None, :]
        cos = np.cos(ang).astype(np.float32)
        sin = np.sin(ang).astype(np.float32)
        return self.backend.to_device(cos), self.backend.to_device(sin)

    # -- forward -------------------------------------------------------------------------------
    def trace(self, tokens, plan: SavePlan | None = None, *, faults=(), forced_routing: dict | None = None,
              layer_inputs: dict | None = None) -> Trace:
        return self.run(tokens, plan, faults=faults, forced_routing=forced_routing, layer_inputs=layer_inputs).trace

    def run(self, tokens, plan: SavePlan | None = None, *, meta: dict | None = None, faults=(),
            forced_routing: dict | None = None, layer_inputs: dict | None = None) -> ForwardResult:
        """The traced forward. ``faults``: planted faults (:mod:`..faults`: value faults at stage
        boundaries, ``dispatch`` faults re-read a tensor's bytes with another type's kernel).
        ``forced_routing``: ``{layer: ids [T, K]}`` used instead of the router's choice (weights from
        this forward's probabilities at those ids). ``layer_inputs``: ``{layer: x [T, H]}`` isolated
        mode: each listed layer runs alone from that input; no embedding, no head."""
        tokens = self.model.validate_tokens(tokens)
        plan = plan or SavePlan.empty()
        plan.resolve_layers(self.cfg.n_layers)
        weights = self.weights
        self._faults = list(faults)
        self._forced = dict(forced_routing or {})
        try:
            return self._run(tokens, plan, weights, meta, layer_inputs)
        except self.backend.oom_errors as exc:
            raise memory_error(exc, f"running the forward on {len(tokens)} tokens", self.backend, weights) from exc
        finally:
            self._faults, self._forced = [], {}

    def _run(self, tokens, plan, weights: DeviceWeights, meta, layer_inputs) -> ForwardResult:
        be, a = self.backend, self._a
        T = len(tokens)
        rec = Recorder(plan, T, to_host=be.asnumpy, faults=self._faults)
        info = {"backend": self.name, "compute_dtype": "float32", "act_dtype": self.act_dtype,
                "tokens": json.dumps(tokens), "model": self.model.path.name,
                "model_size": str(self.model.file_size), "weights_mode": weights.mode,
                "device_backend": be.name, **({"fault": self.fault} if self.fault else {}), **(meta or {})}
        if self._forced:
            info["forced_routing"] = "reference"
        cos, sin = self._rope_tables(T)

        if layer_inputs is not None:  # isolated mode
            info["mode"] = "isolated"
            for layer in sorted(layer_inputs):
                if not 0 <= int(layer) < self.cfg.n_layers:
                    raise ValueError(f"layer_inputs: layer {layer} out of range 0..{self.cfg.n_layers - 1}")
                x = a(self._input(layer_inputs[layer], (T, self.cfg.hidden), f"layer_inputs[{layer}]"))
                attn = self.attention(layer, x, cos, sin, rec, weights)
                self.moe(layer, x, attn, rec, weights)
                weights.release_layer(layer)
            return ForwardResult(logits=np.empty((T, 0), np.float32), trace=rec.trace(info))

        x = rec.tap(S.embedding, None, self._embed(tokens))
        logits = self._layers_and_head(x, cos, sin, rec, weights)
        return ForwardResult(logits=be.asnumpy(logits).astype(np.float32), trace=rec.trace(info))

    def _embed(self, tokens):
        emb = self.model.tensor("token_embd.weight").dequantize_rows(np.asarray(tokens), np.float32)
        return self._a(self.backend.to_device(emb))

    def _layers_and_head(self, x, cos, sin, rec: Recorder, weights: DeviceWeights):
        """Every layer, the final norm and the head on device arrays: device logits [T, V]."""
        a, n = self._a, self.cfg.n_layers
        normed = None  # the next norm's output and digits, where the layer boundary's launch wrote them
        for layer in range(n):
            attn = self.attention(layer, x, cos, sin, rec, weights, normed=normed)
            x, normed = self.moe(layer, x, attn, rec, weights, next_norm=self._next_norm(rec, layer, x, weights))
            weights.release_layer(layer)
        chunks = weights.output_chunks()
        first = next(chunks)
        if normed is None:
            # the final norm writes its digits where the head takes the tensor cores (2 or more tokens, Q4_K / Q6_K)
            h_digits = self._wants_digits(rec, None, S.final_norm, int(x.shape[0]), [first[1]], [None])
            normed = self._norm(x, weights.vector("output_norm.weight"), h_digits)
        h, h_dig = normed
        h = rec.tap(S.final_norm, None, h)
        logits = a(self.lm_head(h, weights, digits=h_dig, chunks=itertools.chain([first], chunks)))
        return rec.tap(S.lm_head, None, logits)

    def graphed(self, tokens) -> "GraphedForward":
        """The untraced forward of this prompt captured as one CUDA graph (resident weights, CuPy only).

        Replaying it launches every kernel of the forward with no Python in between, which separates
        the kernels' own time from the per-launch host overhead of the eager path. Temporaries live in
        a private memory pool owned by the graph, so nothing else can be handed its buffers.
        """
        be = self.backend
        if be.name != "cupy":
            raise ValueError("graphed(): needs the CuPy backend")
        if K.debug_enabled():
            raise ValueError("graphed(): debug mode synchronises after each launch; turn it off (kernels.set_debug(False))")
        weights = self.weights
        if weights.streaming:
            raise ValueError("graphed(): the weights stream per layer; graphs need them resident")
        cp = be.cupy
        tokens = self.model.validate_tokens(tokens)
        T = len(tokens)
        self._faults, self._forced = [], {}
        x = self._embed(tokens)
        cos, sin = self._rope_tables(T)
        rec = Recorder(SavePlan.empty(), T, to_host=be.asnumpy)
        pool = cp.cuda.MemoryPool()
        stream = cp.cuda.Stream(non_blocking=True)
        self._capturing = True
        try:
            with cp.cuda.using_allocator(pool.malloc), stream:
                self._layers_and_head(x, cos, sin, rec, weights)  # warm-up: fills the private pool
                stream.synchronize()
                stream.begin_capture()
                try:
                    logits = self._layers_and_head(x, cos, sin, rec, weights)
                finally:
                    graph = stream.end_capture()
        finally:
            self._capturing = False
        return GraphedForward(graph, stream, logits, (x, cos, sin, pool))

    def _input(self, value, shape: tuple[int, ...], what: str):
        """A host (NumPy) or device array as a C-contiguous float32 device array of ``shape``."""
        if self.backend.is_array(value):
            arr = self.xp.array(value, dtype=np.float32, copy=True, order="C")
        else:
            arr = self.backend.to_device(np.ascontiguousarray(np.asarray(value, dtype=np.float32)))
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{what} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        return arr

    def _next_norm(self, rec: Recorder, layer: int, x, weights: DeviceWeights):
        """The weight of the norm after ``layer`` (the next layer's attn_norm, or the output norm) where the
        layer's last launch should compute it with its digits (the layer boundary in one launch: short
        prompts whose next products take the tensor cores, resident weights); else None."""
        if weights.streaming or not K.FUSE_DIGITS:
            return None
        T, nxt = int(x.shape[0]), layer + 1
        if nxt < self.cfg.n_layers:
            if self._wants_digits(rec, nxt, S.attn_norm, T, *self._layer_tensors(nxt, _QKV, weights)):
                return self._vec(nxt, "attn_norm", weights)
            return None
        out_t = weights.tensor(self.model.output.name)
        if self._wants_digits(rec, None, S.final_norm, T, [out_t], [None]):
            return weights.vector("output_norm.weight")
        return None

    def attention(self, layer: int, x, cos, sin, rec: Recorder, weights: DeviceWeights, *, normed=None):
        """The attention block of ``layer`` on the residual x; ``normed``: its attn_norm output and digits
        where the previous layer's boundary launch computed them (see _next_norm)."""
        cfg, a, L, xp = self.cfg, self._a, layer, self.xp
        T, nh, nkv, hd = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

        qkv = _QKV
        if normed is not None:
            h, h_dig = normed
        else:
            h, h_dig = self._norm(x, self._vec(L, "attn_norm", weights),
                                self._wants_digits(rec, L, S.attn_norm, T, *self._layer_tensors(L, qkv, weights)))
        h = rec.tap(S.attn_norm, L, h)
        q, k, v = (a(y) for y in self._layer_mms(h, L, qkv, weights, digits=h_dig))
        q = rec.tap(S.q_proj, L, q)
        k = rec.tap(S.k_proj, L, k)
        v = rec.tap(S.v_proj, L, v)

        wq, wk = self._vec(L, "attn_q_norm", weights), self._vec(L, "attn_k_norm", weights)
        ctx_dig = None
        if (self._fusable(rec, L, (S.q_norm, S.k_norm, S.q_post_rope, S.k_post_rope, S.attn_scores, S.attn_softmax))
                and self._wants_digits(rec, L, S.attention, T, *self._layer_tensors(L, ("attn_output",), weights))):
            # the q/k norms, RoPE, attention and the context's digits for the tensor-core attn_output product in
            # one launch (short prompts)
            qn, kn, q, k, scores, p, ctx, ctx_dig = K.norm_rope_attention(
                q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v, wq, wk, cfg.rms_eps, cos, sin, sync=self._sync,
                backend=self.backend)
            for stage, val in ((S.q_norm, qn), (S.k_norm, kn), (S.q_post_rope, q), (S.k_post_rope, k),
                               (S.attn_scores, scores), (S.attn_softmax, p)):
                rec.tap(stage, L, val)
        else:
            ctx = self._attention_parts(L, q, k, v, wq, wk, cos, sin, rec)
        ctx = rec.tap(S.attention, L, ctx)
        out = a(self._layer_mm(ctx, L, "attn_output", weights, digits=ctx_dig))
        return rec.tap(S.attn_out, L, out)  # moe() adds the residual

    def _attention_parts(self, L: int, q, k, v, wq, wk, cos, sin, rec: Recorder):
        """The q/k norms and RoPE, then scores, softmax and context (the layer's context), in the fewest
        launches its faults and precision mode allow."""
        cfg, a = self.cfg, self._a
        T, nh, nkv, hd = q.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if self._fusable(rec, L, (S.q_norm, S.k_norm)):
            # one launch for the q/k norms and RoPE (a planted fault on a norm's output, or a rounding
            # precision mode, takes the stage-by-stage path below)
            qn, kn, q, k = K.qk_norm_rope(q.reshape(T, nh, hd), k.reshape(T, nkv, hd), wq, wk, cfg.rms_eps, cos, sin,
                                          backend=self.backend)
            rec.tap(S.q_norm, L, qn)
            rec.tap(S.k_norm, L, kn)
        else:
            q = a(self._rms_norm(q.reshape(T, nh, hd), wq))
            k = a(self._rms_norm(k.reshape(T, nkv, hd), wk))
            q = rec.tap(S.q_norm, L, q)
            k = rec.tap(S.k_norm, L, k)
            q = a(K.rope_neox(q, cos, sin, backend=self.backend))
            k = a(K.rope_neox(k, cos, sin, backend=self.backend))
        q = rec.tap(S.q_post_rope, L, q)
        k = rec.tap(S.k_post_rope, L, k)

        if self._fusable(rec, L, (S.attn_scores, S.attn_softmax)):
            # one launch for scores, causal softmax and context (a planted fault on the scores or the
            # probabilities, or a rounding precision mode, takes the stage-by-stage path below)
            scores, p, ctx = K.attention_core(q, k, v, backend=self.backend)
            rec.tap(S.attn_scores, L, scores)
            rec.tap(S.attn_softmax, L, p)
        else:
            scores, p, ctx = self._attention_stages(L, q, k, v, rec)
        return ctx

    def _fusable(self, rec: Recorder, layer: int, inner) -> bool:
        """Whether one fused kernel may compute a run of stages whose ``inner`` stages feed the next
        within it: float32 activations (no rounding between the stages) and no planted fault on an
        inner stage, of any expert (the next stage must read the faulted value, so those take the stage path)."""
        return self.act_dtype == "float32" and not any(self._stage_faults(rec, st, layer) for st in inner)

    @staticmethod
    def _stage_faults(rec: Recorder, stage: str, layer: int) -> list:
        """The planted value faults on ``stage`` at ``layer`` (any expert, any column)."""
        return [f for f in rec.faults if f.kind != "dispatch" and f.target == stage and f.layer in ("*", layer)]

    def _attention_stages(self, L: int, q, k, v, rec: Recorder):
        """Scores, causal softmax and context as separate steps (each rounded to the activation dtype)."""
        cfg, a, xp = self.cfg, self._a, self.xp
        T, nh, nkv, hd = q.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # GQA: query head i reads kv head i // (nh / nkv)
        kk = xp.repeat(k, nh // nkv, axis=1)                       # [T, nh, hd]
        vv = xp.repeat(v.reshape(T, nkv, hd), nh // nkv, axis=1)  # [T, nh, hd]
        if self._capturing:  # cuBLAS cannot run inside a CuPy stream capture: broadcast and reduce
            raw_scores = (q[:, :, None, :] * kk.transpose(1, 0, 2)[None]).sum(axis=-1)  # [T, nh, T]
        else:
            qh = xp.ascontiguousarray(q.transpose(1, 0, 2))            # [nh, T, hd]
            kh = xp.ascontiguousarray(kk.transpose(1, 2, 0))           # [nh, hd, T]
            raw_scores = xp.matmul(qh, kh).transpose(1, 0, 2)          # [T, nh, T]
        scores = a(raw_scores / np.float32(np.sqrt(hd)))
        scores = rec.tap(S.attn_scores, L, scores)
        p = a(K.softmax(scores, causal_period=nh, backend=self.backend))  # rows (t, head): causal mask
        p = rec.tap(S.attn_softmax, L, p)
        if self._capturing:
            ctx = a((p[:, :, :, None] * vv.transpose(1, 0, 2)[None]).sum(axis=2).reshape(T, nh * hd))
        else:
            ph = xp.ascontiguousarray(p.transpose(1, 0, 2))            # [nh, T, T]
            vh = xp.ascontiguousarray(vv.transpose(1, 0, 2))           # [nh, T, hd]
            ctx = a(xp.matmul(ph, vh).transpose(1, 0, 2).reshape(T, nh * hd))
        return scores, p, ctx

    def moe(self, layer: int, x, attn, rec: Recorder, weights: DeviceWeights, *, next_norm=None):
        """The post-attention residual ``x + attn``, then the MoE block and its residual: ``(x, normed)``,
        normed the next norm's output and digits where ``next_norm`` (its weight) is given and the
        combination, the residual and that norm may share a launch, else None."""
        cfg, a, L, be, xp = self.cfg, self._a, layer, self.backend, self.xp
        T = x.shape[0]
        (gate_t, up_t, down_t), (g_as, u_as, d_as) = self._layer_tensors(L, ("ffn_gate_exps", "ffn_up_exps",
                                                                             "ffn_down_exps"), weights)
        wn = self._vec(L, "ffn_norm", weights)
        h_digits = self._wants_digits(rec, L, S.ffn_norm, T, (gate_t, up_t), (g_as, u_as))
        if self._fusable(rec, L, (S.post_attn_residual,)):  # the residual add and ffn_norm in one launch
            if h_digits:  # and ffn_norm's digits for the tensor-core gate / up products
                x, h, h_dig = K.add_rms_norm(x, attn, wn, cfg.rms_eps, digits=True, backend=be)
            else:
                (x, h), h_dig = K.add_rms_norm(x, attn, wn, cfg.rms_eps, backend=be), None
            x = rec.tap(S.post_attn_residual, L, x)
        else:
            x = a(K.add(x, attn, backend=be))
            x = rec.tap(S.post_attn_residual, L, x)
            h, h_dig = self._norm(x, wn, h_digits)
        h = rec.tap(S.ffn_norm, L, h)
        logits = a(self._layer_mm(h, L, "ffn_gate_inp", weights))          # [T, E]
        logits = rec.tap(S.moe_router_logits, L, logits)
        routing = None
        if L not in self._forced and self._fusable(rec, L, (S.moe_router_probs,)):
            # softmax, top-k and (short prompts) the grouping by expert in one launch (forced routing, a
            # planted fault on the probabilities or a rounding precision mode take the path below)
            probs, ids, rw, routing = K.route_experts(self._c(logits), cfg.n_experts_used, backend=be)
            rec.tap(S.moe_router_probs, L, probs)
        else:
            probs = a(K.softmax(logits, backend=be))
            probs = rec.tap(S.moe_router_probs, L, probs)
            if L in self._forced:  # forced routing: given choices, this forward's probabilities
                ids = self._forced_ids(L, probs.shape[0])
                top = xp.take_along_axis(probs, ids.astype(np.int64), axis=-1)
                rw = top / xp.sum(top, axis=-1, keepdims=True)
            else:
                ids, rw = K.router_topk(self._c(probs), cfg.n_experts_used, backend=be)
        rw = a(rw)
        rw = rec.tap(S.moe_router, L, rw)
        rec.capture(S.moe_router_indices, L, ids)

        if routing is None:
            routing = K.expert_routing(ids, cfg.n_experts, backend=be)
        hc = self._c(h)
        ef = self._expert_faults
        g, u = K.qmatmul_experts_shared_input(hc, (gate_t, up_t), routing, as_qtypes=(g_as, u_as), digits=h_dig, backend=be)
        g = ef(rec, S.moe_expert_gate, L, a(g), ids)
        u = ef(rec, S.moe_expert_up, L, a(u), ids)
        if self._wants_digits(rec, L, S.moe_expert_swiglu, T, (down_t,), (d_as,)):  # SwiGLU writes the down
            s, s_dig = K.swiglu(g, u, digits=True, backend=be)                     # projection's digits
        else:
            s, s_dig = a(K.swiglu(g, u, backend=be)), None
        s = ef(rec, S.moe_expert_swiglu, L, s, ids)                                   # [T, k, F]
        y = ef(rec, S.moe_expert_out, L,
               a(K.qmatmul_experts(self._c(s), down_t, routing, x_per_pair=True, as_qtype=d_as, digits=s_dig,
                                   backend=be)), ids)
        if any(rec.wants(st, L) for st in _EXPERT_STAGES):
            self._capture_experts(L, h, ids, (gate_t, g_as), (up_t, u_as), (down_t, d_as), rec)
        normed = None
        if next_norm is not None and self._fusable(rec, L, (S.moe_ffn_out, S.post_ffn_residual)):
            # the combination, the residual add and the next norm with its digits in one launch
            out, x, hn, hn_dig = K.moe_combine_norm(self._c(y), self._c(rw), routing, x, next_norm, cfg.rms_eps,
                                                    backend=be)
            rec.tap(S.moe_ffn_out, L, out)
            normed = (hn, hn_dig)
        elif self._fusable(rec, L, (S.moe_ffn_out,)):  # the combination and the residual add in one launch
            out, x = K.moe_combine(self._c(y), self._c(rw), routing, residual=x, backend=be)
            rec.tap(S.moe_ffn_out, L, out)
        else:
            out = a(K.moe_combine(self._c(y), self._c(rw), routing, backend=be))
            out = rec.tap(S.moe_ffn_out, L, out)
            x = a(K.add(x, out, backend=be))
        x = rec.tap(S.post_ffn_residual, L, x)
        return x, normed

    def _forced_ids(self, layer: int, n_tokens: int):
        """The forced expert ids of ``layer`` as an int32 [T, K] device array (validated)."""
        val = self._forced[layer]
        host = self.backend.asnumpy(val) if self.backend.is_array(val) else np.asarray(val)
        if host.ndim != 2 or host.shape[0] != n_tokens:
            raise ValueError(f"forced_routing[{layer}] has shape {host.shape}, expected [{n_tokens}, K]")
        if host.size and (host.min() < 0 or host.max() >= self.cfg.n_experts):
            raise ValueError(f"forced_routing[{layer}] holds expert ids outside 0..{self.cfg.n_experts - 1}")
        return self.backend.to_device(np.ascontiguousarray(host.astype(np.int32)))

    def _capture_experts(self, layer, h, ids, gate, up, down, rec: Recorder) -> None:
        """Per-expert stages at the captured positions, for the experts the plan resolves."""
        a, be, xp, f = self._a, self.backend, self.xp, rec.apply_faults
        ids_host = be.asnumpy(ids)
        routed = set(np.unique(ids_host[rec.positions]).tolist())
        experts = rec.plan.resolve_experts(self.cfg.n_experts, routed)
        if not experts:
            return
        h_sel = self._c(h[xp.asarray(np.asarray(rec.positions, dtype=np.int64))])
        (gate_t, g_as), (up_t, u_as), (down_t, d_as) = gate, up, down
        for e in experts:
            g = f(S.moe_expert_gate, layer, a(self._mm(h_sel, gate_t.expert(e), g_as)), e)
            u = f(S.moe_expert_up, layer, a(self._mm(h_sel, up_t.expert(e), u_as)), e)
            s = f(S.moe_expert_swiglu, layer, a(K.swiglu(g, u, backend=be)), e)
            o = f(S.moe_expert_out, layer, a(self._mm(s, down_t.expert(e), d_as)), e)
            for stage, val in ((S.moe_expert_gate, g), (S.moe_expert_up, u), (S.moe_expert_swiglu, s),
                               (S.moe_expert_out, o)):
                rec.capture(stage, layer, val, expert=e, preselected=True)

    def lm_head(self, h, weights: DeviceWeights, *, digits=None, chunks=None):
        """The logits of the normed rows h; ``digits``: h's, where the final norm wrote them; ``chunks``:
        ``weights.output_chunks()`` (or what is left of it)."""
        xp = self.xp
        hc = self._c(h)
        V = self.model.output.shape[0]
        logits = None
        for r0, wt in (weights.output_chunks() if chunks is None else chunks):
            if digits is None and K.reads_digits(int(hc.shape[0]), [wt], backend=self.backend):
                digits = K.act_digits(hc, backend=self.backend)  # once for all the chunks
            part = K.qmatmul(hc, wt, digits=digits, backend=self.backend)
            if r0 == 0 and wt.shape[0] == V:
                return part
            if logits is None:
                logits = xp.empty((hc.shape[0], V), dtype=np.float32)
            logits[:, r0:r0 + wt.shape[0]] = part
        return logits


class GraphedForward:
    """A captured forward: ``replay()`` launches it on its stream and returns the device logits."""

    def __init__(self, graph, stream, logits, keep):
        self.graph, self.stream, self.logits = graph, stream, logits
        self._keep = keep  # inputs and the private pool must outlive the graph

    def replay(self):
        self.graph.launch(self.stream)
        return self.logits


__all__ = ["CupyEngine", "GpuMemoryError", "GraphedForward", "ACT_DTYPES", "FAULTS"]
