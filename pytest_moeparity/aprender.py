"""aprender-style tensor dumps: read them as a :class:`~.trace.Trace`, and write them.

aprender (``apr trace --save-tensor STAGES --save-tensor-layers 0..48 --save-tensor-dir DIR``)
writes one raw file per captured tensor, for the **last token only**::

    DIR/layer-<N>/<stage>.bin              per-layer stages
    DIR/layer-4294967295/<stage>.bin       whole-model stages (embedding, final_norm, lm_head),
    DIR/<stage>.bin                        ... or at the top level

Each file: 4 bytes ``APRT``, u32 layer (``0xFFFFFFFF`` for whole-model stages), u32 element
count, then that many float32, all little-endian. This module's extension for per-expert stages
(aprender planned but never built them): ``DIR/layer-<N>/expert-<E>/<stage>.bin``.

Reading (:func:`read_dump`): stage names are matched case-insensitively (``MoeFfnOut`` and
``moe_ffn_out`` alike) against the stage contract and its aliases (``layer_output`` ->
``post_ffn_residual``); aprender's fused ``qkv_matmul`` is split into ``q_proj``/``k_proj``/
``v_proj`` when the sizes tell (from a model config or the sizes of another trace);
``moe_router_indices`` is cast to integers. Stage names outside the contract (``qkv_bias``,
``ffn_gate``, ...) are kept under their own key, listed in ``meta["unknown_stages"]`` and shown
by the comparison as ignored keys: never silently dropped. Every tensor is ``[1, count]``
and the trace's meta has ``layout=flat`` (the comparison then flattens both sides per position)
and ``positions`` = the dumped position when the caller knows it (``tokens``/``position``).

Writing (:func:`write_dump`) takes one position (default the last) of a trace; ``fuse_qkv``
writes aprender's ``qkv_matmul`` instead of the three projections. Damaged files raise
:class:`DumpError` naming the file and the problem (bad magic, count mismatch, short file,
layer header not matching its directory).
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from .contract import S, parse_key, stage_contract, trace_key
from .trace import Trace

MAGIC = b"APRT"
MODEL_LAYER = 0xFFFFFFFF
HEADER = struct.Struct("<4sII")
_LAYER_DIR = re.compile(r"^layer-(\d+)$")
_EXPERT_DIR = re.compile(r"^expert-(\d+)$")
QKV = (S.q_proj, S.k_proj, S.v_proj)

__all__ = ["DumpError", "read_bin", "write_bin", "read_dump", "write_dump", "is_dump_dir", "canonical_stage"]


class DumpError(ValueError):
    """A dump file or directory that cannot be read, with a message naming the file and the problem."""


# ---- one file ---------------------------------------------------------------------------------
def write_bin(path: str | os.PathLike, layer: int | None, values) -> Path:
    """One ``APRT`` file: header then float32 little-endian (``layer=None`` -> 0xFFFFFFFF)."""
    path = Path(path)
    data = np.ascontiguousarray(np.asarray(values, dtype="<f4").ravel())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(HEADER.pack(MAGIC, MODEL_LAYER if layer is None else int(layer), int(data.size)))
        fh.write(data.tobytes())
    os.replace(tmp, path)
    return path


def read_bin(path: str | os.PathLike) -> tuple[int | None, np.ndarray]:
    """``(layer or None, float32 values)`` of one ``APRT`` file."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < HEADER.size:
        raise DumpError(f"{path}: too short for an APRT header ({len(raw)} bytes, need {HEADER.size})")
    magic, layer, count = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DumpError(f"{path}: bad magic {magic!r}, expected {MAGIC!r} (not an aprender tensor dump)")
    have = len(raw) - HEADER.size
    if have != 4 * count:
        raise DumpError(f"{path}: count mismatch: the header says {count} float32 ({4 * count} bytes) but the "
                        f"file holds {have} bytes of data")
    vals = np.frombuffer(raw, dtype="<f4", offset=HEADER.size, count=count).astype(np.float32)
    return (None if layer == MODEL_LAYER else int(layer)), vals


# ---- names ------------------------------------------------------------------------------------
def _snake(name: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name)
    return s.replace("-", "_").lower()


def canonical_stage(name: str) -> str | None:
    """The contract stage for an aprender stage name, ``"qkv_matmul"`` for the fused projection,
    or None when the name is not in the contract."""
    n = _snake(name)
    contract = stage_contract()
    if n in contract.by_name:
        return n
    if n == "qkv_matmul":
        return n
    targets = contract.aliases.get(n)
    if targets and len(targets) == 1:
        return targets[0]
    return None


def _qkv_sizes(config=None, sizes: dict | None = None) -> tuple[int, int, int] | None:
    if sizes and all(s in sizes for s in QKV):
        return tuple(int(sizes[s]) for s in QKV)
    if config is not None:
        q = config.n_heads * config.head_dim
        kv = config.n_kv_heads * config.head_dim
        return q, kv, kv
    return None


def stage_sizes(trace: Trace) -> dict[str, int]:
    """Per-position element count of each stage in a trace (to split a fused qkv_matmul)."""
    out = {}
    for key, val in trace.tensors.items():
        try:
            stage, _, _ = parse_key(key)
        except ValueError:
            continue
        arr = np.asarray(val)
        out.setdefault(stage, int(np.prod(arr.shape[1:])) if arr.ndim > 1 else int(arr.size))
    return out


# ---- a directory ------------------------------------------------------------------------------
def is_dump_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir()


def _files(root: Path):
    """(path, layer from the directory or None, expert or None, in_layer_dir)."""
    for entry in sorted(root.iterdir()):
        if entry.is_file() and entry.suffix == ".bin":
            yield entry, None, None, False
        elif entry.is_dir():
            m = _LAYER_DIR.match(entry.name)
            if not m:
                yield entry, None, None, None  # reported as unrecognised
                continue
            layer = int(m.group(1))
            layer = None if layer == MODEL_LAYER else layer
            for f in sorted(entry.iterdir()):
                if f.is_file() and f.suffix == ".bin":
                    yield f, layer, None, True
                elif f.is_dir() and _EXPERT_DIR.match(f.name) and layer is not None:
                    e = int(_EXPERT_DIR.match(f.name).group(1))
                    for g in sorted(f.iterdir()):
                        if g.is_file() and g.suffix == ".bin":
                            yield g, layer, e, True
                elif f.is_dir():
                    yield f, None, None, None


def read_dump(path: str | os.PathLike, *, tokens=None, position: int | None = None, n_tokens: int | None = None,
              config=None, sizes: dict | None = None) -> Trace:
    """Read a dump directory as a flat trace (see the module docstring).

    ``tokens`` (the prompt) or ``n_tokens`` tell which position the dump holds (the last one);
    ``position`` says it directly (negative counts from the end, needs ``tokens``/``n_tokens``).
    ``config`` (a model config) or ``sizes`` (``{stage: per-position size}``, e.g.
    :func:`stage_sizes` of a reference trace) let a fused ``qkv_matmul`` be split.
    """
    root = Path(path)
    if not root.exists():
        raise DumpError(f"{root}: no such dump directory")
    if not root.is_dir():
        raise DumpError(f"{root}: not a directory (an aprender dump is a directory of layer-<N>/<stage>.bin)")
    tensors: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    warnings: list[str] = []
    split = _qkv_sizes(config, sizes)
    for f, dir_layer, expert, in_layer_dir in _files(root):
        if in_layer_dir is None:
            warnings.append(f"unrecognised entry {f.relative_to(root)} (expected layer-<N>/ or <stage>.bin)")
            continue
        header_layer, vals = read_bin(f)
        if in_layer_dir and header_layer != dir_layer:
            raise DumpError(f"{f}: header layer {MODEL_LAYER if header_layer is None else header_layer} does not "
                            f"match its directory {f.parent.name if expert is None else f.parent.parent.name}")
        layer = header_layer
        name = f.stem
        stage = canonical_stage(name)
        if stage is None:
            unknown.append(name)
            tensors[_raw_key(_snake(name), layer, expert)] = vals.reshape(1, -1)
            continue
        if stage == "qkv_matmul":
            if split is not None and sum(split) == vals.size and layer is not None:
                q, k, _ = split
                for st, part in zip(QKV, (vals[:q], vals[q:q + k], vals[q + k:])):
                    tensors[trace_key(st, layer)] = part.reshape(1, -1)
                continue
            why = "no sizes known (give a model config or a reference trace)" if split is None else \
                f"{vals.size} values do not add up to q+k+v = {sum(split)}"
            warnings.append(f"{f.relative_to(root)}: fused qkv_matmul not split: {why}")
            unknown.append(name)
            tensors[_raw_key("qkv_matmul", layer, expert)] = vals.reshape(1, -1)
            continue
        if stage == S.moe_router_indices:
            if not np.all(np.isfinite(vals)) or not np.array_equal(vals, np.round(vals)):
                raise DumpError(f"{f}: moe_router_indices holds non-integer values")
            vals = vals.astype(np.int32)
        key = _raw_key(stage, layer, expert)
        if key in tensors:
            warnings.append(f"{f.relative_to(root)}: {key} given twice; the later file wins")
        tensors[key] = vals.reshape(1, -1)
    if not tensors:
        raise DumpError(f"{root}: no .bin tensor files found (expected layer-<N>/<stage>.bin)")
    meta = {"layout": "flat", "format": "aprender", "source": str(root), "backend": f"dump:{root.name}",
            "unknown_stages": json.dumps(sorted(set(unknown))), "dump_warnings": json.dumps(warnings)}
    if tokens is not None:
        meta["tokens"] = json.dumps([int(t) for t in tokens])
        n_tokens = len(tokens)
    pos = _position(position, n_tokens)
    if pos is not None:
        meta["positions"] = json.dumps([pos])
    return Trace(tensors, meta)


def _raw_key(stage: str, layer: int | None, expert: int | None) -> str:
    return trace_key(stage, layer, expert)


def _position(position: int | None, n_tokens: int | None) -> int | None:
    if position is None:
        return None if n_tokens is None else n_tokens - 1
    if position < 0:
        if n_tokens is None:
            raise DumpError(f"position {position} counts from the end: give the prompt (tokens) too")
        position += n_tokens
    if position < 0 or (n_tokens is not None and position >= n_tokens):
        raise DumpError(f"position {position} out of range for {n_tokens} tokens")
    return position


def write_dump(trace: Trace, path: str | os.PathLike, *, position: int | None = None, fuse_qkv: bool = False,
               model_stages_at_top: bool = False) -> list[Path]:
    """Write one position of ``trace`` (a token position; default the trace's last) as a dump
    directory. Returns the files written. ``fuse_qkv`` writes aprender's fused ``qkv_matmul``
    where all three projections of a layer are present; ``model_stages_at_top`` puts the
    whole-model stages at the top level instead of ``layer-4294967295/``."""
    root = Path(path)
    positions = trace.positions
    if position is None:
        row = -1
    elif positions:
        if position not in positions:
            raise DumpError(f"the trace holds positions {positions}, not {position}")
        row = positions.index(position)
    else:
        row = position
    written = []
    fused_layers = set()
    keys = list(trace.keys())
    if fuse_qkv:
        layers = {parse_key(k)[1] for k in keys if parse_key(k)[0] in QKV}
        for L in layers:
            if L is not None and all(trace_key(s, L) in trace for s in QKV):
                vals = np.concatenate([np.asarray(trace[trace_key(s, L)])[row].ravel() for s in QKV])
                written.append(write_bin(root / f"layer-{L}" / "qkv_matmul.bin", L, vals))
                fused_layers.add(L)
    for key in keys:
        stage, layer, expert = parse_key(key)
        if stage in QKV and layer in fused_layers:
            continue
        vals = np.asarray(trace[key])[row]
        if layer is None:
            f = (root / f"{stage}.bin") if model_stages_at_top else (root / f"layer-{MODEL_LAYER}" / f"{stage}.bin")
        elif expert is None:
            f = root / f"layer-{layer}" / f"{stage}.bin"
        else:
            f = root / f"layer-{layer}" / f"expert-{expert}" / f"{stage}.bin"
        written.append(write_bin(f, layer, vals))
    return written
