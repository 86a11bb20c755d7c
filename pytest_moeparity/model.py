"""Qwen3-MoE models read from GGUF files.

The file is memory-mapped; tensors stay quantized until a forward asks for them, and a 3-D
expert tensor hands out one expert's contiguous byte range without touching the others.
Every problem with a file is a :class:`ModelError` whose message names the file and what is
wrong (the key, the tensor, the shape or the type).
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

ARCH = "qwen3moe"
GGUF_MAGIC = b"GGUF"


class ModelError(ValueError):
    """A model file that cannot be used, with a message naming the problem."""


def supported_qtypes() -> frozenset[GGMLQuantizationType]:
    """Types whose data :func:`gguf.quants.dequantize` can read."""
    from gguf import quants

    traits = getattr(quants, "_type_traits", {})
    return frozenset(set(traits) | {GGMLQuantizationType.F32, GGMLQuantizationType.F16})


def dequantize_raw(raw: np.ndarray, qtype: GGMLQuantizationType, dtype=np.float32) -> np.ndarray:
    """Dequantize a uint8 array whose last axis holds whole blocks."""
    from gguf import quants

    out = quants.dequantize(np.ascontiguousarray(raw), qtype)
    return out.astype(dtype, copy=False)


@dataclass(frozen=True)
class QTensor:
    """A tensor as stored in the file: raw bytes ``[..., row_nbytes]`` plus its type and shape.

    ``shape`` is in NumPy order (the reverse of GGUF's dims): ``[rows..., cols]``.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray = field(repr=False)

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @property
    def type_name(self) -> str:
        return self.qtype.name

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        return dequantize_raw(self.raw, self.qtype, dtype).reshape(self.shape)

    def dequantize_rows(self, rows, dtype=np.float32) -> np.ndarray:
        """Rows of a 2-D tensor (embedding lookup, output-projection chunks)."""
        if len(self.shape) != 2:
            raise ValueError(f"{self.name}: dequantize_rows needs a 2-D tensor, shape is {self.shape}")
        return dequantize_raw(self.raw[rows], self.qtype, dtype)

    def expert(self, e: int) -> "QTensor":
        """Expert ``e``'s 2-D slice of a 3-D ``[E, rows, cols]`` tensor (a view, nothing is read)."""
        if len(self.shape) != 3:
            raise ValueError(f"{self.name}: not a 3-D expert tensor (shape {self.shape})")
        if not 0 <= e < self.shape[0]:
            raise IndexError(f"{self.name}: expert {e} out of range 0..{self.shape[0] - 1}")
        return QTensor(f"{self.name}[{e}]", self.qtype, self.shape[1:], self.raw[e])


@dataclass(frozen=True)
class Qwen3MoeConfig:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_experts_used: int
    expert_ff: int
    vocab: int
    rope_base: float
    rms_eps: float
    context_length: int
    tied_output: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# metadata key (after the "qwen3moe." prefix) -> config field; all are required
_CONFIG_KEYS = {
    "block_count": "n_layers",
    "embedding_length": "hidden",
    "attention.head_count": "n_heads",
    "attention.head_count_kv": "n_kv_heads",
    "attention.key_length": "head_dim",
    "expert_count": "n_experts",
    "expert_used_count": "n_experts_used",
    "expert_feed_forward_length": "expert_ff",
    "context_length": "context_length",
    "rope.freq_base": "rope_base",
    "attention.layer_norm_rms_epsilon": "rms_eps",
}

# per-layer tensor name -> expected NumPy shape in config symbols
LAYER_TENSORS = {
    "attn_norm": ("H",),
    "attn_q": ("NH*HD", "H"),
    "attn_k": ("NKV*HD", "H"),
    "attn_v": ("NKV*HD", "H"),
    "attn_q_norm": ("HD",),
    "attn_k_norm": ("HD",),
    "attn_output": ("H", "NH*HD"),
    "ffn_norm": ("H",),
    "ffn_gate_inp": ("E", "H"),
    "ffn_gate_exps": ("E", "F", "H"),
    "ffn_up_exps": ("E", "F", "H"),
    "ffn_down_exps": ("E", "H", "F"),
}
MODEL_TENSORS = {
    "token_embd": ("V", "H"),
    "output_norm": ("H",),
    "output": ("V", "H"),  # optional: absent means tied to token_embd
}


def expected_shape(dims: tuple[str, ...], cfg: Qwen3MoeConfig) -> tuple[int, ...]:
    env = {"H": cfg.hidden, "NH": cfg.n_heads, "NKV": cfg.n_kv_heads, "HD": cfg.head_dim,
           "E": cfg.n_experts, "F": cfg.expert_ff, "V": cfg.vocab}
    out = []
    for d in dims:
        v = 1
        for f in d.split("*"):
            v *= env[f]
        out.append(v)
    return tuple(out)


# GGUF value type id -> (name, fixed size in bytes; None for STRING and ARRAY)
_VALUE_TYPES = {0: ("UINT8", 1), 1: ("INT8", 1), 2: ("UINT16", 2), 3: ("INT16", 2), 4: ("UINT32", 4),
                5: ("INT32", 4), 6: ("FLOAT32", 4), 7: ("BOOL", 1), 8: ("STRING", None), 9: ("ARRAY", None),
                10: ("UINT64", 8), 11: ("INT64", 8), 12: ("FLOAT64", 8)}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


def _min_value_size(vtype: int) -> int:
    """Fewest bytes one value of a type can take (a string's length field, an array's header)."""
    if vtype == _STRING:
        return 8
    if vtype == _ARRAY:
        return 4 + 8
    return _VALUE_TYPES[vtype][1]


class _HeaderWalk:
    """Walk the key/value and tensor-info sections with struct, bounding every length by the bytes
    left in the file, before GGUFReader (which walks arrays element by element and trusts every
    count: a 2**60-element array in a small file would run for minutes and eat the memory)."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 24

    def _fail(self, what: str):
        raise ModelError(f"{self.path}: corrupt GGUF header: {what}")

    def _unpack(self, fmt: str, where: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            self._fail(f"{where} runs past the end of the {self.size}-byte file (truncated)")
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out[0] if len(out) == 1 else out

    def _need(self, nbytes: int, where: str, what: str) -> None:
        left = self.size - self.pos
        if nbytes > left:
            self._fail(f"{where}: {what} needs {nbytes} bytes but only {left} are left in the "
                       f"{self.size}-byte file")

    def string(self, where: str, keep: bool = True) -> bytes | None:
        n = self._unpack("<Q", where)
        self._need(n, where, f"a string of length {n}")
        s = bytes(self.buf[self.pos:self.pos + n]) if keep else None
        self.pos += n
        return s

    def value(self, vtype: int, where: str, depth: int = 0) -> None:
        if vtype not in _VALUE_TYPES:
            self._fail(f"{where} has unknown value type {vtype}")
        if vtype == _STRING:
            self.string(where, keep=False)
        elif vtype == _ARRAY:
            if depth > 8:
                self._fail(f"{where}: arrays nested more than 8 deep")
            itype = self._unpack("<I", where)
            count = self._unpack("<Q", where)
            if itype not in _VALUE_TYPES:
                self._fail(f"{where} is an array of unknown value type {itype}")
            self._need(count * _min_value_size(itype), where,
                       f"an array of {count} {_VALUE_TYPES[itype][0]} values")
            size = _VALUE_TYPES[itype][1]
            if size is not None:
                self.pos += count * size
            else:
                for _ in range(count):
                    self.value(itype, where, depth + 1)
        else:
            self._need(_VALUE_TYPES[vtype][1], where, f"a {_VALUE_TYPES[vtype][0]} value")
            self.pos += _VALUE_TYPES[vtype][1]

    def walk(self, n_tensors: int, n_kv: int) -> None:
        for i in range(n_kv):
            raw = self.string(f"metadata key #{i}'s name")
            key = raw.decode("utf-8", "replace")
            where = f"metadata key {key!r}"
            self.value(self._unpack("<I", where), where)
        for i in range(n_tensors):
            name = self.string(f"tensor #{i}'s name").decode("utf-8", "replace")
            where = f"tensor info {name!r}"
            n_dims = self._unpack("<I", where)
            if not 1 <= n_dims <= _MAX_DIMS:
                self._fail(f"{where} has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
            self._need(n_dims * 8 + 4 + 8, where, f"{n_dims} dimensions, a type and an offset")
            self.pos += n_dims * 8 + 4 + 8


def _check_header(path: Path, size: int) -> None:
    """Sanity checks before GGUFReader touches the file (it trusts the counts and lengths)."""
    if size < 24:
        raise ModelError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as fh:
        head = fh.read(24)
        if head[:4] != GGUF_MAGIC:
            raise ModelError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
        version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
        if version not in (2, 3):
            raise ModelError(f"{path}: unsupported GGUF version {version} (2 and 3 are supported)")
        # every tensor-info record takes at least 8+1+4+8+4+8 bytes and every key/value at least 8+1+4+1
        if n_tensors * 33 > size or n_kv * 14 > size or n_tensors > 10_000_000 or n_kv > 10_000_000:
            raise ModelError(f"{path}: corrupt GGUF header: {n_tensors} tensors and {n_kv} metadata keys "
                             f"cannot fit in a {size}-byte file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _HeaderWalk(path, buf, size).walk(n_tensors, n_kv)


def _field_value(field):
    """Scalar, string or list value of a GGUF metadata field."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        return field.contents()
    return field.contents()


class GGUFModel:
    """A validated Qwen3-MoE GGUF file, tensors memory-mapped and read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise ModelError(f"{self.path}: not a regular file")
        self.file_size = self.path.stat().st_size
        _check_header(self.path, self.file_size)
        try:
            self.reader = GGUFReader(self.path, "r")
        except ModelError:
            raise
        except Exception as exc:  # gguf raises ValueError/IndexError/etc. on damaged files
            raise ModelError(f"{self.path}: cannot read GGUF structure ({type(exc).__name__}: {exc}); "
                             "the file is damaged or truncated") from None
        self.metadata = {name: f for name, f in self.reader.fields.items()}
        arch = self.get_meta("general.architecture")
        if arch != ARCH:
            raise ModelError(f"{self.path}: architecture is {arch!r}, expected {ARCH!r} (Qwen3-MoE)")
        self.config = self._read_config()
        self.tensors = self._read_tensors()

    # ---- metadata -----------------------------------------------------------------------
    def get_meta(self, key: str, default=None):
        f = self.metadata.get(key)
        if f is None:
            return default
        try:
            return _field_value(f)
        except Exception as exc:
            raise ModelError(f"{self.path}: metadata key {key!r} is unreadable ({exc})") from None

    def _read_config(self) -> Qwen3MoeConfig:
        vals = {}
        for key, attr in _CONFIG_KEYS.items():
            full = f"{ARCH}.{key}"
            v = self.get_meta(full)
            if v is None:
                raise ModelError(f"{self.path}: missing metadata key {full!r}")
            vals[attr] = v
        ints = [a for a in vals if a not in ("rope_base", "rms_eps")]
        for a in ints:
            try:
                vals[a] = int(vals[a])
            except (TypeError, ValueError):
                raise ModelError(f"{self.path}: metadata {a} = {vals[a]!r} is not an integer") from None
            if vals[a] <= 0 or vals[a] > 1 << 31:
                raise ModelError(f"{self.path}: metadata {a} = {vals[a]} is out of range")
        key_of = {attr: key for key, attr in _CONFIG_KEYS.items()}
        for a in ("rope_base", "rms_eps"):
            key = key_of[a]
            try:
                vals[a] = float(vals[a])
            except (TypeError, ValueError):
                raise ModelError(f"{self.path}: metadata key '{ARCH}.{key}' = {vals[a]!r} is not a number") from None
            if not math.isfinite(vals[a]) or vals[a] <= 0:
                raise ModelError(f"{self.path}: metadata key '{ARCH}.{key}' = {vals[a]!r} must be a finite "
                                 "positive number")
        tok_embd = self._tensor_info("token_embd.weight")
        if tok_embd is None:
            raise ModelError(f"{self.path}: missing tensor 'token_embd.weight'")
        vals["vocab"] = int(tok_embd.shape[-1])  # GGUF dims are [H, V]
        vals["tied_output"] = self._tensor_info("output.weight") is None
        cfg = Qwen3MoeConfig(**vals)
        if cfg.n_heads % cfg.n_kv_heads:
            raise ModelError(f"{self.path}: head_count {cfg.n_heads} is not a multiple of head_count_kv {cfg.n_kv_heads}")
        if cfg.n_experts_used > cfg.n_experts:
            raise ModelError(f"{self.path}: expert_used_count {cfg.n_experts_used} > expert_count {cfg.n_experts}")
        if cfg.head_dim % 2:
            raise ModelError(f"{self.path}: key_length {cfg.head_dim} must be even for RoPE")
        return cfg

    # ---- tensors ------------------------------------------------------------------------
    def _tensor_info(self, name):
        for t in self.reader.tensors:
            if t.name == name:
                return t
        return None

    def _read_tensors(self) -> dict[str, QTensor]:
        cfg = self.config
        supported = supported_qtypes()
        by_name = {t.name: t for t in self.reader.tensors}
        wanted = {f"{n}.weight": dims for n, dims in MODEL_TENSORS.items()}
        for layer in range(cfg.n_layers):
            for n, dims in LAYER_TENSORS.items():
                wanted[f"blk.{layer}.{n}.weight"] = dims
        out = {}
        for name, dims in wanted.items():
            t = by_name.get(name)
            if t is None:
                if name == "output.weight":
                    continue
                raise ModelError(f"{self.path}: missing tensor {name!r}")
            qtype = GGMLQuantizationType(int(t.tensor_type)) if int(t.tensor_type) in GGMLQuantizationType._value2member_map_ else None
            if qtype is None or qtype not in supported:
                raise ModelError(f"{self.path}: tensor {name!r} has unsupported type "
                                 f"{getattr(qtype, 'name', int(t.tensor_type))}")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            want = expected_shape(dims, cfg)
            if shape != want:
                raise ModelError(f"{self.path}: tensor {name!r} has shape {list(shape)}, expected "
                                 f"{list(want)} ({' x '.join(dims)})")
            block, tsize = GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise ModelError(f"{self.path}: tensor {name!r} row length {shape[-1]} is not a multiple "
                                 f"of the {qtype.name} block size {block}")
            row_nbytes = shape[-1] // block * tsize
            nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_nbytes
            end = int(t.data_offset) + nbytes
            if end > self.file_size:
                raise ModelError(f"{self.path}: tensor {name!r} needs bytes up to {end} but the file has "
                                 f"{self.file_size}: the file is truncated")
            raw = self.reader.data[int(t.data_offset):end].view(np.uint8).reshape(*shape[:-1], row_nbytes)
            out[name] = QTensor(name, qtype, shape, raw)
        return out

    def tensor(self, name: str) -> QTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"{self.path}: no tensor {name!r}") from None

    def layer(self, layer: int, name: str) -> QTensor:
        return self.tensor(f"blk.{layer}.{name}.weight")

    @property
    def output(self) -> QTensor:
        """The output projection (``token_embd`` when tied)."""
        return self.tensors.get("output.weight") or self.tensors["token_embd.weight"]

    def type_census(self) -> dict[str, int]:
        """Bytes per quant type over the model's tensors."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.type_name] = out.get(t.type_name, 0) + t.nbytes
        return out

    def describe(self) -> str:
        c = self.config
        census = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(self.type_census().items()))
        return (f"{self.path.name}: qwen3moe, {c.n_layers} layers, hidden {c.hidden}, heads {c.n_heads}/{c.n_kv_heads}"
                f"x{c.head_dim}, experts {c.n_experts} (top-{c.n_experts_used}, ffn {c.expert_ff}), vocab {c.vocab}"
                f"{', tied output' if c.tied_output else ''}; {self.file_size / 2**20:.1f} MiB [{census}]")

    def validate_tokens(self, tokens) -> list[int]:
        toks = [int(t) for t in tokens]
        if not toks:
            raise ModelError("empty token list: give at least one token id")
        bad = [t for t in toks if not 0 <= t < self.config.vocab]
        if bad:
            raise ModelError(f"token ids {bad} out of range: the vocabulary has {self.config.vocab} tokens (0..{self.config.vocab - 1})")
        return toks


_CACHE: dict[tuple, GGUFModel] = {}


def load_model(path: str | os.PathLike) -> GGUFModel:
    """Open (and cache per process, keyed by path, size and mtime) a Qwen3-MoE GGUF file."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = GGUFModel(p)
    return _CACHE[key]
