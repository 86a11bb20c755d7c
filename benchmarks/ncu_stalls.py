"""Where a kernel's warps stall, from Nsight Compute's per-instruction samples (no GPU needed):

    ncu ... --section SourceCounters -o rep python3 benchmarks/ncu_forward.py ...
    ncu -i rep.ncu-rep --page source --csv --print-source sass > source.csv
    python benchmarks/ncu_stalls.py source.csv [--top 12] [--only qmm_experts_mma]

For each profiled launch in the export: its warp-stall samples, their split by reason, the long-scoreboard
samples (a warp waiting on a load's result) by the opcode of the instruction that waited (the first use
of a load: benchmarks/NOTES.md step 74 read gate / up's weight and digit waits off it), and the SASS lines
with the most samples. A development aid next to ncu_forward.py; `benchmarks/ncu_run.sh` runs both.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from dataclasses import dataclass, field

ALL = "Warp Stall Sampling (All Samples)"


@dataclass
class Launch:
    kernel: str
    rows: list[dict] = field(default_factory=list)

    def samples(self) -> float:
        return sum(_num(r.get(ALL)) for r in self.rows)

    def reasons(self) -> Counter:
        """stall reason -> samples (the export's stall_* columns over all samples; their "(Not Issued)" twins,
        a subset, are left out)"""
        c: Counter = Counter()
        for r in self.rows:
            for k, v in r.items():
                if k.startswith("stall_") and "Not Issued" not in k:
                    c[k[len("stall_"):]] += _num(v)
        return c

    def waits_by_opcode(self, reason: str = "long_sb") -> Counter:
        c: Counter = Counter()
        for r in self.rows:
            c[opcode(r.get("Source", ""))] += _num(r.get("stall_" + reason))
        return c


def _num(v) -> float:
    try:
        return float(str(v).replace(",", "")) if v not in (None, "") else 0.0
    except ValueError:
        return 0.0


def opcode(source: str) -> str:
    """`@P0 LDG.E.64 R2, ...` -> `LDG`: the instruction's base opcode, its guard and modifiers dropped."""
    parts = source.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0].split(".")[0] if parts else ""


def parse(text: str) -> list[Launch]:
    """An `ncu --page source --csv --print-source sass` export -> one Launch per `"Kernel Name"` block (ncu
    2025.3 writes each launch's block twice: a block the same as the one before it is left out)."""
    launches, seen = [], None
    for block in text.split('"Kernel Name",')[1:]:
        head, _, body = block.partition("\n")
        name = next(csv.reader([head]))[0]
        rows = [r for r in csv.DictReader(io.StringIO(body)) if r.get("Address")]
        key = (name, tuple((r["Address"], r.get(ALL)) for r in rows))
        if key != seen:
            launches.append(Launch(name, rows))
        seen = key
    return launches


def report(launches: list[Launch], top: int = 12, only: str | None = None) -> str:
    out = []
    for i, la in enumerate(launches):
        if only and only not in la.kernel:
            continue
        tot = la.samples()
        if not tot:
            continue
        pct = lambda v: f"{100 * v / tot:.1f} %"  # noqa: E731
        out.append(f"## launch {i}: {la.kernel[:110]}")
        out.append(f"samples {tot:.0f}; by reason: " + ", ".join(f"{k} {pct(v)}" for k, v in la.reasons().most_common(6) if v))
        ls = la.waits_by_opcode()
        out.append("long scoreboard by the waiting instruction: " + ", ".join(f"{k} {pct(v)}" for k, v in ls.most_common(6) if v))
        rows = sorted(la.rows, key=lambda r: -_num(r.get(ALL)))[:top]
        for r in sorted(rows, key=lambda r: int(r["Address"], 16) if r["Address"].startswith("0x") else 0):
            out.append(f"  {r['Address']:>16} {_num(r.get(ALL)):7.0f} ({pct(_num(r.get(ALL)))}, long sb "
                       f"{_num(r.get('stall_long_sb')):5.0f})  {r.get('Source', '').strip()[:80]}")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu -i REP --page source --csv --print-source sass > this file")
    ap.add_argument("--top", type=int, default=12, help="SASS lines with the most samples, per launch")
    ap.add_argument("--only", default=None, help="launches whose kernel name contains this")
    args = ap.parse_args(argv)
    with open(args.csv, encoding="utf-8", errors="replace") as f:
        launches = parse(f.read())
    if not launches:
        raise SystemExit(f"{args.csv}: no 'Kernel Name' block (an ncu --page source --csv export?)")
    print(report(launches, args.top, args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
