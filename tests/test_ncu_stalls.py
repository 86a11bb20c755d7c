"""benchmarks/ncu_stalls.py on a real Nsight Compute export (tests/data/ncu: rows of the source page of
an H100 profile, NOTES step 74): ncu writes each launch's block twice and the parser keeps one; the
samples, their reasons and the long-scoreboard waits by opcode are the rows' own sums."""
from __future__ import annotations

import csv
import io
from pathlib import Path

EXPORT = Path(__file__).resolve().parent / "data" / "ncu" / "source-sass-excerpt.csv"


def _column_sums(block: str, column: str) -> float:
    body = block.partition("\n")[2]
    return sum(float(r[column].replace(",", "") or 0) for r in csv.DictReader(io.StringIO(body)) if r["Address"])


def test_duplicate_blocks_are_dropped_and_sums_are_the_rows(bench_script):
    N = bench_script("ncu_stalls")
    text = EXPORT.read_text()
    blocks = text.split('"Kernel Name",')[1:]
    assert len(blocks) == 3 and blocks[0] == blocks[1]  # gate / up written twice, then down
    launches = N.parse(text)
    assert [la.kernel.split("(")[0] for la in launches] == ["void qmm_experts_mma<", "void qmm_experts_mma<"]
    assert "(int)12, (int)0, (int)0" in launches[0].kernel and "(int)14, (int)1, (int)0" in launches[1].kernel
    for la, block in zip(launches, (blocks[0], blocks[2])):
        assert la.samples() == _column_sums(block, N.ALL) > 0
        assert la.reasons()["long_sb"] == _column_sums(block, "stall_long_sb")
        assert sum(la.waits_by_opcode().values()) == la.reasons()["long_sb"]


def test_gate_up_waits_on_its_weights_first_use(bench_script):
    N = bench_script("ncu_stalls")
    gate_up, down = N.parse(EXPORT.read_text())
    waits = gate_up.waits_by_opcode()
    assert waits.most_common(2)[0][0] == "SHF" and waits.most_common(2)[1][0] == "SEL"  # weights' nibbles, digits
    assert down.waits_by_opcode().most_common(1)[0][0] == "WARPSYNC"  # the staged rows' barrier
    text = N.report([gate_up, down], top=3, only="(int)14")
    assert "launch 1" in text and "launch 0" not in text and text.count("WARPSYNC.ALL") == 1


def test_opcode_drops_guard_and_modifiers(bench_script):
    N = bench_script("ncu_stalls")
    assert N.opcode("@!P1 LDG.E.64.CONSTANT R26, desc[UR4][R46.64]") == "LDG"
    assert N.opcode("SHF.R.U32.HI R74, RZ, 0x4, R44") == "SHF"
    assert N.opcode("") == ""
