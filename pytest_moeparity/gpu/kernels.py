"""Host side of the CUDA kernels in ``kernels.cu``: compilation, launch checks and the products
of float32 activations with quantized weights (dense and grouped by expert).

Nothing here imports CuPy at import time. :func:`get_backend` compiles ``kernels.cu`` once per
process with ``cupy.RawModule`` (NVRTC, C++17) the first time a kernel is needed. A *backend*
is the pair (array module, kernel launcher): the real one is CuPy on a CUDA device; the
emulator (:mod:`.emulator`) runs the same ``kernels.cu`` on the CPU with NumPy arrays and is
used to test this code on machines without a GPU.

Dispatch is by each tensor's own quant type: :data:`KERNEL_QTYPES` maps a
``GGMLQuantizationType`` to the template instance (``qmm_dense<QT, NT>``); a type without a
kernel is an error here (the weight loader turns such tensors into F32 on the host first).

Every launch checks its arguments against the kernel's C signature (parsed from
``kernels.cu``): array dtypes, contiguity and the exact width of every scalar. In debug mode
(:func:`set_debug`, or the environment variable ``MOEPARITY_GPU_DEBUG=1``) every launch is
followed by a device synchronisation, so an asynchronous fault is reported by the kernel that
caused it.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

KERNELS_CU = Path(__file__).with_name("kernels.cu")

# GGML type -> template argument QT of the kernels (the GGML type id itself).
KERNEL_QTYPES: dict[Q, int] = {
    Q.F32: 0, Q.F16: 1, Q.Q4_0: 2, Q.Q8_0: 8, Q.Q4_K: 12, Q.Q5_K: 13, Q.Q6_K: 14, Q.BF16: 30,
}
# extra NVRTC options for kernel tuning runs, e.g. MOEPARITY_NVRTC_OPTIONS="-DMP_MIN_BLOCKS=8"; the
# emulator compiles with its -D options too, and -DMP_WARPS / -DMP_ROWS set the launch geometry below
NVRTC_OPTIONS_ENV = "MOEPARITY_NVRTC_OPTIONS"


_PY_TUNING: set[str] = set()  # the switches kernels.py itself reads (at import: launch geometry, paths)


def _tuning_define(name: str, default: int) -> int:
    _PY_TUNING.add(name)
    for opt in os.environ.get(NVRTC_OPTIONS_ENV, "").split():
        if opt.startswith(f"-D{name}="):
            return int(opt.split("=", 1)[1])
    return default


WARPS = _tuning_define("MP_WARPS", 4)  # MP_WARPS in kernels.cu: warps per block of the matmul and row kernels
ROWS = _tuning_define("MP_ROWS", 2)    # MP_ROWS in kernels.cu: weight rows per warp of the 1-token tile
ROWS_NT4 = _tuning_define("MP_ROWS_NT4", 4)  # MP_ROWS_NT4: of the 4-token tile (prompts of 2-4 tokens)
ROWS_NT8 = _tuning_define("MP_ROWS_NT8", 4)  # MP_ROWS_NT8: of the 8-token tile (longer prompts)
THREADS = WARPS * 32      # block size of the matmul and row kernels
TILE_TOKENS = 8           # activation rows per warp in the batched kernels (NT)
TOKEN_TILES = (1, 4, TILE_TOKENS)  # the NT instances: the smallest one holding T rows (or pairs) is used
MAX_EXPERTS = 512         # expert_group: MP_MAX_EXPERTS in kernels.cu (a shared-memory counter per expert)
MAX_ROUTER_EXPERTS = 2048  # router_topk: a 64-bit taken-mask per lane
ELEMENTWISE_THREADS = 256
MAX_ELEMENTWISE_BLOCKS = 8192

# kernels whose threads meet at warp reductions or block barriers (the emulator runs them as coroutines)
WARP_KERNELS = ("qmm_dense", "qmm_dense_splitk", "qmm_dense_mma", "qmm_experts", "qmm_experts_mma", "act_digits", "expert_group", "router_topk", "rms_norm",
                "softmax_rows", "attention_core", "qk_norm_rope", "moe_route", "add_rms_norm", "norm_digits", "swiglu_digits",
                "norm_rope_attention", "combine_norm_digits")
SPLITK_TILES = (1, 4)     # the token tiles with a split-K dense instance (prompts of up to 4 tokens)
# split K only while the plain kernel's grid is small: a large matrix (the output head's 152k rows) already
# fills the GPU, and splitting it only adds the blocks' shared-memory step
SPLITK_MAX_GROUPS = _tuning_define("MP_SPLITK_MAX_GROUPS", 2048)
# Q4_K and Q6_K products of prompts of 2 or more tokens on the tensor cores (qmm_experts_mma, qmm_dense_mma:
# int8 mma over exact integer digits of the activations, written once per activation row by act_digits or by
# the kernel writing the row; compute capability 8.0 or later). MP_MMA=0 keeps them on qmm_experts / qmm_dense(_splitk),
# MP_MMA_Q6K=0 keeps only Q6_K there (tuning switches).
MMA = _tuning_define("MP_MMA", 1)
MMA_ROWS = 16             # weight rows per warp of the mma kernels
DIGITS_THREADS = 256      # act_digits: threads per row (MP_DIGITS_THREADS)
DIGITS_SLAB = 8192        # act_digits holds this many columns of a row in registers (MP_DIGITS_GROUPS): a
                          # wider row is read twice
# norm_digits / swiglu_digits (the row kernels that write their output's digits too, a block per row): rows
# of up to this many columns (MP_ROW_BLOCK_COLS); wider ones take the kernel and act_digits after it
ROW_BLOCK_COLS = 2048
# the forward has the norms and SwiGLU write the digits of the tensor-core products' inputs, saving
# act_digits' launches; MP_FUSE_DIGITS=0 leaves them to act_digits in the products (tuning switch)
FUSE_DIGITS = _tuning_define("MP_FUSE_DIGITS", 1)
# norm_rope_attention (q/k norms + RoPE, attention and the context's digits, a block per token and kv head):
# its sizes
ATTN_THREADS = 512        # MP_ATTN_THREADS: threads per block (a warp per head row)
ATTN_HEAD_DIM = 256       # 32 MP_ATTN_NORM_REGS: the longest head row
ATTN_COLS = 4096          # MP_ATTN_COLS: the most q columns of a token (heads x head_dim)
ATTN_KV = 4096            # MP_ATTN_KV: the most k values of one kv head (tokens x head_dim), in shared memory
ATTN_MAX_T = 32           # MP_ATTN_MAX_T: the most tokens (a warp's scores and probabilities in shared memory)
QK_NORM_MAX_HEAD_DIM = 2048  # qk_norm_rope: 32 MP_RMS_REGS (a head row in a warp's registers)
MMA_DENSE_WARPS = 8       # the most warps per block of qmm_dense_mma (MP_MMA_DENSE_WARPS)
DENSE_PASS8_WARPS = 4     # the most of qmm_dense_mma<QT,3> (MP_DENSE_PASS8_WARPS)
# past 4 tokens qmm_dense_mma<QT,1> spreads a prompt's passes of 4 tokens over gridDim.y until the grid has
# about this many blocks (dense_mma_pass_groups; 0: every block takes all the passes, as before)
DENSE_LONG_BLOCKS = _tuning_define("MP_DENSE_LONG_BLOCKS", 2048)
# super-blocks each warp of a qmm_dense_mma block walks: warps = K / 256 / this, from 1 to MMA_DENSE_WARPS
MMA_DENSE_SBS = _tuning_define("MP_MMA_DENSE_SBS", 2)
MMA_Q6K = _tuning_define("MP_MMA_Q6K", 1)
MMA_QTYPES = (KERNEL_QTYPES[Q.Q4_K], KERNEL_QTYPES[Q.Q6_K])  # the instances compiled
MMA_ON_QTYPES = MMA_QTYPES if MMA_Q6K else MMA_QTYPES[:1]    # the types use_mma sends there
# qmm_experts_mma stages a warp's 16 weight rows in shared memory where they fit this many bytes
# (MP_Q6_STAGE): Q6_K always (<14>), Q4_K in its own instance <12,1> (the 30b-a3b down projection's 432-byte
# rows) unless MP_STAGE_Q4_EXPERTS is 0; <12> (gate / up's 1152-byte rows) keeps no shared memory, so L1
# keeps its whole share
EXPERT_STAGE_BYTES = 10240
RECORD_INTS = 8  # MP_REC: ints per expert record of ExpertRouting.records
STAGE_Q4_EXPERTS = _tuning_define("MP_STAGE_Q4_EXPERTS", 1)
# qmm_experts_mma reads a routing written two or more launches back before its programmatic-launch wait
# (MP_EXPERTS_EARLY=0: always after it; tuning switch)
EXPERTS_EARLY = _tuning_define("MP_EXPERTS_EARLY", 1)
# the longest prompt whose Q4_K / Q6_K products take the tensor cores (no limit by default). Both kernels
# take the tokens (the experts' pairs) in passes of 4 over the same weight rows, so any length runs there
# (qmm_dense_mma<QT,1> past 4 tokens). H100, 4-layer 30b-a3b, 64 tokens: 3.33 ms against the float kernels'
# 6.61 (benchmarks/NOTES.md step 42); MP_MMA_MAX_TOKENS=4 keeps longer prompts on the float kernels
MMA_MAX_TOKENS = _tuning_define("MP_MMA_MAX_TOKENS", 1 << 30)
# from this many tokens on: a single token's products are as fast on qmm_experts, and act_digits' extra
# launch then costs more than the tensor cores save (H100, 4-layer 30b-a3b: 0.378 vs 0.363 ms a forward)
MMA_MIN_TOKENS = _tuning_define("MP_MMA_MIN_TOKENS", 2)

NAME_EXPRESSIONS: tuple[str, ...] = tuple(
    [f"qmm_dense<{q},{nt}>" for q in sorted(KERNEL_QTYPES.values()) for nt in TOKEN_TILES]
    + [f"qmm_dense_splitk<{q},{nt}>" for q in sorted(KERNEL_QTYPES.values()) for nt in SPLITK_TILES]
    + [f"qmm_experts<{q},{nt}>" for q in sorted(KERNEL_QTYPES.values()) for nt in TOKEN_TILES]
    + [f"qmm_experts_mma<{q}>" for q in MMA_QTYPES] + [f"qmm_experts_mma<{KERNEL_QTYPES[Q.Q4_K]},1>"]
    + [f"qmm_experts_mma<{KERNEL_QTYPES[Q.Q4_K]},{st},1>" for st in (0, 1)] + [f"qmm_experts_mma<{KERNEL_QTYPES[Q.Q6_K]},1,1>"]
    + [f"qmm_dense_mma<{q}>" for q in MMA_QTYPES] + [f"qmm_dense_mma<{q},{long}>" for q in MMA_QTYPES for long in (1, 2, 3)]
    + ["act_digits", "norm_digits", "swiglu_digits", "norm_rope_attention", "combine_norm_digits", "expert_group", "router_topk", "moe_route", "moe_combine", "round_bf16", "rms_norm", "add_rms_norm", "softmax_rows", "attention_core",
       "qk_norm_rope", "rope_neox", "swiglu", "add_f32"])

COMPILE_OPTIONS = ("-std=c++17",)


def compile_options() -> tuple[str, ...]:
    return COMPILE_OPTIONS + tuple(os.environ.get(NVRTC_OPTIONS_ENV, "").split())


_DEFINE_RE = re.compile(r"-D([A-Za-z_]\w*)(?:=(\S+))?")


def variant_options(options: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``options`` (a string or a sequence) checked as the extra switches of a backend variant
    (:meth:`Backend.variant`): each a ``-DNAME=VALUE`` of a switch kernels.cu declares under
    ``#ifndef NAME`` and kernels.py does not read at import (those set launch geometry then, so only a
    process of their own, through MOEPARITY_NVRTC_OPTIONS, can change them; what it reads through
    :meth:`Backend.switch` follows the variant)."""
    opts = tuple(options.split()) if isinstance(options, str) else tuple(options)
    switches = set(re.findall(r"^#ifndef\s+(MP_\w+)", kernel_source(), re.M))
    for opt in opts:
        m = _DEFINE_RE.fullmatch(opt)
        if not m:
            raise ValueError(f"variant option {opt!r}: only -DNAME=VALUE switches of {KERNELS_CU.name} are allowed")
        name = m.group(1)
        if name in _PY_TUNING:
            raise ValueError(f"variant option {opt!r}: kernels.py reads {name} at import (launch geometry), so a "
                             f"variant in the same process cannot change it; set it in {NVRTC_OPTIONS_ENV} for a "
                             f"process of its own")
        if name not in switches:
            raise ValueError(f"variant option {opt!r}: {KERNELS_CU.name} has no switch {name} (an #ifndef {name} "
                             f"default); known: {', '.join(sorted(switches - _PY_TUNING))}")
    return opts


class KernelError(RuntimeError):
    """A kernel launch failed or was given arguments that do not fit its signature."""


# ---- debug switch -------------------------------------------------------------------------------
_DEBUG = os.environ.get("MOEPARITY_GPU_DEBUG", "") not in ("", "0")


def set_debug(flag: bool) -> bool:
    """Synchronise and check for errors after every launch (tests turn this on). Returns the old value."""
    global _DEBUG
    old, _DEBUG = _DEBUG, bool(flag)
    return old


def debug_enabled() -> bool:
    return _DEBUG


# ---- kernel signatures (parsed from kernels.cu) ---------------------------------------------------
@dataclass(frozen=True)
class Param:
    name: str
    ctype: str
    pointer: bool
    const: bool
    dtype: np.dtype  # pointee dtype for pointers, value dtype for scalars


_CTYPES = {"mp_u8": np.uint8, "mp_u32": np.uint32, "float": np.float32, "int": np.int32, "mp_i64": np.int64}
_SIG_RE = re.compile(r"MP_(?:MATMUL_|MMA_|MMA_DENSE_|ATTN_|ATTN_CORE_)?GLOBAL(?:_\w+\(\w+\))?\s+void\s+(\w+)\s*\(([^)]*)\)",
                     re.S)


def _parse_param(text: str) -> Param:
    t = " ".join(text.replace("__restrict__", " ").split())
    m = re.fullmatch(r"(const\s+)?(\w+)\s*(\*)?\s*(\w+)", t)
    if not m or m.group(2) not in _CTYPES:
        raise KernelError(f"kernels.cu: cannot parse kernel parameter {text!r}")
    ctype = ("const " if m.group(1) else "") + m.group(2) + ("*" if m.group(3) else "")
    return Param(m.group(4), ctype, bool(m.group(3)), bool(m.group(1)), np.dtype(_CTYPES[m.group(2)]))


def parse_signatures(source: str) -> dict[str, tuple[Param, ...]]:
    """Kernel name (without template arguments) -> parameters, from the ``MP_GLOBAL`` definitions."""
    out = {}
    for name, params in _SIG_RE.findall(source):
        out[name] = tuple(_parse_param(p) for p in params.split(",") if p.strip())
    return out


_SOURCE: str | None = None
_SIGNATURES: dict[str, tuple[Param, ...]] | None = None


def kernel_source() -> str:
    global _SOURCE
    if _SOURCE is None:
        _SOURCE = KERNELS_CU.read_text(encoding="utf-8")
    return _SOURCE


def signatures() -> dict[str, tuple[Param, ...]]:
    global _SIGNATURES
    if _SIGNATURES is None:
        _SIGNATURES = parse_signatures(kernel_source())
    return _SIGNATURES


def check_args(name: str, args: tuple, is_array) -> None:
    """Raise :class:`KernelError` unless ``args`` fit kernel ``name``'s C signature exactly."""
    base = name.split("<", 1)[0]
    sig = signatures().get(base)
    if sig is None:
        raise KernelError(f"unknown kernel {name!r}")
    if len(args) != len(sig):
        raise KernelError(f"{name}: {len(args)} arguments given, the kernel takes {len(sig)}")
    for i, (p, a) in enumerate(zip(sig, args)):
        if p.pointer:
            if not is_array(a):
                raise KernelError(f"{name}: argument {i} ({p.ctype}) must be a device array, got {type(a).__name__}")
            if a.dtype != p.dtype:
                raise KernelError(f"{name}: argument {i} ({p.ctype}) must have dtype {p.dtype}, got {a.dtype}")
            if not a.flags.c_contiguous:
                raise KernelError(f"{name}: argument {i} ({p.ctype}) must be C-contiguous")
        else:
            if not isinstance(a, np.generic) or a.dtype != p.dtype:
                raise KernelError(f"{name}: argument {i} ({p.ctype} {p.name}) must be a numpy {p.dtype} scalar, "
                                  f"got {type(a).__name__} {getattr(a, 'dtype', '')}")


# ---- backends -------------------------------------------------------------------------------------
class Backend:
    """Array module + kernel launcher. Subclasses: :class:`CupyBackend`, ``emulator.EmulatorBackend``."""

    name = "abstract"
    xp: Any = None
    mma = False  # the device runs mma.sync (compute capability 8.0 or later): qmm_experts_mma
    oom_errors: tuple[type[BaseException], ...] = (MemoryError,)
    extra_options: tuple[str, ...] = ()  # switches of this backend's kernels beyond compile_options()

    @property
    def weights_owner(self) -> "Backend":
        """The backend whose device weights this one uses (itself, or the backend it is a variant of)."""
        return self.__dict__.get("_weights_owner", self)

    def variant(self, options: str | tuple[str, ...]) -> "Backend":
        """A backend of the same device whose kernels are compiled with ``options`` (kernels.cu switches,
        checked by :func:`variant_options`) added to this one's. It shares this backend's device weights
        (one upload of a model serves both), so a script can time the two kernel builds against each
        other in one process (``benchmarks/bench_ab.py``)."""
        v = self._with_options(self.extra_options + variant_options(options))
        v._weights_owner = self.weights_owner
        return v

    def _with_options(self, extra_options: tuple[str, ...]) -> "Backend":
        raise NotImplementedError(f"{type(self).__name__} has no variants")

    def switch(self, name: str) -> int:
        """The integer value of kernels.cu switch ``name`` in this backend's kernels: its last ``-Dname=``
        among compile_options() and this backend's own options, else kernels.cu's ``#ifndef`` default. For
        the switches both sides read (MP_EXPERT_CHUNK: the device splits, the host sizes the records).
        Looked up once a backend and name (launches ask for it)."""
        cache = self.__dict__.setdefault("_switches", {})
        if name in cache:
            return cache[name]
        value = None
        for opt in compile_options() + tuple(self.extra_options):
            m = _DEFINE_RE.fullmatch(opt)
            if m and m.group(1) == name:
                value = m.group(2) or "1"
        if value is None:
            m = re.search(rf"^#ifndef\s+{name}\s*\n#define\s+{name}\s+(\S+)", kernel_source(), re.M)
            if not m:
                raise KernelError(f"{KERNELS_CU.name} has no switch {name} with a default")
            value = m.group(1)
        cache[name] = int(value, 0)
        return cache[name]

    def launch(self, name: str, grid: tuple, block: tuple, args: tuple) -> None:
        raise NotImplementedError

    def stream_key(self) -> int:
        """The stream the next launch goes to (launches are ordered per stream)."""
        return 0

    def launch_mark(self) -> tuple[int, int]:
        """(stream, launches made on it through this backend so far): where a kernel's output was written,
        so that a later launch knows how far back that was (see :func:`_written_two_back`)."""
        key = self.stream_key()
        return key, self.__dict__.setdefault("_launch_counts", {}).get(key, 0)

    def _count_launch(self) -> None:
        """Subclasses call it after each launch."""
        counts, key = self.__dict__.setdefault("_launch_counts", {}), self.stream_key()
        counts[key] = counts.get(key, 0) + 1

    def is_array(self, a) -> bool:
        return isinstance(a, self.xp.ndarray)

    def asnumpy(self, a) -> np.ndarray:
        raise NotImplementedError

    def to_device(self, host: np.ndarray):
        raise NotImplementedError

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes usable for new allocations (memory cached by the pool counts as free)."""
        raise NotImplementedError

    def release_cached_memory(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self, extra_options: tuple[str, ...] = ()):
        import cupy

        self.cupy = cupy
        self.xp = cupy
        self.oom_errors = (cupy.cuda.memory.OutOfMemoryError,)
        self.extra_options = tuple(extra_options)
        self.module = cupy.RawModule(code=kernel_source(), options=compile_options() + self.extra_options,
                                     name_expressions=list(NAME_EXPRESSIONS))
        try:
            self.module.compile()
        except Exception as exc:
            raise KernelError(f"compiling {KERNELS_CU.name} with NVRTC failed: {type(exc).__name__}: {exc}") from exc
        self._functions: dict[str, Any] = {}
        from .pdl import pdl_launcher

        cc = int(cupy.cuda.Device().compute_capability)
        self.mma = cc >= 80
        # programmatic dependent launch (pdl.py); `pdl_off` says why not where it is not used
        self._pdl, self.pdl_off = pdl_launcher(cc)
        self._pdl_ptrs: dict[str, int] = {}

    def _with_options(self, extra_options):
        v = CupyBackend(extra_options)
        v.set_pdl(self.pdl)  # the same launch mode as the backend it varies
        return v

    @property
    def pdl(self) -> bool:
        """Whether kernels are launched with programmatic dependent launch."""
        return self._pdl is not None

    def set_pdl(self, on: bool) -> bool:
        """Turn programmatic dependent launch off (or back on where available); returns the old state.
        The results do not depend on it (tests compare the two)."""
        from .pdl import pdl_launcher

        old = self.pdl
        if on and self._pdl is None:
            self._pdl, self.pdl_off = pdl_launcher(int(self.cupy.cuda.Device().compute_capability))
        elif not on:
            self._pdl, self.pdl_off = None, "turned off (set_pdl)"
        return old

    def function(self, name: str):
        f = self._functions.get(name)
        if f is None:
            if name not in NAME_EXPRESSIONS:
                raise KernelError(f"kernel {name!r} is not among the compiled name expressions")
            f = self._functions[name] = self.module.get_function(name)
        return f

    def launch(self, name, grid, block, args):
        check_args(name, args, self.is_array)
        f = self.function(name)
        try:
            if self._pdl is not None:
                ptr = self._pdl_ptrs.get(name)
                if ptr is None:
                    ptr = self._pdl_ptrs[name] = int(getattr(f, "kernel", f).ptr)
                self._pdl.launch(ptr, grid, block, self.cupy.cuda.get_current_stream().ptr, args)
            else:
                f(tuple(int(g) for g in grid), tuple(int(b) for b in block), args)
        except Exception as exc:
            raise KernelError(f"launching {name} grid={tuple(grid)} block={tuple(block)} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        self._count_launch()
        if _DEBUG:
            try:
                self.cupy.cuda.runtime.deviceSynchronize()
            except Exception as exc:
                raise KernelError(f"kernel {name} grid={tuple(grid)} block={tuple(block)} failed on the device: "
                                  f"{type(exc).__name__}: {exc}") from exc

    def stream_key(self):
        return int(self.cupy.cuda.get_current_stream().ptr)

    def asnumpy(self, a):
        return self.cupy.asnumpy(a)

    def to_device(self, host):
        return self.cupy.asarray(np.ascontiguousarray(host))

    def mem_info(self):
        free, total = self.cupy.cuda.runtime.memGetInfo()
        pool = self.cupy.get_default_memory_pool()
        return int(free) + int(pool.free_bytes()), int(total)

    def release_cached_memory(self):
        self.cupy.get_default_memory_pool().free_all_blocks()

    def synchronize(self):
        self.cupy.cuda.runtime.deviceSynchronize()


_LOCK = threading.Lock()
_BACKEND: Backend | None = None


def get_backend() -> Backend:
    """The process-wide CuPy backend (kernels compiled on first use)."""
    global _BACKEND
    with _LOCK:
        if _BACKEND is None:
            _BACKEND = CupyBackend()
        return _BACKEND


# ---- device tensors ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceTensor:
    """A weight on the device: raw bytes ``[..., N, row_bytes]`` as stored in the file.

    ``qtype`` is the type of the bytes in ``raw`` (what the kernels read); ``source_qtype`` the
    type in the file (they differ only for types without a kernel, converted to F32 on the host).
    ``shape`` is the logical NumPy-order shape ``[..., N, K]``.
    """

    name: str
    qtype: Q
    shape: tuple[int, ...]
    raw: Any
    source_qtype: Q

    @property
    def row_bytes(self) -> int:
        return int(self.raw.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def expert(self, e: int) -> "DeviceTensor":
        if len(self.shape) != 3:
            raise ValueError(f"{self.name}: not a 3-D expert tensor (shape {self.shape})")
        return DeviceTensor(f"{self.name}[{e}]", self.qtype, self.shape[1:], self.raw[e], self.source_qtype)


def row_nbytes(qtype: Q, k: int) -> int:
    block, tsize = GGML_QUANT_SIZES[qtype]
    if k % block:
        raise ValueError(f"{qtype.name}: row length {k} is not a multiple of the block size {block}")
    return k // block * tsize


def valid_columns(row_bytes: int, k: int, kernel_qtype: Q) -> int:
    """Columns a ``kernel_qtype`` kernel can read from a row of ``row_bytes`` bytes: whole blocks only."""
    block, tsize = GGML_QUANT_SIZES[kernel_qtype]
    return min(k, (row_bytes // tsize) * block)


def _kernel_type(wt: DeviceTensor, as_qtype: Q | None) -> tuple[Q, int, int]:
    """(kernel type, its template id, columns it reads) for a product with ``wt``."""
    K = int(wt.shape[-1])
    if as_qtype is None:
        kt = wt.qtype
        if kt not in KERNEL_QTYPES:
            raise KernelError(f"{wt.name}: no kernel for quant type {kt.name}; supported: "
                              + ", ".join(t.name for t in KERNEL_QTYPES))
        want = row_nbytes(kt, K)
        if wt.row_bytes != want:
            raise KernelError(f"{wt.name}: rows hold {wt.row_bytes} bytes, {kt.name} with {K} columns needs {want}")
        return kt, KERNEL_QTYPES[kt], K
    kt = Q(as_qtype)
    if kt not in KERNEL_QTYPES:
        raise KernelError(f"no kernel for quant type {kt.name}")
    return kt, KERNEL_QTYPES[kt], valid_columns(wt.row_bytes, K, kt)


def _backend(backend: Backend | None) -> Backend:
    return backend if backend is not None else get_backend()


def _check_f32_2d(name: str, x, be: Backend, cols: int | None = None) -> None:
    if not be.is_array(x) or x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise KernelError(f"{name} must be a C-contiguous float32 2-D device array, got "
                          f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}")
    if cols is not None and x.shape[1] != cols:
        raise KernelError(f"{name} has {x.shape[1]} columns, expected {cols}")


def _out(name: str, out, shape: tuple[int, ...], be: Backend):
    xp = be.xp
    if out is None:
        return xp.empty(shape, dtype=np.float32)
    if not be.is_array(out) or out.dtype != np.float32 or tuple(out.shape) != shape or not out.flags.c_contiguous:
        raise KernelError(f"{name}: out must be a C-contiguous float32 device array of shape {shape}, got "
                          f"{getattr(out, 'dtype', '')} {getattr(out, 'shape', '')}")
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _token_tile(T: int) -> int:
    """NT for T activation rows: the smallest instance that holds them all, else the largest."""
    return next((nt for nt in TOKEN_TILES if T <= nt), TOKEN_TILES[-1])


# ---- dense products ------------------------------------------------------------------------------------
MAX_SHARED_INPUT = 3  # weight matrices one dense launch can serve (attn_q, attn_k, attn_v)


def rows_for(nt: int) -> int:
    """Weight rows per warp of the ``nt``-token instances (kernels.cu: MP_ROWS_FOR)."""
    return ROWS_NT4 if nt == 4 else ROWS_NT8 if nt == 8 else ROWS


def dense_launch(code: int, Ns: tuple[int, ...], T: int, long_split: int = 0) -> tuple[str, tuple[int, int, int]]:
    """Kernel instance and grid of one dense launch: T tokens against matrices of Ns rows (at most
    MAX_SHARED_INPUT) of kernel type ``code``. A short prompt (up to 4 tokens) against at most
    SPLITK_MAX_GROUPS row groups in all takes the split-K kernel (a block's warps share each row's
    columns), anything else the token-tiled one (token tile fastest: the blocks sharing weight rows
    run together). A longer prompt whose token-tiled grid would have fewer than ``long_split`` blocks
    (a backend's MP_SPLITK_LONG_BLOCKS; 0: never; the float router of a 64-token prompt: 64 blocks of 4
    warps for the whole GPU) takes the split-K kernel's 4-token tile, a block per (rows, 4 tokens)."""
    nt = _token_tile(T)
    rows = rows_for(nt)
    groups = sum(_cdiv(N, WARPS * rows) for N in Ns)
    if nt in SPLITK_TILES and groups <= SPLITK_MAX_GROUPS:
        return f"qmm_dense_splitk<{code},{nt}>", (sum(_cdiv(N, rows) for N in Ns), 1, 1)
    if nt == TILE_TOKENS and groups * _cdiv(T, nt) < long_split:
        r4 = rows_for(4)
        if sum(_cdiv(N, WARPS * r4) for N in Ns) <= SPLITK_MAX_GROUPS:
            return f"qmm_dense_splitk<{code},4>", (sum(_cdiv(N, r4) for N in Ns) * _cdiv(T, 4), 1, 1)
    return f"qmm_dense<{code},{nt}>", (groups * _cdiv(T, nt), 1, 1)


def _per_matrix(what: str, n: int, outs, as_qtypes) -> tuple[tuple, tuple]:
    """The per-matrix output buffers and kernel types of a shared-input product (None: all None)."""
    outs = tuple(outs) if outs is not None else (None,) * n
    as_qtypes = tuple(as_qtypes) if as_qtypes is not None else (None,) * n
    if not n == len(outs) == len(as_qtypes):
        raise KernelError(f"{what}: {n} matrices, {len(outs)} outputs, {len(as_qtypes)} kernel types")
    return outs, as_qtypes


def _share_launches(items, cap: int) -> list[tuple[tuple, list]]:
    """``(key, item)`` pairs -> ``(key, [items])`` launches: consecutive items of one key (kernel type,
    columns read, row bytes) share a launch, up to ``cap`` of them."""
    launches: list[tuple[tuple, list]] = []
    for key, item in items:
        if launches and launches[-1][0] == key and len(launches[-1][1]) < cap:
            launches[-1][1].append(item)
        else:
            launches.append((key, [item]))
    return launches


def qmatmul(x, wt: DeviceTensor, out=None, *, as_qtype: Q | None = None, digits=None, backend: Backend | None = None):
    """``x @ W.T``: x float32 ``[T, K]`` (C-contiguous), ``wt`` a 2-D :class:`DeviceTensor` ``[N, K]``
    -> float32 ``[T, N]``; :func:`dense_launch` picks the kernel (split K for short prompts and
    matrices that do not fill the GPU on their own; the tensor cores where :func:`use_mma` says).

    ``as_qtype`` is a TEST-ONLY fault injection: read ``wt``'s bytes with another type's kernel
    (whole blocks of that type inside each row; the remaining columns contribute 0). ``digits`` as in
    :func:`qmatmul_shared_input`.
    """
    return qmatmul_shared_input(x, (wt,), outs=(out,), as_qtypes=(as_qtype,), digits=digits, backend=backend)[0]


def qmatmul_shared_input(x, wts, *, outs=None, as_qtypes=None, digits=None, backend: Backend | None = None) -> list:
    """``[x @ W.T for W in wts]`` in as few launches as possible: consecutive matrices of the same
    kernel type and row layout (up to MAX_SHARED_INPUT) share one launch, which is what a short
    prompt's attn_q / attn_k / attn_v products need (each alone is latency-bound). Each result is
    what :func:`qmatmul` gives for that matrix, bit for bit; ``outs`` / ``as_qtypes`` per matrix.
    ``digits``: ``act_digits(x)``'s result where the kernel that wrote x wrote it too (see
    :func:`reads_digits`); the tensor-core products read it instead of launching act_digits."""
    be = _backend(backend)
    wts = tuple(wts)
    outs, as_qtypes = _per_matrix("qmatmul", len(wts), outs, as_qtypes)
    K = None
    todo = []  # ((code, kq, row_bytes), (wt, out)) of the products with work
    results = []
    for wt, out, as_q in zip(wts, outs, as_qtypes):
        if len(wt.shape) != 2:
            raise KernelError(f"qmatmul: {wt.name} is not 2-D (shape {wt.shape}); use qmatmul_experts for 3-D")
        N, Kw = (int(s) for s in wt.shape)
        if K is None:
            _check_f32_2d("qmatmul: x", x, be, Kw)
            K = Kw
        elif Kw != K:
            raise KernelError(f"qmatmul: {wt.name} has {Kw} columns, the first matrix {K}")
        T = int(x.shape[0])
        out = _out("qmatmul", out, (T, N), be)
        results.append(out)
        if T and N:
            _, code, kq = _kernel_type(wt, as_q)
            todo.append(((code, kq, wt.row_bytes), (wt, out)))
    digits = _given_digits("qmatmul", digits, x, be)  # else act_digits' output, written once for the launches that use it
    for (code, kq, row_bytes), mats in _share_launches(todo, MAX_SHARED_INPUT):
        Ns = tuple(int(wt.shape[0]) for wt, _ in mats)
        pad = mats + [mats[0]] * (MAX_SHARED_INPUT - len(mats))  # unused slots: N = 0, no blocks
        Np = Ns + (0,) * (MAX_SHARED_INPUT - len(mats))
        lead = tuple(wt.raw for wt, _ in pad) + (np.int64(row_bytes),) + tuple(np.int32(n) for n in Np)
        outs_args = tuple(o for _, o in pad)
        if use_mma(be, code, kq, K, T):
            if digits is None:
                digits = act_digits(x, backend=be)
            blocks, warps = sum(_cdiv(N, MMA_ROWS) for N in Ns), dense_mma_warps(K)
            by_tokens = dense_long_tokens(be, blocks, T)
            pass8 = dense_pass8(be, by_tokens)
            if pass8:
                warps = min(warps, DENSE_PASS8_WARPS)
            share = (2 if pass8 else 1) * warps if by_tokens else 0  # a block's passes of 4: a multiple of this
            be.launch(dense_mma_kernel(code, T, by_tokens, pass8),
                      (blocks, dense_mma_pass_groups(blocks, T, share), 1), (32 * warps, 1, 1),
                      lead + (np.int32(K), *digits, np.int32(T)) + outs_args)
            continue
        kernel, grid = dense_launch(code, Ns, T, be.switch("MP_SPLITK_LONG_BLOCKS"))
        be.launch(kernel, grid, (THREADS, 1, 1), lead + (np.int32(kq), x, np.int32(K), np.int32(T)) + outs_args)
    return results


# ---- grouped expert product -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertRouting:
    """(token, slot) pairs grouped by expert, built on the device without a host synchronisation.

    ``pairs`` int32 ``[T*k]``: pair ids ``p = t*k + j`` sorted by (expert, p); expert ``e`` owns
    ``pairs[offsets[e]:offsets[e+1]]``; ``active`` int32 ``[min(E, T*k)]`` the experts owning pairs,
    ascending, then -1; ``order`` int32 ``[T, k]`` each token's slots in ascending expert-id order.
    """

    ids: Any       # int32 [T, k]
    pairs: Any     # int32 [T*k]
    offsets: Any   # int32 [E+1]
    active: Any    # int32 [min(E, T*k)]
    order: Any     # int32 [T, k]
    n_experts: int
    # int32 [records_len(T*k, E, expert_chunk), 8]: per run of up to expert_chunk(backend) pairs of an active
    # expert (ascending experts, an expert's runs in order) {expert, the run's first place in pairs, one past
    # its last, 0, its first 4 pairs (the last repeated past its count)}; {-1, 0, 0, 0, -1, -1, -1, -1} after
    records: Any = None
    # Backend.launch_mark() just after the launch that wrote it (None: not known)
    written_at: tuple[int, int] | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])


def expert_routing(ids, n_experts: int, *, backend: Backend | None = None) -> ExpertRouting:
    """Group the (token, slot) pairs of ``ids`` int32 ``[T, k]`` by expert: one block, a stable
    counting sort (kernel ``expert_group``). Ids must lie in ``0..n_experts-1``."""
    be = _backend(backend)
    xp = be.xp
    if not be.is_array(ids) or ids.ndim != 2:
        raise KernelError(f"expert ids must be a 2-D [T, k] device array, got {getattr(ids, 'shape', type(ids))}")
    if not 0 < n_experts <= MAX_EXPERTS:
        raise KernelError(f"expert_routing: {n_experts} experts; the grouping kernel handles 1..{MAX_EXPERTS}")
    ids = xp.ascontiguousarray(ids.astype(np.int32, copy=False))
    routing = _empty_routing(ids, n_experts, be)
    _launch_grouping(routing, be)
    return replace(routing, written_at=be.launch_mark())


def _written_two_back(routing: ExpertRouting, be: Backend) -> bool:
    """Whether the routing was written two or more launches before the next launch on this stream. Every
    kernel waits for the one before it (mp_grid_sync) before it lets the next one start, so that next one
    starts only once the routing's kernel is complete: qmm_experts_mma may read it before its own wait."""
    if routing.written_at is None or not EXPERTS_EARLY:
        return False
    key, n = be.launch_mark()
    return routing.written_at[0] == key and n - routing.written_at[1] >= 1


def expert_chunk(be: Backend) -> int:
    """The most pairs of one routing record in ``be``'s kernels (kernels.cu's MP_EXPERT_CHUNK; 0: one record
    an expert): a busy expert's pairs are split over several records, each a row of qmm_experts_mma's grid."""
    return be.switch("MP_EXPERT_CHUNK")


def records_len(n_pairs: int, n_experts: int, chunk: int) -> int:
    """Records to hold for ``n_pairs`` pairs over ``n_experts`` experts in runs of up to ``chunk``: with A
    experts active, sum(ceil(c_e / chunk)) = A + sum(floor((c_e - 1) / chunk)) <= A + (P - A) // chunk, which
    grows with A, so A = min(E, P) bounds it (short prompts, every expert at most ``chunk`` pairs: min(E, P))."""
    n_act = max(1, min(n_experts, n_pairs))
    return n_act + ((n_pairs - n_act) // chunk if chunk > 0 and n_pairs > n_act else 0)


def _empty_routing(ids, n_experts: int, be: Backend) -> "ExpertRouting":
    xp = be.xp
    T, k = (int(s) for s in ids.shape)
    P = T * k
    n_act = max(1, min(n_experts, P))
    return ExpertRouting(ids, xp.empty((P,), dtype=np.int32), xp.empty((n_experts + 1,), dtype=np.int32),
                         xp.empty((n_act,), dtype=np.int32), xp.empty((T, k), dtype=np.int32), int(n_experts),
                         records=xp.empty((records_len(P, n_experts, expert_chunk(be)), RECORD_INTS), dtype=np.int32))


def _launch_grouping(r: "ExpertRouting", be: Backend) -> None:
    be.launch("expert_group", (1, 1, 1), (THREADS, 1, 1),
              (r.ids, np.int32(r.n_tokens), np.int32(r.k), np.int32(r.n_experts), r.pairs, r.offsets, r.active,
               np.int32(r.active.shape[0]), r.order, r.records, np.int32(r.records.shape[0])))


def route_experts(logits, k: int, *, backend: Backend | None = None):
    """The router from its logits ``[T, E]`` in one launch (kernel ``moe_route``): ``(probs, ids,
    weights, routing)``, bit for bit :func:`softmax`, :func:`router_topk` and :func:`expert_routing`.
    Prompts of up to MP_WARPS tokens are grouped in the same launch; longer ones by expert_group after."""
    be = _backend(backend)
    T, E, ids, weights = _router_outputs("route_experts", logits, k, min(MAX_ROUTER_EXPERTS, MAX_EXPERTS), be)
    probs = be.xp.empty((T, E), dtype=np.float32)
    routing = _empty_routing(ids, E, be)
    if T:
        blocks = _cdiv(T, WARPS)
        be.launch("moe_route", (blocks, 1, 1), (THREADS, 1, 1),
                  (logits, np.int32(T), np.int32(E), np.int32(k), probs, ids, weights, np.int32(blocks == 1),
                   routing.pairs, routing.offsets, routing.active, np.int32(routing.active.shape[0]), routing.order,
                   routing.records, np.int32(routing.records.shape[0])))
        if blocks > 1:
            _launch_grouping(routing, be)
        routing = replace(routing, written_at=be.launch_mark())
    return probs, ids, weights, routing


def use_mma(be: Backend, code: int, kq: int, K: int, T: int) -> bool:
    """Whether a product of kernel type ``code`` over ``kq`` of ``K`` columns for ``T`` tokens runs on
    the tensor cores (qmm_experts_mma, qmm_dense_mma): Q4_K or Q6_K over whole super-blocks (not under the
    fault switch's column limit), MMA_MIN_TOKENS to MMA_MAX_TOKENS tokens, a backend that runs mma (the
    emulator does), and MP_MMA not 0."""
    return (bool(MMA) and be.mma and code in MMA_ON_QTYPES and kq == K and K % 256 == 0
            and MMA_MIN_TOKENS <= T <= MMA_MAX_TOKENS)


def experts_mma_kernel(code: int, row_bytes: int, pass8: bool = False) -> str:
    """The qmm_experts_mma instance for weight rows of kernel type ``code`` and ``row_bytes`` bytes: Q4_K
    rows whose warp's 16 fit EXPERT_STAGE_BYTES take the staging instance <12,1> (Q6_K rows are always
    staged). ``pass8`` (see :func:`expert_pass8`): the instance taking an expert's pairs in passes of 8."""
    staged = code == KERNEL_QTYPES[Q.Q6_K] or (
        code == KERNEL_QTYPES[Q.Q4_K] and STAGE_Q4_EXPERTS and 16 * row_bytes <= EXPERT_STAGE_BYTES)
    if pass8:
        return f"qmm_experts_mma<{code},{int(staged)},1>"
    if code == KERNEL_QTYPES[Q.Q4_K] and staged:
        return f"qmm_experts_mma<{code},1>"
    return f"qmm_experts_mma<{code}>"


def expert_pass8(be: Backend, T: int) -> bool:
    """Whether qmm_experts_mma takes an expert's pairs in passes of 8 (four n-tiles on one decode of its
    rows) rather than 4: past 4 tokens (where an expert's run may hold more than 4 pairs), as ``be``'s
    MP_EXPERT_PASS8 says (0: never)."""
    return T > 4 and be.switch("MP_EXPERT_PASS8") > 0


def dense_mma_kernel(code: int, T: int, by_tokens: bool = False, pass8: bool = False) -> str:
    """The qmm_dense_mma instance for T tokens: one pass up to 4 (<code>), passes of 4 over the same rows
    past that (<code,1>; its own instance, so that the short prompts' code is what it was), or with
    ``by_tokens`` those passes split over the block's warps (<code,2>: see dense_long_tokens), 8 tokens a
    pass with ``pass8`` (<code,3>: see dense_pass8)."""
    if T <= 4:
        return f"qmm_dense_mma<{code}>"
    return f"qmm_dense_mma<{code},{(3 if pass8 else 2) if by_tokens else 1}>"


def dense_pass8(be: Backend, by_tokens: bool) -> bool:
    """Whether a dense product whose passes split over the warps (``by_tokens``) takes them 8 tokens at a
    time (four n-tiles on each decode of the rows, at most DENSE_PASS8_WARPS warps a block), as ``be``'s
    MP_DENSE_PASS8 says (0: passes of 4)."""
    return by_tokens and be.switch("MP_DENSE_PASS8") > 0


def dense_long_tokens(be: Backend, blocks: int, T: int) -> bool:
    """Whether a dense product of ``blocks`` row groups and T > 4 tokens splits its passes of 4 over the
    block's warps (qmm_dense_mma<QT,2>, each warp a pass over all of K) rather than K (<QT,1>): where its
    row groups x passes reach ``be``'s MP_DENSE_LONG_TOKENS (0: never), enough warps' passes to fill the GPU."""
    least = be.switch("MP_DENSE_LONG_TOKENS")
    return T > 4 and least > 0 and blocks * _cdiv(T, 4) >= least


def dense_mma_pass_groups(blocks: int, T: int, warps: int = 0) -> int:
    """How many groups of a long prompt's passes of 4 tokens qmm_dense_mma<QT,1> spreads over ``gridDim.y``
    for ``blocks`` row groups of 16: enough that the grid has about DENSE_LONG_BLOCKS blocks (each pass of a
    block follows the one before, so a small matrix would wait on a few blocks' chains of passes), 1 for a
    grid that has them already (the output head) and for up to 4 tokens. ``warps`` (qmm_dense_mma<QT,2>,
    whose warps share a block's passes): a block takes a multiple of that many passes, at least one a warp."""
    passes = _cdiv(T, 4)
    if T <= 4 or DENSE_LONG_BLOCKS <= 0:
        return 1
    per = min(passes, max(1, blocks * passes // DENSE_LONG_BLOCKS))  # passes a block
    if warps > 0:
        per = min(passes, warps * _cdiv(per, warps))
    return _cdiv(passes, per)


def dense_mma_warps(K: int) -> int:
    """Warps per block of qmm_dense_mma for rows of K columns: MMA_DENSE_SBS super-blocks each."""
    return max(1, min(MMA_DENSE_WARPS, K // 256 // max(1, MMA_DENSE_SBS)))


def reads_digits(n_tokens: int, wts, as_qtypes=None, *, backend: Backend | None = None) -> bool:
    """Whether a product of ``n_tokens`` tokens' rows (2-D ``wts``) or pairs' rows (3-D, grouped experts)
    with any of ``wts`` takes the tensor cores, so reads the rows' digits: then the kernel that writes the
    rows may write them too (``rms_norm``, ``add_rms_norm``, ``swiglu`` with ``digits=True``)."""
    be = _backend(backend)
    as_qtypes = tuple(as_qtypes) if as_qtypes is not None else (None,) * len(wts)
    for wt, as_q in zip(wts, as_qtypes):
        _, code, kq = _kernel_type(wt, as_q)
        if use_mma(be, code, kq, int(wt.shape[-1]), n_tokens):
            return True
    return False


def _given_digits(what: str, digits, x, be: Backend):
    """A product's ``digits`` argument checked against its rows x (None: none given)."""
    if digits is None:
        return None
    xd, xs, xunit = digits
    R, K = int(x.size) // max(int(x.shape[-1]), 1), int(x.shape[-1])
    if tuple(xd.shape) != (R, K) or tuple(xs.shape) != (R, K // 32) or tuple(xunit.shape) != (R,):
        raise KernelError(f"{what}: digits of shapes {xd.shape} / {xs.shape} / {xunit.shape} do not belong to rows {x.shape}")
    return tuple(digits)


def act_digits(x, *, backend: Backend | None = None) -> tuple:
    """The exact integer form of float32 rows ``x`` ``[R, K]`` (K a multiple of 32) that the mma
    kernels read (kernel ``act_digits``): ``(xd uint32 [R, K], xs float32 [R, K/32],
    xunit float32 [R])``: four base-256 digits per value, each 32-value sub-block's sum, each row's
    unit (NaN for a row holding a non-finite value)."""
    be = _backend(backend)
    _check_f32_2d("act_digits: x", x, be)
    R, K = (int(s) for s in x.shape)
    digits = _digits_out("act_digits", R, K, be)
    if R:
        be.launch("act_digits", (R, 1, 1), (DIGITS_THREADS, 1, 1), (x, np.int32(R), np.int32(K), *digits))
    return digits


def _digits_out(what: str, R: int, K: int, be: Backend) -> tuple:
    """Fresh (xd, xs, xunit) buffers for R rows of K columns (K a multiple of 32)."""
    if K % 32:
        raise KernelError(f"{what}: K={K} must be a multiple of 32 for the digits")
    xp = be.xp
    return (xp.empty((R, K), dtype=np.uint32), xp.empty((R, K // 32), dtype=np.float32),
            xp.empty((R,), dtype=np.float32))


def qmatmul_experts(x, wt3: DeviceTensor, routing, out=None, *, x_per_pair: bool = False,
                    as_qtype: Q | None = None, digits=None, backend: Backend | None = None):
    """Grouped expert product ("mul_mat_id").

    ``wt3`` a 3-D :class:`DeviceTensor` ``[E, N, K]``; ``routing`` an :class:`ExpertRouting` (or
    the int32 ids ``[T, k]``, grouped here). Input rows: ``x`` float32 ``[T, K]`` (one row per
    token, shared by its k slots) or, with ``x_per_pair``, ``[T, k, K]`` / ``[T*k, K]`` (one row per
    (token, slot) pair: the down projection's swiglu input). Returns float32 ``[T, k, N]``: the
    product of pair (t, j)'s input row with expert ``ids[t, j]``'s weights.

    ``as_qtype``: TEST-ONLY fault injection, as in :func:`qmatmul`; ``digits`` as in
    :func:`qmatmul_shared_input`.
    """
    return qmatmul_experts_shared_input(x, (wt3,), routing, outs=(out,), x_per_pair=x_per_pair,
                                        as_qtypes=(as_qtype,), digits=digits, backend=backend)[0]


def qmatmul_experts_shared_input(x, wt3s, routing, *, outs=None, x_per_pair: bool = False, as_qtypes=None,
                                 digits=None, backend: Backend | None = None) -> list:
    """:func:`qmatmul_experts` for one or two expert tensors that read the same rows (ffn_gate_exps
    and ffn_up_exps): one launch when both have the same kernel type and shape, else one each.
    Each result is what :func:`qmatmul_experts` gives for that tensor, bit for bit."""
    be = _backend(backend)
    wt3s = tuple(wt3s)
    if not 1 <= len(wt3s) <= 2:
        raise KernelError(f"qmatmul_experts: 1 or 2 expert tensors, got {len(wt3s)}")
    outs, as_qtypes = _per_matrix("qmatmul_experts", len(wt3s), outs, as_qtypes)
    for wt3 in wt3s:
        if len(wt3.shape) != 3:
            raise KernelError(f"qmatmul_experts: {wt3.name} is not 3-D (shape {wt3.shape})")
        if tuple(wt3.shape) != tuple(wt3s[0].shape):
            raise KernelError(f"qmatmul_experts: {wt3.name} has shape {wt3.shape}, {wt3s[0].name} {wt3s[0].shape}")
    E, N, K = (int(s) for s in wt3s[0].shape)
    if not isinstance(routing, ExpertRouting):
        routing = expert_routing(routing, E, backend=be)
    if routing.n_experts != E:
        raise KernelError(f"qmatmul_experts: routing built for {routing.n_experts} experts, {wt3s[0].name} has {E}")
    T, k = routing.n_tokens, routing.k
    P = T * k
    if x_per_pair:
        if tuple(x.shape) == (T, k, K):
            x = x.reshape(P, K)
        _check_f32_2d("qmatmul_experts: x (per pair)", x, be, K)
        if x.shape[0] != P:
            raise KernelError(f"qmatmul_experts: x has {x.shape[0]} rows, expected T*k = {P}")
        x_div = 1
    else:
        _check_f32_2d("qmatmul_experts: x", x, be, K)
        if x.shape[0] != T:
            raise KernelError(f"qmatmul_experts: x has {x.shape[0]} rows, the routing has {T} tokens")
        x_div = k
    outs = tuple(_out("qmatmul_experts", o, (T, k, N), be) for o in outs)
    if P == 0 or N == 0:
        return list(outs)
    todo = []  # ((code, kq, row_bytes), (wt3, out))
    for wt3, out, as_q in zip(wt3s, outs, as_qtypes):
        raw = wt3.raw
        if not raw.flags.c_contiguous or tuple(raw.shape[:2]) != (E, N):
            raise KernelError(f"{wt3.name}: raw bytes must be a C-contiguous [E, N, row_bytes] array, got {raw.shape}")
        _, code, kq = _kernel_type(wt3, as_q)
        todo.append(((code, kq, wt3.row_bytes), (wt3, out)))
    nt = _token_tile(T)
    digits = _given_digits("qmatmul_experts", digits, x, be)  # else act_digits' output, written once
    for (code, kq, row_bytes), mats in _share_launches(todo, 2):
        (w0, o0), (w1, o1) = mats[0], mats[-1]
        if use_mma(be, code, kq, K, T):
            if digits is None:
                digits = act_digits(x, backend=be)
            grid = (_cdiv(N, WARPS * MMA_ROWS) * len(mats), int(routing.records.shape[0]), 1)  # y: the records
            be.launch(experts_mma_kernel(code, row_bytes, expert_pass8(be, T)), grid, (THREADS, 1, 1),
                      (w0.raw, w1.raw, np.int64(row_bytes), np.int64(N * row_bytes), np.int32(N), np.int32(K), *digits,
                       np.int32(x_div), routing.pairs, routing.records, o0, o1, np.int32(N),
                       np.int32(_written_two_back(routing, be))))
            continue
        grid = (_cdiv(N, WARPS * rows_for(nt)) * len(mats), int(routing.active.shape[0]), 1)  # y: the active experts only
        be.launch(f"qmm_experts<{code},{nt}>", grid, (THREADS, 1, 1),
                  (w0.raw, w1.raw, np.int64(row_bytes), np.int64(N * row_bytes), np.int32(N), np.int32(kq),
                   x, np.int32(K), np.int32(x_div), routing.pairs, routing.offsets, routing.active, o0, o1, np.int32(N)))
    return list(outs)


# ---- router and combination -----------------------------------------------------------------------------
def _router_outputs(what: str, scores, k: int, max_experts: int, be: Backend):
    """Checks of a router kernel's [T, E] input and k; (T, E, ids [T, k], weights [T, k]) to fill."""
    _check_f32_2d(f"{what}: input", scores, be)
    T, E = (int(s) for s in scores.shape)
    if not 0 < k <= E:
        raise KernelError(f"{what}: k={k} must lie in 1..{E}")
    if E > max_experts:
        raise KernelError(f"{what}: {E} experts; the kernels handle up to {max_experts}")
    return T, E, be.xp.empty((T, k), dtype=np.int32), be.xp.empty((T, k), dtype=np.float32)


def router_topk(probs, k: int, *, backend: Backend | None = None):
    """Top-k of ``probs`` float32 ``[T, E]`` -> (ids int32 ``[T, k]``, renormalised weights float32
    ``[T, k]``), descending, ties to the lower id."""
    be = _backend(backend)
    T, E, ids, weights = _router_outputs("router_topk", probs, k, MAX_ROUTER_EXPERTS, be)
    if T:
        be.launch("router_topk", (_cdiv(T, WARPS), 1, 1), (THREADS, 1, 1),
                  (probs, np.int32(T), np.int32(E), np.int32(k), ids, weights))
    return ids, weights


def _elementwise_grid(n: int) -> tuple[int, int, int]:
    return (max(1, min(_cdiv(n, ELEMENTWISE_THREADS), MAX_ELEMENTWISE_BLOCKS)), 1, 1)


def moe_combine(y, weights, routing: ExpertRouting, *, residual=None, backend: Backend | None = None):
    """``out[t] = sum_j weights[t, j] * y[t, j]`` over slots in ascending expert-id order (the
    reference's accumulation order, ``routing.order``), products and sums rounded separately.
    y float32 ``[T, k, N]``; ``routing`` the :class:`ExpertRouting` of the ids that produced y.
    With ``residual`` x ``[T, N]``: ``(out, x + out)`` from the same launch (:func:`add`'s sum)."""
    be = _backend(backend)
    xp = be.xp
    T, k, N = (int(s) for s in y.shape)
    if tuple(weights.shape) != (T, k) or (routing.n_tokens, routing.k) != (T, k):
        raise KernelError(f"moe_combine: weights {weights.shape} / routing {(routing.n_tokens, routing.k)} "
                          f"do not fit y {y.shape}")
    out = xp.empty((T, N), dtype=np.float32)
    res = out  # not read or written without a residual
    if residual is not None:
        residual = _f32c("moe_combine: residual", residual, be)
        if tuple(residual.shape) != (T, N):
            raise KernelError(f"moe_combine: residual {residual.shape}, expected {(T, N)}")
        res = xp.empty((T, N), dtype=np.float32)
    if T * N:
        be.launch("moe_combine", _elementwise_grid(T * N), (ELEMENTWISE_THREADS, 1, 1),
                  (xp.ascontiguousarray(y), xp.ascontiguousarray(weights), routing.order,
                   np.int32(T), np.int32(k), np.int32(N), out, np.int32(residual is not None),
                   residual if residual is not None else out, res))
    return out if residual is None else (out, res)


def moe_combine_norm(y, weights, routing: ExpertRouting, residual, norm_weight, eps: float, *,
                     backend: Backend | None = None) -> tuple:
    """The layer boundary of a prompt whose next products take the tensor cores: ``(out, res, normed,
    digits)`` = :func:`moe_combine` with ``residual`` (the combination and the post-FFN residual), then
    :func:`rms_norm` of the residual with ``norm_weight`` (the next layer's attn_norm, or the output norm)
    and its digits, bit for bit, from one launch (kernel ``combine_norm_digits``, a block per token) where
    the rows have up to ROW_BLOCK_COLS columns, a multiple of 32; else from those two."""
    be = _backend(backend)
    T, k, N = (int(s) for s in y.shape)
    norm_weight = _f32c("moe_combine_norm: norm_weight", norm_weight, be)
    if tuple(norm_weight.shape) != (N,):
        raise KernelError(f"moe_combine_norm: norm_weight shape {norm_weight.shape}, expected ({N},)")
    if not _fused_digits(N):
        out, res = moe_combine(y, weights, routing, residual=residual, backend=be)
        return (out, res, *rms_norm(res, norm_weight, eps, digits=True, backend=be))
    residual = _f32c("moe_combine_norm: residual", residual, be)
    if tuple(weights.shape) != (T, k) or (routing.n_tokens, routing.k) != (T, k) or tuple(residual.shape) != (T, N):
        raise KernelError(f"moe_combine_norm: weights {weights.shape} / routing {(routing.n_tokens, routing.k)} / "
                          f"residual {residual.shape} do not fit y {y.shape}")
    xp = be.xp
    out, res, normed = (xp.empty((T, N), dtype=np.float32) for _ in range(3))
    _, digits = _fused_with_digits("moe_combine_norm", normed, T, N, be, lambda dg: be.launch(
        "combine_norm_digits", (T, 1, 1), (DIGITS_THREADS, 1, 1),
        (xp.ascontiguousarray(y), xp.ascontiguousarray(weights), routing.order, np.int32(T), np.int32(k), np.int32(N),
         residual, norm_weight, np.float32(eps), out, res, normed, *dg, np.int32(_written_two_back(routing, be)))))
    return out, res, normed, digits


def round_bf16_(x, *, backend: Backend | None = None):
    """Round a C-contiguous float32 device array to bfloat16 values in place (RNE); returns it."""
    be = _backend(backend)
    if not be.is_array(x) or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise KernelError("round_bf16_: needs a C-contiguous float32 device array")
    n = int(x.size)
    if n:
        be.launch("round_bf16", _elementwise_grid(n), (ELEMENTWISE_THREADS, 1, 1), (x, np.int64(n)))
    return x


# ---- fused row and elementwise operations ----------------------------------------------------------------
def _f32c(name: str, x, be: Backend):
    if not be.is_array(x) or x.dtype != np.float32:
        raise KernelError(f"{name}: needs a float32 device array, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    return be.xp.ascontiguousarray(x)


def _fused_digits(n: int) -> bool:
    """Whether rows of n columns take the block-per-row kernels that write their output's digits too."""
    return 0 < n <= ROW_BLOCK_COLS and n % 32 == 0


def _fused_with_digits(what: str, out, rows: int, n: int, be: Backend, launch) -> tuple:
    """``(out, digits)`` of a row kernel's block-per-row form: ``launch(digits)`` launches it on fresh
    digit buffers, which it fills with ``act_digits(out)``."""
    digits = _digits_out(what, rows, n, be)
    if rows:
        launch(digits)
    return out, digits


def rms_norm(x, weight, eps: float, *, digits: bool = False, backend: Backend | None = None):
    """``x / sqrt(mean(x * x, -1) + eps) * weight`` over the last axis (one warp per row).

    ``digits``: ``(out, act_digits(out))`` (the tensor-core products' input), bit for bit, from one
    launch (kernel ``norm_digits``, a block per row) where the rows have up to ROW_BLOCK_COLS columns, a
    multiple of 32."""
    be = _backend(backend)
    x, weight = _f32c("rms_norm: x", x, be), _f32c("rms_norm: weight", weight, be)
    n = int(x.shape[-1])
    if tuple(weight.shape) != (n,):
        raise KernelError(f"rms_norm: weight shape {weight.shape}, expected ({n},)")
    out = be.xp.empty(x.shape, dtype=np.float32)
    rows = int(x.size) // max(n, 1)
    if digits and _fused_digits(n):
        return _fused_with_digits("rms_norm", out, rows, n, be, lambda dg: be.launch(
            "norm_digits", (rows, 1, 1), (DIGITS_THREADS, 1, 1),
            (x, x, np.int32(0), np.int32(rows), np.int32(n), weight, np.float32(eps), out, out, *dg)))
    if rows and n:
        be.launch("rms_norm", (_cdiv(rows, WARPS), 1, 1), (THREADS, 1, 1),
                  (x, np.int32(rows), np.int32(n), weight, np.float32(eps), out))
    return (out, act_digits(out.reshape(rows, n), backend=be)) if digits else out


def softmax(x, *, causal_period: int = 0, backend: Backend | None = None):
    """Softmax over the last axis (one warp per row). ``causal_period`` > 0: row r is query position
    ``r // causal_period`` and the columns after it are masked (probability 0)."""
    be = _backend(backend)
    x = _f32c("softmax: x", x, be)
    n = int(x.shape[-1])
    out = be.xp.empty(x.shape, dtype=np.float32)
    rows = int(x.size) // max(n, 1)
    if rows and n:
        be.launch("softmax_rows", (_cdiv(rows, WARPS), 1, 1), (THREADS, 1, 1),
                  (x, np.int32(rows), np.int32(n), np.int32(causal_period), out))
    return out


def attention_core(q, k, v, out=None, *, backend: Backend | None = None):
    """Causal attention of T positions in one launch (one warp per (position, head) row), float32:
    ``q`` ``[T, nh, hd]``, ``k`` and ``v`` ``[T, nkv, hd]`` (or ``[T, nkv * hd]``) -> (scores ``[T, nh, T]``
    = ``q k^T / sqrt(hd)`` unmasked, probs ``[T, nh, T]`` = the causal softmax, ctx ``[T, nh * hd]`` =
    ``probs @ v``). Query head h reads kv head ``h // (nh // nkv)``. ``out``: optional (scores, probs, ctx)."""
    be = _backend(backend)
    q = _f32c("attention_core: q", q, be)
    if q.ndim != 3:
        raise KernelError(f"attention_core: q must be [T, heads, head_dim], got shape {q.shape}")
    T, nh, hd = (int(s) for s in q.shape)
    k = _f32c("attention_core: k", k, be)
    nkv = int(k.shape[1]) if k.ndim == 3 else int(k.shape[-1]) // max(hd, 1)
    v = _kv_check("attention_core", k, v, T, nh, nkv, hd, be)
    scores, probs, ctx = out if out is not None else (None, None, None)
    scores = _out("attention_core: scores", scores, (T, nh, T), be)
    probs = _out("attention_core: probs", probs, (T, nh, T), be)
    ctx = _out("attention_core: ctx", ctx, (T, nh * hd), be)
    if T and nh and hd:
        warps = be.switch("MP_ATTN_CORE_WARPS")  # rows a block (its kernels' launch bounds)
        be.launch("attention_core", (_cdiv(T * nh, warps), 1, 1), (32 * warps, 1, 1),
                  (q, k, v, np.int32(T), np.int32(nh), np.int32(nkv), np.int32(hd), np.float32(np.sqrt(hd)),
                   scores, probs, ctx))
    return scores, probs, ctx


def _kv_check(what: str, k, v, T: int, nh: int, nkv: int, hd: int, be: Backend):
    """k and v must hold [T, nkv, hd] values, the nh query heads grouping over the nkv: v as float32."""
    v = _f32c(f"{what}: v", v, be)
    for name, a in (("k", k), ("v", v)):
        if int(a.size) != T * nkv * hd or int(a.shape[0]) != T:
            raise KernelError(f"{what}: {name} has shape {a.shape}, expected [{T}, {nkv}, {hd}]")
    if nkv < 1 or nh % nkv:
        raise KernelError(f"{what}: {nh} query heads do not group over {nkv} kv heads")
    return v


def add_rms_norm(a, b, weight, eps: float, *, digits: bool = False, backend: Backend | None = None):
    """``s = a + b`` and ``rms_norm(s, weight, eps)`` in one launch: ``(s, normed)``, bit for bit
    :func:`add` then :func:`rms_norm` (one warp per row of the last axis). ``digits``: ``(s, normed,
    act_digits(normed))``, in one launch where :func:`rms_norm`'s would be."""
    be = _backend(backend)
    a, b, weight = (_f32c(f"add_rms_norm: {n}", v, be) for n, v in (("a", a), ("b", b), ("weight", weight)))
    if tuple(a.shape) != tuple(b.shape):
        raise KernelError(f"add_rms_norm: shapes {a.shape} and {b.shape} differ")
    n = int(a.shape[-1])
    if tuple(weight.shape) != (n,):
        raise KernelError(f"add_rms_norm: weight shape {weight.shape}, expected ({n},)")
    s, out = (be.xp.empty(a.shape, dtype=np.float32) for _ in range(2))
    rows = int(a.size) // max(n, 1)
    if digits and _fused_digits(n):
        return (s, *_fused_with_digits("add_rms_norm", out, rows, n, be, lambda dg: be.launch(
            "norm_digits", (rows, 1, 1), (DIGITS_THREADS, 1, 1),
            (a, b, np.int32(1), np.int32(rows), np.int32(n), weight, np.float32(eps), s, out, *dg))))
    if rows and n:
        be.launch("add_rms_norm", (_cdiv(rows, WARPS), 1, 1), (THREADS, 1, 1),
                  (a, b, np.int32(rows), np.int32(n), weight, np.float32(eps), s, out))
    return (s, out, act_digits(out.reshape(rows, n), backend=be)) if digits else (s, out)


def qk_norm_rope(q, k, wq, wk, eps: float, cos, sin, *, backend: Backend | None = None):
    """RMSNorm of the heads of ``q`` ``[T, nh, hd]`` and ``k`` ``[T, nkv, hd]`` (weights ``wq``, ``wk``
    ``[hd]``) then NEOX RoPE, in one launch: ``(qn, kn, qr, kr)``, bit for bit :func:`rms_norm` then
    :func:`rope_neox` (``cos``/``sin`` ``[T, hd/2]``)."""
    be = _backend(backend)
    q, k, wq, wk, cos, sin, (T, nh, nkv, hd) = _qk_args("qk_norm_rope", q, k, wq, wk, cos, sin, be)
    qn, qr = (be.xp.empty(q.shape, dtype=np.float32) for _ in range(2))
    kn, kr = (be.xp.empty(k.shape, dtype=np.float32) for _ in range(2))
    rows = T * (nh + nkv)
    if rows and hd:
        be.launch("qk_norm_rope", (_cdiv(rows, WARPS), 1, 1), (THREADS, 1, 1),
                  (q, k, np.int32(T), np.int32(nh), np.int32(nkv), np.int32(hd), wq, wk, np.float32(eps), cos, sin,
                   qn, kn, qr, kr))
    return qn, kn, qr, kr


def _qk_args(what: str, q, k, wq, wk, cos, sin, be: Backend) -> tuple:
    """The checked inputs of the q/k norms + RoPE: (q, k, wq, wk, cos, sin, (T, nh, nkv, hd))."""
    q, k, wq, wk, cos, sin = (_f32c(f"{what}: {n}", a, be) for n, a in
                              (("q", q), ("k", k), ("wq", wq), ("wk", wk), ("cos", cos), ("sin", sin)))
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise KernelError(f"{what}: q {q.shape} and k {k.shape} must be [T, heads, hd] with the same T and hd")
    T, nh, hd = (int(s) for s in q.shape)
    nkv = int(k.shape[1])
    if hd % 2 or int(cos.size) != T * (hd // 2) or int(sin.size) != T * (hd // 2):
        raise KernelError(f"{what}: q {q.shape} with cos {cos.shape} / sin {sin.shape}")
    if hd > QK_NORM_MAX_HEAD_DIM:
        raise KernelError(f"{what}: head_dim {hd} > {QK_NORM_MAX_HEAD_DIM}, the most a warp holds")
    if tuple(wq.shape) != (hd,) or tuple(wk.shape) != (hd,):
        raise KernelError(f"{what}: weights {wq.shape} / {wk.shape}, expected ({hd},)")
    return q, k, wq, wk, cos, sin, (T, nh, nkv, hd)


def counter_buffer(*, backend: Backend | None = None):
    """Zeroed int32 counts (ATTN_MAX_T of them) for the kernels whose last block to get there finishes the
    launch (norm_rope_attention: one per token); each launch leaves them at 0. One per stream of launches."""
    return _backend(backend).xp.zeros((ATTN_MAX_T,), dtype=np.int32)


def fuses_norm_rope_attention(T: int, nh: int, hd: int) -> bool:
    """Whether :func:`norm_rope_attention` runs these sizes in one launch: head_dim <= ATTN_HEAD_DIM,
    heads x head_dim <= ATTN_COLS and a multiple of 32, tokens x head_dim <= ATTN_KV, tokens <= ATTN_MAX_T."""
    cols = nh * hd
    return hd <= ATTN_HEAD_DIM and cols <= ATTN_COLS and cols % 32 == 0 and T * hd <= ATTN_KV and T <= ATTN_MAX_T


def norm_rope_attention(q, k, v, wq, wk, eps: float, cos, sin, *, sync=None, backend: Backend | None = None) -> tuple:
    """:func:`qk_norm_rope`, :func:`attention_core` of its rotated q / k with v, and :func:`act_digits`
    of the context (the tensor-core attn_output product's input) for a short prompt: ``(qn, kn, qr, kr,
    scores, probs, ctx, digits)``, bit for bit those three, from one launch (kernel
    ``norm_rope_attention``, a block per token and kv head) where :func:`fuses_norm_rope_attention` holds,
    else from those three. ``sync``: :func:`counter_buffer`'s counts (a fresh one where None)."""
    be = _backend(backend)
    q, k, wq, wk, cos, sin, (T, nh, nkv, hd) = _qk_args("norm_rope_attention", q, k, wq, wk, cos, sin, be)
    v = _kv_check("norm_rope_attention", k, v, T, nh, nkv, hd, be)
    cols = nh * hd
    if not fuses_norm_rope_attention(T, nh, hd):
        qn, kn, qr, kr = qk_norm_rope(q, k, wq, wk, eps, cos, sin, backend=be)
        scores, probs, ctx = attention_core(qr, kr, v, backend=be)
        return qn, kn, qr, kr, scores, probs, ctx, act_digits(ctx, backend=be)
    xp = be.xp
    qn, qr = (xp.empty(q.shape, dtype=np.float32) for _ in range(2))
    kn, kr = (xp.empty(k.shape, dtype=np.float32) for _ in range(2))
    scores, probs = (xp.empty((T, nh, T), dtype=np.float32) for _ in range(2))
    ctx = xp.empty((T, cols), dtype=np.float32)
    digits = _digits_out("norm_rope_attention", T, cols, be)
    if sync is None:
        sync = counter_buffer(backend=be)
    elif not (be.is_array(sync) and sync.dtype == np.int32 and sync.size >= ATTN_MAX_T):
        raise KernelError("norm_rope_attention: sync must be counter_buffer()'s int32 counts")
    if T:
        be.launch("norm_rope_attention", (T * nkv, 1, 1), (ATTN_THREADS, 1, 1),
                  (q, k, v, np.int32(T), np.int32(nh), np.int32(nkv), np.int32(hd), wq, wk, np.float32(eps), cos, sin,
                   np.float32(np.sqrt(hd)), qn, kn, qr, kr, scores, probs, ctx, *digits, sync))
    return qn, kn, qr, kr, scores, probs, ctx, digits


def rope_neox(x, cos, sin, *, backend: Backend | None = None):
    """NEOX RoPE of ``x`` float32 ``[T, heads, hd]`` with ``cos``/``sin`` ``[T, hd/2]`` (any shape of that size)."""
    be = _backend(backend)
    x, cos, sin = (_f32c(f"rope_neox: {n}", a, be) for n, a in (("x", x), ("cos", cos), ("sin", sin)))
    T, heads, hd = (int(s) for s in x.shape)
    if hd % 2 or int(cos.size) != T * (hd // 2) or int(sin.size) != T * (hd // 2):
        raise KernelError(f"rope_neox: x {x.shape} with cos {cos.shape} / sin {sin.shape}")
    out = be.xp.empty(x.shape, dtype=np.float32)
    if x.size:
        be.launch("rope_neox", _elementwise_grid(int(x.size)), (ELEMENTWISE_THREADS, 1, 1),
                  (x, np.int32(T), np.int32(heads), np.int32(hd), cos, sin, out))
    return out


def _binary_args(kernel: str, a, b, be: Backend):
    a, b = _f32c(f"{kernel}: a", a, be), _f32c(f"{kernel}: b", b, be)
    if tuple(a.shape) != tuple(b.shape):
        raise KernelError(f"{kernel}: shapes {a.shape} and {b.shape} differ")
    return a, b


def _binary(kernel: str, a, b, be: Backend):
    a, b = _binary_args(kernel, a, b, be)
    out = be.xp.empty(a.shape, dtype=np.float32)
    if a.size:
        be.launch(kernel, _elementwise_grid(int(a.size)), (ELEMENTWISE_THREADS, 1, 1),
                  (a, b, np.int64(a.size), out))
    return out


def swiglu(g, u, *, digits: bool = False, backend: Backend | None = None):
    """``g / (1 + exp(-g)) * u`` elementwise. ``digits``: ``(out, act_digits(out))`` over the rows of
    the last axis (the down projection's input), bit for bit, from one launch (kernel
    ``swiglu_digits``, a block per row) where the rows have up to ROW_BLOCK_COLS columns, a multiple of 32."""
    be = _backend(backend)
    if not digits:
        return _binary("swiglu", g, u, be)
    g, u = _binary_args("swiglu", g, u, be)
    n = int(g.shape[-1])
    rows = int(g.size) // max(n, 1)
    if not _fused_digits(n):
        out = _binary("swiglu", g, u, be)
        return out, act_digits(out.reshape(rows, n), backend=be)
    out = be.xp.empty(g.shape, dtype=np.float32)
    return _fused_with_digits("swiglu", out, rows, n, be, lambda dg: be.launch(
        "swiglu_digits", (rows, 1, 1), (DIGITS_THREADS, 1, 1), (g, u, np.int32(rows), np.int32(n), out, *dg)))


def add(a, b, *, backend: Backend | None = None):
    """``a + b`` elementwise (float32, same shapes)."""
    return _binary("add_f32", a, b, _backend(backend))
