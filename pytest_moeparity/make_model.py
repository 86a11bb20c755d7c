"""Write random Qwen3-MoE GGUF files for tests and benchmarks.

Weights are drawn from a seeded generator per tensor (and per expert), quantized with
:mod:`.quants` and streamed to disk one tensor at a time, so a 17 GB ``30b-a3b`` file is made
in bounded memory. Quant mixes follow llama.cpp's rules (BACKGROUND.md section 2).
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from .atomic import atomic_path
from .model import ARCH, LAYER_TENSORS, MODEL_TENSORS, Qwen3MoeConfig, expected_shape
from .quants import quantize

CHUNK_VALUES = 1 << 20  # values per generated chunk of a 2-D tensor
PROGRESS_MIN_BYTES = 64 * 2**20  # progress on stderr by default for files larger than this
PARALLEL_MIN_BYTES = 64 * 2**20  # a process pool by default for files at least this large
QUANT_CHOICES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
# llama.cpp file-type ids (general.file_type)
_FTYPE = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15}


@dataclass(frozen=True)
class ModelSpec:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_experts_used: int
    expert_ff: int
    vocab: int
    rope_base: float = 1_000_000.0
    rms_eps: float = 1e-6
    context_length: int = 4096
    tied_output: bool = False

    def config(self) -> Qwen3MoeConfig:
        return Qwen3MoeConfig(**asdict(self))


PRESETS = {
    # 8 layers so that the Q4_K_M rule mixes Q6_K (layers 0, 3, 6, 7) and Q4_K (1, 2, 4, 5) in ffn_down_exps
    "tiny": ModelSpec(n_layers=8, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8,
                      n_experts_used=2, expert_ff=256, vocab=512, context_length=512),
    "small": ModelSpec(n_layers=12, hidden=512, n_heads=8, n_kv_heads=2, head_dim=64, n_experts=16,
                       n_experts_used=4, expert_ff=512, vocab=4096, context_length=2048),
    # the shapes of Qwen3-30B-A3B (~17 GB at Q4_K_M)
    "30b-a3b": ModelSpec(n_layers=48, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=128, n_experts=128,
                         n_experts_used=8, expert_ff=768, vocab=151936, context_length=40960),
}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits(i_layer, n_layers)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_qtype(name: str, layer: int | None, n_layers: int, quant: str, row_len: int) -> Q:
    """Storage type of one tensor under a file quant type, with llama.cpp's fallbacks."""
    if name in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "output_norm", "ffn_gate_inp"):
        return Q.F32
    if quant in ("F32", "F16", "BF16", "Q8_0", "Q6_K"):
        q = Q[quant]
    elif quant in ("Q4_K_M", "Q5_K_M"):
        base = Q.Q4_K if quant == "Q4_K_M" else Q.Q5_K
        if name == "output":
            q = Q.Q6_K
        elif name in ("attn_v", "ffn_down_exps") and layer is not None and _more_bits(layer, n_layers):
            q = Q.Q6_K
        else:
            q = base
    else:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    block = GGML_QUANT_SIZES[q][0]
    if row_len % block:  # llama.cpp falls back when rows do not fill whole super-blocks
        q = Q.Q8_0 if row_len % 32 == 0 else Q.F16
    return q


@dataclass(frozen=True)
class TensorPlan:
    name: str          # GGUF name, e.g. blk.3.ffn_down_exps.weight
    kind: str          # key of LAYER_TENSORS / MODEL_TENSORS
    layer: int | None
    shape: tuple[int, ...]
    qtype: Q
    seed: tuple[int, ...]
    scale: float       # std of the normal draw
    offset: float      # added after the draw (norm weights sit around 1)

    @property
    def rows_per_chunk(self) -> int:
        """Rows of a 2-D tensor drawn per chunk (~1M values), so big matrices parallelise too."""
        return max(1, CHUNK_VALUES // self.shape[-1]) if len(self.shape) == 2 else 0

    @property
    def n_chunks(self) -> int:
        if len(self.shape) == 3:
            return self.shape[0]
        if len(self.shape) == 2:
            return -(-self.shape[0] // self.rows_per_chunk)
        return 1

    @property
    def nbytes(self) -> int:
        block, tsize = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1])) * (self.shape[-1] // block) * tsize


def plan_tensors(spec: ModelSpec, quant: str, seed: int, hot_layer: int | None = None,
                 hot_scale: float = 1.0) -> list[TensorPlan]:
    cfg = spec.config()
    out = []
    idx = 0

    def add(kind, layer, dims, scale, offset=0.0):
        nonlocal idx
        shape = expected_shape(dims, cfg)
        gname = f"blk.{layer}.{kind}.weight" if layer is not None else f"{kind}.weight"
        q = tensor_qtype(kind, layer, spec.n_layers, quant, shape[-1])
        out.append(TensorPlan(gname, kind, layer, shape, q, (seed, idx), scale, offset))
        idx += 1

    h, f, hd = spec.hidden, spec.expert_ff, spec.head_dim
    add("token_embd", None, MODEL_TENSORS["token_embd"], 1.0)
    for layer in range(spec.n_layers):
        for kind, dims in LAYER_TENSORS.items():
            if kind in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm"):
                add(kind, layer, dims, 0.1, 1.0)
            elif kind == "attn_output":
                add(kind, layer, dims, 1.0 / np.sqrt(spec.n_heads * hd))
            elif kind == "ffn_gate_inp":
                add(kind, layer, dims, 2.0 / np.sqrt(h))
            elif kind == "ffn_down_exps":
                s = 1.0 / np.sqrt(f) * (hot_scale if layer == hot_layer else 1.0)
                add(kind, layer, dims, s)
            else:
                add(kind, layer, dims, 1.0 / np.sqrt(h))
    add("output_norm", None, MODEL_TENSORS["output_norm"], 0.1, 1.0)
    if not spec.tied_output:
        add("output", None, MODEL_TENSORS["output"], 1.0 / np.sqrt(h))
    return out


def make_chunk(tp: TensorPlan, chunk: int) -> np.ndarray:
    """Raw bytes of one chunk: one expert of a 3-D tensor, a band of rows of a 2-D one, a 1-D tensor."""
    rng = np.random.default_rng(tp.seed + (chunk,))
    if len(tp.shape) == 3:
        shape = tp.shape[1:]
    elif len(tp.shape) == 2:
        r0 = chunk * tp.rows_per_chunk
        shape = (min(tp.shape[0], r0 + tp.rows_per_chunk) - r0, tp.shape[1])
    else:
        shape = tp.shape
    vals = rng.standard_normal(shape, dtype=np.float32)
    vals *= np.float32(tp.scale)
    if tp.offset:
        vals += np.float32(tp.offset)
    return quantize(vals, tp.qtype)


def _tensor_bytes(plans: list[TensorPlan], jobs: int):
    """Yield each tensor's raw bytes in order. With ``jobs > 1`` a process pool works on chunks of
    all tensors, at most ``4 * jobs`` chunks ahead of the writer, so memory stays bounded."""
    tasks = ((i, tp, c) for i, tp in enumerate(plans) for c in range(tp.n_chunks))
    if jobs <= 1:
        for tp in plans:
            yield _join(tp, [make_chunk(tp, c) for c in range(tp.n_chunks)])
        return
    from collections import deque

    window = 4 * jobs
    pending: deque = deque()
    with ProcessPoolExecutor(jobs) as pool:
        def refill():
            while len(pending) < window:
                nxt = next(tasks, None)
                if nxt is None:
                    return
                i, tp, c = nxt
                pending.append((i, pool.submit(make_chunk, tp, c)))

        refill()
        for i, tp in enumerate(plans):
            parts = []
            while len(parts) < tp.n_chunks:
                j, fut = pending.popleft()
                assert j == i
                parts.append(fut.result())
                refill()
            yield _join(tp, parts)


def _join(tp: TensorPlan, parts: list[np.ndarray]) -> np.ndarray:
    data = parts[0] if len(parts) == 1 else np.concatenate([p.reshape(-1) for p in parts])
    data = data.reshape(-1)
    if data.nbytes != tp.nbytes:
        raise RuntimeError(f"{tp.name}: generated {data.nbytes} bytes, expected {tp.nbytes}")
    return data


def _tokenizer(writer: GGUFWriter, vocab: int) -> None:
    """A byte-level BPE vocabulary in the gpt2/qwen2 style that llama.cpp loads."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for c in cs]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    n_regular = vocab - len(specials)
    if n_regular < 256 + 1:
        raise ValueError(f"vocab {vocab} too small: needs at least {256 + 1 + len(specials)} tokens")
    tokens = list(byte_chars)
    merges = []
    letters = [c for c in byte_chars if c.isalnum()]
    i = 0
    seen = set(tokens)
    while len(tokens) < n_regular:
        a = letters[i % len(letters)] if i < len(letters) ** 2 else tokens[256 + (i % (len(tokens) - 256))]
        b = letters[(i // len(letters)) % len(letters)]
        i += 1
        if a + b in seen:
            continue
        seen.add(a + b)
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    tokens += specials
    types = [1] * n_regular + [3] * len(specials)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(n_regular)
    writer.add_eos_token_id(n_regular + 2)
    writer.add_pad_token_id(n_regular)
    writer.add_add_bos_token(False)


class _Progress:
    """Progress on stderr: a redrawn line on a terminal, a line per 10 % (or 30 s) otherwise."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.total, self.enabled, self.label = total, enabled, label
        self.tty = sys.stderr.isatty()
        self.done = 0
        self.t0 = time.perf_counter()
        self._last_t = 0.0
        self._last_pct = 0.0

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        pct = 100.0 * self.done / max(self.total, 1)
        due = (now - self._last_t > 0.5) if self.tty else (pct - self._last_pct >= 10 or now - self._last_t > 30)
        if due or self.done >= self.total:
            self._last_t, self._last_pct = now, pct
            el = max(now - self.t0, 1e-9)
            line = (f"{self.label}: {self.done / 2**20:9.1f} / {self.total / 2**20:.1f} MiB ({pct:5.1f}%) "
                    f"{self.done / 2**20 / el:7.1f} MiB/s")
            sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
            sys.stderr.flush()

    def close(self) -> float:
        el = time.perf_counter() - self.t0
        if self.enabled and self.tty:
            sys.stderr.write("\n")
        return el


@dataclass
class MakeResult:
    path: Path
    nbytes: int
    seconds: float
    tensors: int

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 2**20 / max(self.seconds, 1e-9)


def make_model(out: str | os.PathLike, spec: ModelSpec, quant: str = "Q4_K_M", seed: int = 0,
               hot_layer: int | None = None, hot_scale: float = 1.0, jobs: int | None = None,
               progress: bool | None = None, name: str | None = None) -> MakeResult:
    """Write a random Qwen3-MoE GGUF. Atomic: written to a temp file, then renamed."""
    quant = quant.upper()
    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    if hot_layer is not None and not 0 <= hot_layer < spec.n_layers:
        raise ValueError(f"--hot-layer {hot_layer} out of range: the model has {spec.n_layers} layers")
    if spec.n_heads % spec.n_kv_heads or spec.head_dim % 2 or spec.n_experts_used > spec.n_experts:
        raise ValueError("inconsistent dims: heads must be a multiple of kv heads, head_dim even, "
                         "experts_used <= experts")
    plans = plan_tensors(spec, quant, seed, hot_layer, hot_scale)
    total = sum(tp.nbytes for tp in plans)
    out = Path(out)
    if progress is None:
        progress = total > PROGRESS_MIN_BYTES
    jobs = jobs if jobs is not None else (1 if total < PARALLEL_MIN_BYTES else max(1, os.cpu_count() or 1))
    with atomic_path(out) as tmp:
        w = GGUFWriter(tmp, ARCH)
        w.add_name(name or f"moeparity-random-{quant.lower()}-seed{seed}")
        w.add_file_type(_FTYPE[quant])
        w.add_quantization_version(2)
        w.add_context_length(spec.context_length)
        w.add_embedding_length(spec.hidden)
        w.add_block_count(spec.n_layers)
        w.add_feed_forward_length(spec.expert_ff * spec.n_experts_used)
        w.add_head_count(spec.n_heads)
        w.add_head_count_kv(spec.n_kv_heads)
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
        w.add_rope_freq_base(spec.rope_base)
        w.add_layer_norm_rms_eps(spec.rms_eps)
        w.add_expert_count(spec.n_experts)
        w.add_expert_used_count(spec.n_experts_used)
        w.add_expert_feed_forward_length(spec.expert_ff)
        w.add_string("moeparity.generator", "pytest-moeparity make-model")
        w.add_uint32("moeparity.seed", seed)
        if hot_layer is not None:
            w.add_uint32("moeparity.hot_layer", hot_layer)
            w.add_float32("moeparity.hot_scale", float(hot_scale))
        _tokenizer(w, spec.vocab)
        for tp in plans:
            byte_shape = (*tp.shape[:-1], tp.nbytes // int(np.prod(tp.shape[:-1], dtype=np.int64)))
            w.add_tensor_info(tp.name, byte_shape, np.dtype(np.uint8), tp.nbytes, raw_dtype=tp.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = _Progress(total, progress, f"writing {out.name}")
        for data in _tensor_bytes(plans, jobs):
            w.write_tensor_data(data)
            bar.update(data.nbytes)
            del data
        w.close()
        seconds = bar.close()
    return MakeResult(out, out.stat().st_size, seconds, len(plans))


def spec_from_args(preset: str, **overrides) -> ModelSpec:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(spec, **changes) if changes else spec

