"""CPU emulator of ``kernels.cu`` (development and test aid, not a backend users pick).

It compiles the very same ``kernels.cu`` as plain C++ (``g++``, ``MOEPARITY_EMULATOR``
defined, see ``emu_runtime.cpp``) into a shared library and runs every launch thread by
thread, the threads of a block as coroutines that meet at the warp reduction and at the block
barrier (``__syncthreads``). Arrays are NumPy arrays; each launch copies its array arguments
next to a guard page, so reading past the end of any argument is reported as an error naming
that argument, and a warp whose lanes do not all reach the reduction, or a block stuck at its
barrier, is reported too. Floating-point results are bit-identical to the GPU's: the kernels use
explicit ``fmaf`` and non-contracted multiplies/adds.

:class:`EmulatorBackend` plugs into :mod:`.kernels` and :mod:`.forward` in place of CuPy
(``xp = numpy``), so the whole GPU code path can be checked on a machine without a GPU:

    from pytest_moeparity.gpu.emulator import EmulatorBackend
    engine = CupyEngine(model, backend=EmulatorBackend())
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from . import kernels as K

RUNTIME_CPP = Path(__file__).with_name("emu_runtime.cpp")

_LIBS: dict[tuple[str, ...], ctypes.CDLL] = {}  # by extra options (a backend variant's switches)
_LIB_LOCK = threading.Lock()


class EmulatorUnavailable(RuntimeError):
    pass


def _table_source() -> str:
    rows = []
    for expr in K.NAME_EXPRESSIONS:
        rows.append(f'    {{"{expr}", [](void** a) {{ mp_call(&{expr}, a); }}, '
                    f'[](int* c, int m) {{ return mp_signature(&{expr}, c, m); }}}},')
    return "static const MpEntry mp_table[] = {\n" + "\n".join(rows) + "\n};\n"


def build_library(cache_dir: str | os.PathLike | None = None, extra_options: tuple[str, ...] = ()) -> Path:
    """Compile the emulator library (cached by a hash of the sources and options; ``extra_options``: -D
    switches added to compile_options()'s) and return its path."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise EmulatorUnavailable("no C++ compiler (g++) found")
    table = _table_source()
    options = K.compile_options() + tuple(extra_options)
    src = " ".join(options) + K.kernel_source() + RUNTIME_CPP.read_text(encoding="utf-8") + table
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("MOEPARITY_EMU_CACHE") or Path(tempfile.gettempdir()) / "moeparity-emu")
    root.mkdir(parents=True, exist_ok=True)
    lib = root / f"libmoeparity_emu_{digest}.so"
    if lib.exists():
        return lib
    work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        (work / "table.inc").write_text(table, encoding="utf-8")
        shutil.copy(K.KERNELS_CU, work / "kernels.cu")
        cmd = [cxx, "-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
               "-Wall", "-Wno-unused-function",
               f'-DMP_KERNELS_PATH="{work / "kernels.cu"}"', f'-DMP_TABLE_PATH="{work / "table.inc"}"',
               *(o for o in options if o.startswith("-D")),
               str(RUNTIME_CPP), "-o", str(work / "lib.so")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise EmulatorUnavailable("building the kernel emulator failed:\n" + " ".join(cmd) + "\n" + res.stderr[-8000:])
        os.replace(work / "lib.so", lib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def load_library(extra_options: tuple[str, ...] = ()):
    key = tuple(extra_options)
    with _LIB_LOCK:
        if key not in _LIBS:
            lib = ctypes.CDLL(str(build_library(extra_options=key)))
            lib.emu_launch.restype = ctypes.c_int
            lib.emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
                ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                ctypes.POINTER(ctypes.c_void_p)]
            lib.emu_signature.restype = ctypes.c_int
            lib.emu_signature.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
            lib.emu_guarded_alloc.restype = ctypes.c_void_p
            lib.emu_guarded_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p),
                                              ctypes.POINTER(ctypes.c_size_t)]
            lib.emu_guarded_free.restype = None
            lib.emu_guarded_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _check_signatures(lib)
            _LIBS[key] = lib
        return _LIBS[key]


def _check_signatures(lib) -> None:
    """The Python-side signatures (parsed from kernels.cu) must agree with the C++ compiler's."""
    for expr in K.NAME_EXPRESSIONS:
        codes = (ctypes.c_int * 64)()
        n = lib.emu_signature(expr.encode(), codes, 64)
        params = K.signatures()[expr.split("<", 1)[0]]
        if n != len(params):
            raise EmulatorUnavailable(f"{expr}: C++ sees {n} parameters, the parser {len(params)}")
        for i, p in enumerate(params):
            want = 0 if p.pointer else (100 if p.dtype.kind == "f" else 200) + p.dtype.itemsize
            if codes[i] != want:
                raise EmulatorUnavailable(f"{expr}: parameter {i} ({p.ctype}) is code {codes[i]} in C++, "
                                          f"{want} from the parser")


_SCALAR_CTYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
                  np.dtype(np.float32): ctypes.c_float, np.dtype(np.uint8): ctypes.c_uint8}


class EmulatorBackend(K.Backend):
    """NumPy arrays + kernels run by the CPU emulator. ``free_bytes`` fakes the free device memory
    (to exercise the streaming path); ``guard`` copies arrays next to guard pages at each launch."""

    name = "emulator"

    def __init__(self, free_bytes: int = 64 << 30, total_bytes: int | None = None, guard: bool = True,
                 extra_options: tuple[str, ...] = ()):
        self.xp = np
        self.mma = True  # runs qmm_experts_mma (the mma as a warp-wide exchange), as a device of compute capability 8.0+
        self.extra_options = tuple(extra_options)
        self.lib = load_library(self.extra_options)
        self.free_bytes = int(free_bytes)
        self.total_bytes = int(total_bytes if total_bytes is not None else max(free_bytes, 80 << 30))
        self.guard = guard
        self.launches: list[str] = []
        self.oom_errors = (MemoryError,)

    def _with_options(self, extra_options):
        return EmulatorBackend(self.free_bytes, self.total_bytes, self.guard, extra_options)

    def is_array(self, a):
        return isinstance(a, np.ndarray)

    def asnumpy(self, a):
        return np.array(a, copy=True)

    def to_device(self, host):
        return np.array(host, copy=True, order="C")

    def mem_info(self):
        return self.free_bytes, self.total_bytes

    def launch(self, name, grid, block, args):
        K.check_args(name, args, self.is_array)
        if name not in K.NAME_EXPRESSIONS:
            raise K.KernelError(f"kernel {name!r} is not among the compiled name expressions")
        sig = K.signatures()[name.split("<", 1)[0]]
        keep = []          # ctypes objects that must outlive the call
        guarded = []       # (index, array, data_ptr, base, length)
        same = {}          # (address, bytes) -> guarded data: an array passed twice is one buffer, as on a GPU
        written = set()    # guarded data that a non-const parameter points to
        ptrs = (ctypes.c_void_p * len(args))()
        try:
            for i, (p, a) in enumerate(zip(sig, args)):
                if p.pointer:
                    if self.guard and (a.ctypes.data, a.nbytes) in same:
                        holder = ctypes.c_void_p(same[(a.ctypes.data, a.nbytes)])
                        if not p.const:
                            written.add(holder.value)
                    elif self.guard:
                        base, length = ctypes.c_void_p(), ctypes.c_size_t()
                        data = self.lib.emu_guarded_alloc(max(a.nbytes, 0), a.ctypes.data % 16, ctypes.byref(base),
                                                          ctypes.byref(length))
                        if not data:
                            raise MemoryError("emulator: guarded allocation failed")
                        if a.nbytes:
                            ctypes.memmove(data, a.ctypes.data, a.nbytes)
                        guarded.append((i, p, a, data, base.value, length.value))
                        same[(a.ctypes.data, a.nbytes)] = data
                        if not p.const:
                            written.add(data)
                        holder = ctypes.c_void_p(data)
                    else:
                        holder = ctypes.c_void_p(a.ctypes.data)
                else:
                    holder = _SCALAR_CTYPES[p.dtype](a.item())
                keep.append(holder)
                ptrs[i] = ctypes.cast(ctypes.pointer(holder), ctypes.c_void_p)
            err = ctypes.create_string_buffer(512)
            fault = ctypes.c_void_p()
            uses_warp = name.split("<", 1)[0] in K.WARP_KERNELS
            g = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
            b = tuple(int(v) for v in block) + (1,) * (3 - len(block))
            rc = self.lib.emu_launch(name.encode(), *g, *b, ptrs, int(uses_warp), err, 512, ctypes.byref(fault))
            self.launches.append(name)
            self._count_launch()
            if rc == -1:
                raise K.KernelError(f"emulator: unknown kernel {name}")
            if rc == 1:
                raise K.KernelError(f"{name} grid={g} block={b}: {err.value.decode()}")
            if rc in (2, 3):
                addr = fault.value or 0
                where = "an address outside every argument"
                for i, p, a, data, base, length in guarded:
                    if base <= addr < base + length:
                        where = (f"argument {i} ({p.ctype} {p.name}, {a.nbytes} bytes): "
                                 f"offset {addr - data} from its start")
                what = "out-of-bounds access" if rc == 2 else f"misaligned {err.value.decode()}-byte load"
                raise K.KernelError(f"{name} grid={g} block={b}: {what} at {where}")
            for i, p, a, data, base, length in guarded:
                if data in written and a.nbytes:
                    ctypes.memmove(a.ctypes.data, data, a.nbytes)
        finally:
            for i, p, a, data, base, length in guarded:
                self.lib.emu_guarded_free(base, length)
