"""One CuPy forward between cudaProfilerStart and cudaProfilerStop, for Nsight Compute:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        python benchmarks/ncu_forward.py --model /tmp/30b4.gguf --tokens 3

The kernels are compiled and the weights uploaded by warm-up forwards first, so the profiled range
holds exactly the kernels of one eager forward of that many tokens (nothing captured). Prints the
prompt length and the wall time of the profiled forward (meaningless under ncu's replay; a check
that it ran). A development aid next to profile_gpu.py, not a benchmark of record.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from pytest_moeparity.model import load_model  # noqa: E402
from pytest_moeparity.parity import default_tokens  # noqa: E402
from pytest_moeparity.plan import SavePlan  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=3)
    ap.add_argument("--act", default="float32")
    args = ap.parse_args(argv)

    import cupy as cp
    from cupy.cuda import runtime

    from pytest_moeparity.gpu import CupyEngine
    from pytest_moeparity.gpu import kernels as K

    K.set_debug(False)
    engine = CupyEngine(load_model(args.model), act_dtype=args.act)
    tokens = default_tokens(engine.model.config.vocab, args.tokens)
    for _ in range(2):
        engine.run(tokens, SavePlan.empty())
    cp.cuda.Device().synchronize()
    runtime.profilerStart()
    t0 = time.perf_counter()
    engine.run(tokens, SavePlan.empty())
    cp.cuda.Device().synchronize()
    runtime.profilerStop()
    print(f"{args.tokens} tokens: profiled forward {1e3 * (time.perf_counter() - t0):.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
