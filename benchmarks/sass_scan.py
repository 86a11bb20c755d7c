"""Static scan of kernels.cu's machine code, no GPU needed: every kernel and template instance kernels.py
launches, compiled by nvcc for one architecture and disassembled by cuobjdump, with per kernel its
instructions, its local-memory (spill) instructions, and each loop of 60 or more instructions with what
it holds (loads, mma, shuffles, selects, local memory). Three kinds of loop are flagged. A register array
indexed at run time: nvcc reads and writes it through chains of index tests (`ISETP.EQ`, INDEX_TESTS or
more in the loop) and predicated moves over its registers, as version Z's attention_core did, spending
~4500 instructions a chunk of 32 positions where ~770 do (benchmarks/NOTES.md step 66), or through local
memory. Local memory in a loop (LOCAL_OPS or more instructions): such an array, or spilled registers.
Generic loads or stores in a loop (GENERIC_OPS or more `LD` / `ST`, neither `LDG` / `STG` nor `LDS` / `STS`):
a pointer nvcc could not place in global or shared memory, as the staged weight rows of version AB's
tensor-core products, read through a variable that held either a global or a shared address (step 76:
read by `LDS`, the 64-token forward 2.6 % faster).

    python benchmarks/sass_scan.py [--arch sm_90] [-D NAME=VALUE ...] [--only attention_core] [--out F]

nvcc is on the development machines (CUDA 13.0); cuobjdump comes with the PyPI package
nvidia-cuda-cuobjdump (`--cuobjdump`, else the one on PATH or in that package). A development aid.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

LOOP_MIN = 60        # loops shorter than this are not listed
INDEX_TESTS = 16     # a loop with this many ISETP.EQ tests reads a register array by a runtime index
LOCAL_OPS = 8        # ... or with this many local-memory instructions (a spilled value or two is not that)
GENERIC_OPS = 8      # a loop with this many generic loads / stores reads through a pointer of unknown space
_FUNC = re.compile(r"^\s*Function : (\S+)")
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")


@dataclass
class Loop:
    start: int
    end: int
    ops: Counter = field(default_factory=Counter)

    @property
    def size(self) -> int:
        return sum(self.ops.values())

    @property
    def local(self) -> int:
        return sum(n for op, n in self.ops.items() if op.startswith(("LDL", "STL")))

    @property
    def index_tests(self) -> int:
        return sum(n for op, n in self.ops.items() if op.startswith("ISETP.EQ"))

    @property
    def generic(self) -> int:
        """Generic loads and stores (`LD`, `ST`: the address may be global, shared or local)."""
        return sum(n for op, n in self.ops.items() if op.split(".")[0] in ("LD", "ST"))

    @property
    def runtime_index(self) -> bool:
        """A register array read through index tests and predicated moves."""
        return self.index_tests >= INDEX_TESTS

    @property
    def local_heavy(self) -> bool:
        """Local memory in the loop: an array indexed at run time, or spilled registers."""
        return self.local >= LOCAL_OPS

    @property
    def generic_heavy(self) -> bool:
        """Memory reached by generic loads or stores in the loop: a pointer of unknown space."""
        return self.generic >= GENERIC_OPS

    def row(self) -> dict:
        pick = lambda *ps: sum(n for op, n in self.ops.items() if op.startswith(ps))  # noqa: E731
        return {"loop": f"{self.start:#x}-{self.end:#x}", "insns": self.size, "loads": pick("LDG", "LDS", "LD."),
                "mma": pick("IMMA", "HMMA"), "shuffles": pick("SHFL"), "selects": pick("SEL", "FSEL"),
                "index_tests": self.index_tests, "local": self.local, "generic": self.generic,
                "flag": "runtime index" if self.runtime_index else "local memory" if self.local_heavy
                else "generic memory" if self.generic_heavy else ""}


def opcode(text: str) -> str:
    """The opcode of one SASS instruction's text, its predicate guard dropped."""
    parts = text.split()
    return parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass output -> {function: [(address, instruction text), ...]} in address order."""
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _INSN.match(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def loops(insns: list[tuple[int, str]], least: int = LOOP_MIN) -> list[Loop]:
    """Each backward branch's span (target .. branch) holding at least ``least`` instructions, with the
    count of each opcode in it (an outer loop's count includes its inner loops')."""
    found = []
    for addr, text in insns:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            ops = Counter(opcode(t) for a, t in insns if lo <= a <= addr)
            if sum(ops.values()) >= least:
                found.append(Loop(lo, addr, ops))
    return found


def instances_source(kernels_cu: Path, names) -> str:
    """A translation unit that includes kernels.cu and instantiates every template kernel of ``names``
    (kernels.py's NAME_EXPRESSIONS: `qmm_dense_mma<12,3>` ...) by taking its address in host code; the
    extern "C" kernels are compiled anyway."""
    lines = [f'#include "{kernels_cu}"', "void mp_sass_scan_instances() {"]
    lines += [f"    (void)&{name};" for name in names if "<" in name]
    return "\n".join(lines + ["}", ""])


def _cuobjdump(given: str | None) -> str:
    if given:
        return given
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia  # the PyPI package nvidia-cuda-cuobjdump puts it under nvidia/cu*/bin
        for root in nvidia.__path__:
            for cand in sorted(Path(root).glob("cu*/bin/cuobjdump")):
                return str(cand)
    except ImportError:
        pass
    raise SystemExit("no cuobjdump: pip install nvidia-cuda-cuobjdump, or pass --cuobjdump")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("-D", dest="defines", action="append", default=[], help="a kernels.cu switch, NAME=VALUE")
    ap.add_argument("--only", default=None, help="kernels whose name contains this")
    ap.add_argument("--nvcc", default=shutil.which("nvcc"))
    ap.add_argument("--cuobjdump", default=None)
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if not args.nvcc:
        ap.error("no nvcc on PATH (--nvcc)")
    from tabulate import tabulate

    from pytest_moeparity.gpu import kernels as K

    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "instances.cu", Path(tmp) / "k.cubin"
        src.write_text(instances_source(K.KERNELS_CU, K.NAME_EXPRESSIONS))
        cmd = [args.nvcc, f"-arch={args.arch}", "-std=c++17", "-cubin", "-o", str(cubin), str(src)]
        cmd += [f"-D{d}" for d in args.defines]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"nvcc failed:\n{res.stderr[-4000:]}")
        sass = subprocess.run([_cuobjdump(args.cuobjdump), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    rows, indexed, local, generic = [], [], [], []
    for name, insns in sorted(parse_sass(sass).items()):
        if args.only and args.only not in name:
            continue
        ops = Counter(opcode(t) for _, t in insns)
        found = loops(insns)
        rows.append({"kernel": name, "loop": "(all)", "insns": len(insns),
                     "local": sum(n for op, n in ops.items() if op.startswith(("LDL", "STL")))})
        rows += [{"kernel": "", **lp.row()} for lp in found]
        indexed += [name] if any(lp.runtime_index for lp in found) else []
        local += [name] if any(lp.local_heavy for lp in found) else []
        generic += [name] if any(lp.generic_heavy for lp in found) else []
    print(tabulate(rows, headers="keys", tablefmt="github"))
    print("loops reading a register array by index tests:", ", ".join(indexed) or "none")
    print("loops with local memory (such an array, or spills):", ", ".join(local) or "none")
    print("loops with generic loads or stores (a pointer of unknown space):", ", ".join(generic) or "none")
    if args.out:
        Path(args.out).write_text(json.dumps({"arch": args.arch, "defines": args.defines, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
