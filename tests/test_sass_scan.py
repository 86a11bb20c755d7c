"""benchmarks/sass_scan.py on real cuobjdump output (tests/data/sass): the loops that index a register array
at run time are flagged, whether nvcc put the array in local memory (halving.cu's loop form: flagged as
local memory) or read it through index tests and predicated moves (version Z's attention_core, NOTES step
66: flagged as a runtime index); the template form of the same halving has no loop at all. Loops of generic
loads (a pointer nvcc could not place in global or shared memory, NOTES step 76) are flagged too."""
from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "sass"


def test_runtime_register_index_is_flagged_in_both_forms(bench_script):
    S = bench_script("sass_scan")
    funcs = S.parse_sass((DATA / "halving-sm90.sass").read_text())
    assert set(funcs) == {"halve_loop", "halve_template"}
    assert S.loops(funcs["halve_template"], least=0) == []  # every level unrolled: straight-line code
    loop_form = S.loops(funcs["halve_loop"], least=0)
    assert [lp.row()["loop"] for lp in loop_form] == ["0x340-0x540", "0x580-0x780"]  # levels 16 and 8
    assert all(lp.local_heavy and not lp.runtime_index and lp.ops["SHFL.BFLY"] == 4 for lp in loop_form)
    assert S.loops(funcs["halve_loop"]) == []  # shorter than LOOP_MIN: listed only when asked

    z = S.parse_sass((DATA / "attention-core-z-loop-sm90.sass").read_text())["attention_core"]
    (lp,) = S.loops(z)
    row = lp.row()
    assert row["loop"] == "0x1f4e0-0x20bb0" and row["insns"] == 366 and row["local"] == 0
    assert row["index_tests"] >= S.INDEX_TESTS and lp.runtime_index and row["flag"] == "runtime index"
    assert lp.ops["P2R"] == 40  # the predicates of the index tests kept in registers


def test_a_clean_loop_and_spills_are_not_a_runtime_index(bench_script):
    S = bench_script("sass_scan")
    body = ["        /*0100*/                   LDG.E.CONSTANT R4, desc[UR4][R2.64] ;",
            "        /*0110*/                   FFMA R5, R4, R4, R5 ;",
            "        /*0120*/                   STL [R1], R5 ;",
            "        /*0130*/                   LDL R5, [R1] ;",
            "        /*0140*/               @P0 ISETP.EQ.AND P1, PT, R6, 0x4, PT ;",
            "        /*0150*/               @P0 BRA 0x100 ;"]
    (lp,) = S.loops(S.parse_sass("\t\tFunction : k\n" + "\n".join(body))["k"], least=0)
    assert lp.size == 6 and lp.local == 2 and lp.ops["ISETP.EQ.AND"] == 1 and lp.ops["BRA"] == 1
    assert not lp.runtime_index and not lp.local_heavy and lp.row()["flag"] == ""  # a spilled value, one test
    assert S.opcode("@!P2 IMAD.MOV.U32 R10, RZ, RZ, R95") == "IMAD.MOV.U32"


def test_generic_loads_in_a_loop_are_flagged(bench_script):
    """Version AB's staged Q6_K pass (a real loop, tests/data/sass): its weight words read by generic loads
    through a pointer that was shared or global are flagged; the same loads as LDG / LDS are not, nor is a
    generic load or two."""
    S = bench_script("sass_scan")
    funcs = S.parse_sass((DATA / "experts-mma-q6k-staged-generic-loop-sm90.sass").read_text())
    (lp,) = S.loops(funcs["_Z15qmm_experts_mmaILi14ELi1ELi0EEvPKhS1_xxiiPKjPKfS5_iPKiS7_PfS8_ii"])
    row = lp.row()
    assert row["loop"] == "0xe540-0x10a40" and row["insns"] == 593 and row["local"] == 0
    # 2 rows x (8 + 4 + 4 words, each two 16-bit halves) and the 2 rows' f16 d: every weight load generic
    assert lp.ops["LD.E.U16"] == row["generic"] == 66 >= S.GENERIC_OPS
    assert lp.generic_heavy and not lp.runtime_index and row["flag"] == "generic memory"
    body = ["        /*0100*/                   LDS.U16 R4, [R2] ;",
            "        /*0110*/                   LDG.E.CONSTANT R5, desc[UR4][R6.64] ;",
            "        /*0120*/                   LD.E R7, desc[UR4][R8.64] ;",
            "        /*0130*/                   STS [R2], R5 ;",
            "        /*0140*/               @P0 BRA 0x100 ;"]
    (clean,) = S.loops(S.parse_sass("\t\tFunction : k\n" + "\n".join(body))["k"], least=0)
    assert clean.generic == 1 and not clean.generic_heavy and clean.row()["flag"] == ""


def test_instances_source_takes_every_template_kernel(bench_script):
    from pytest_moeparity.gpu import kernels as K

    S = bench_script("sass_scan")
    src = S.instances_source(K.KERNELS_CU, K.NAME_EXPRESSIONS)
    assert src.startswith(f'#include "{K.KERNELS_CU}"')
    templates = [n for n in K.NAME_EXPRESSIONS if "<" in n]
    assert templates and all(src.count(f"(void)&{n};") == 1 for n in templates)
    assert "(void)&attention_core;" not in src  # extern "C" kernels are compiled without being named
