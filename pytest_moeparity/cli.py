"""``moeparity``: make test models, trace a forward, run a parity check, diff saved traces.

Every error is one line on stderr and a non-zero exit (2 for bad input, 1 for a failed check).
``check`` takes the bisection switches ``--isolated``, ``--forced-routing``, ``--no-drilldown``
and ``--inject SPEC`` (faults planted in the candidate; see pytest_moeparity.bisect);
``diff`` compares safetensors traces and aprender dump directories in any combination: only
the stages both sides hold, at the layers both hold (a note names what was left out; a saved
trace cannot be asked for more, so that is no Missing), within ``--stages``/``--layers``.
With ``--json PATH`` a heatmap PNG is written next to it (``--png PATH`` to choose; needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .model import ModelError
from .plan import PlanError


class CliError(Exception):
    pass


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise CliError(f"{what} must be a comma list of integers, got {text!r}") from None
    if not vals:
        raise CliError(f"empty {what}: give at least one integer")
    return vals


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", default="all", help="'all' or a comma list of stages/aliases (default all)")
    p.add_argument("--layers", default="all", help="'all', N, START..END (END exclusive) or a list (default all)")
    p.add_argument("--positions", default="all", help="'all', 'last' or a list of token positions (default all)")
    p.add_argument("--experts", default="routed", help="experts for per-expert stages: 'routed', 'all' or a list")


def _plan(args):
    from .plan import SavePlan

    return SavePlan.parse(args.stages, args.layers, args.positions, args.experts)


def _load(path_spec: str):
    from .builtin import resolve_model_path
    from .model import load_model

    return load_model(resolve_model_path(path_spec))


def cmd_make_model(args) -> int:
    from .make_model import make_model, spec_from_args

    spec = spec_from_args(args.preset, n_layers=args.layers, hidden=args.hidden, n_heads=args.heads,
                          n_kv_heads=args.kv_heads, head_dim=args.head_dim, n_experts=args.experts,
                          n_experts_used=args.experts_used, expert_ff=args.expert_ff, vocab=args.vocab,
                          tied_output=True if args.tied else None)
    res = make_model(args.out, spec, quant=args.quant, seed=args.seed, hot_layer=args.hot_layer,
                     hot_scale=args.hot_scale, jobs=args.jobs, progress=False if args.quiet else None)
    print(f"wrote {res.path} ({res.nbytes / 2**20:.1f} MiB, {res.tensors} tensors) in {res.seconds:.1f} s "
          f"= {res.mb_per_s:.1f} MiB/s")
    return 0


def cmd_info(args) -> int:
    model = _load(args.model)
    print(model.describe())
    for name, t in model.tensors.items():
        if args.tensors:
            print(f"  {name:32s} {t.type_name:6s} {list(t.shape)}")
    return 0


def cmd_trace(args) -> int:
    from .backends import default_registry
    from .parity import default_tokens, run_trace

    model = _load(args.model)
    tokens = _int_list(args.tokens, "--tokens") if args.tokens is not None else default_tokens(model.config.vocab)
    model.validate_tokens(tokens)
    plan = _plan(args)
    plan.resolve_positions(len(tokens))
    backend = args.backend or ("numpy" if args.dtype == "float32" else "numpy-f64")
    trace, dt = run_trace(default_registry(), backend, model, tokens, plan)
    trace.meta["dtype"] = args.dtype if args.backend is None else trace.meta.get("compute_dtype", "")
    out = trace.save(args.out)
    size = sum(v.nbytes for v in trace.tensors.values())
    print(f"{backend}: {len(tokens)} tokens in {dt:.2f} s; {len(trace.tensors)} tensors "
          f"({size / 2**20:.1f} MiB) -> {out}")
    return 0


def _thresholds(args):
    from .metrics import Thresholds

    return Thresholds.from_contract(min_cosine=args.min_cosine, max_rel_l2=args.max_rel_l2,
                                    router_tie_tol=args.router_tie_tol)


def _emit(report, args) -> int:
    print(report.render())
    if args.json:
        report.write_json(args.json)
        print(f"JSON report: {args.json}")
    png = args.png
    if png is None and args.json:
        from .heatmap import png_path_for

        png = png_path_for(args.json)
    if png:
        from .heatmap import MISSING_MATPLOTLIB, write_heatmap

        out = write_heatmap(report, png)
        print(f"heatmap: {out}" if out else f"moeparity: {MISSING_MATPLOTLIB}")
    return 0 if report.ok else 1


def cmd_check(args) -> int:
    from .backends import default_registry
    from .parity import run_parity

    model = _load(args.model)
    print(model.describe())
    tokens = _int_list(args.tokens, "--tokens") if args.tokens is not None else None
    reg = default_registry()
    t0 = time.perf_counter()
    run = run_parity(model, tokens, _plan(args), reference=args.reference, candidate=args.candidate,
                     thresholds=_thresholds(args), registry=reg, save_dir=args.save_dir, faults=args.inject,
                     isolated=args.isolated, forced_routing=args.forced_routing, drilldown=not args.no_drilldown)
    print(f"reference {args.reference} vs candidate {run.candidate.meta.get('backend')} on "
          f"{len(run.reference.tokens)} tokens ({time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in run.seconds.items()) + ")")
    for role, path in run.saved.items():
        print(f"saved {role} trace: {path}")
    return _emit(run.report, args)


def _load_trace_or_dump(path: str):
    """(trace, is_dump). A directory is an aprender-style dump, a file a safetensors trace."""
    from .trace import Trace

    p = Path(path)
    if p.is_dir():
        return None, True
    if not p.exists():
        raise CliError(f"{path}: no such trace file or dump directory")
    try:
        return Trace.load(p), False
    except Exception as exc:  # safetensors raises its own error types on a damaged file
        raise CliError(f"{path}: not a safetensors trace ({type(exc).__name__}: {exc})") from None


def cmd_diff(args) -> int:
    from .aprender import read_dump, stage_sizes
    from .bisect import slice_positions
    from .plan import SavePlan
    from .report import compare_traces

    plan = SavePlan.parse(args.stages, args.layers)  # bad --stages/--layers: exit 2 before reading anything
    ref, ref_dump = _load_trace_or_dump(args.reference)
    cand, cand_dump = _load_trace_or_dump(args.candidate)
    tokens = _int_list(args.tokens, "--tokens") if args.tokens is not None else None
    positions = _int_list(args.positions, "--positions") if args.positions is not None else None
    if positions is not None and len(positions) != 1:
        raise CliError("--positions: a dump holds one position; give one integer")
    full = ref if not ref_dump else cand  # the side that is a full trace (None when both are dumps)
    n_tokens = len(tokens) if tokens is not None else (len(full.tokens) if full is not None and full.tokens else None)
    pos = positions[0] if positions is not None else None
    if pos is None and tokens is None and full is not None and full.positions:
        pos = full.positions[-1]
        if ref_dump or cand_dump:
            print(f"note: assuming the dump holds the last position ({pos}); say --positions or --tokens")
    sizes = stage_sizes(full) if full is not None else None
    kw = dict(tokens=tokens, position=pos, n_tokens=n_tokens, sizes=sizes)
    if ref_dump:
        ref = read_dump(args.reference, **kw)
    if cand_dump:
        cand = read_dump(args.candidate, **kw)
    if ref_dump != cand_dump:
        dump = ref if ref_dump else cand
        want = dump.positions
        if want and full.positions and full.positions != want:
            if not set(want) <= set(full.positions):
                raise CliError(f"the dump holds position {want[0]} but the full trace has positions "
                               f"{full.positions}")
            sliced = slice_positions(full, want)
            if ref_dump:
                cand = sliced
            else:
                ref = sliced
    for side in (ref, cand):
        for w in json.loads(side.meta.get("dump_warnings", "[]")):
            print(f"note: {w}")
        unknown = json.loads(side.meta.get("unknown_stages", "[]"))
        if unknown:
            print(f"note: {side.meta.get('source')}: stage names outside the contract (not compared): "
                  + ", ".join(unknown))
    ref, cand = _narrow_for_diff(ref, cand, plan)
    return _emit(compare_traces(ref, cand, _thresholds(args)), args)


def _drop_unrouted_experts(full, other):
    """Per-expert keys of ``full`` (cut to the other side's position) that the other side lacks
    and whose expert ``full``'s router did not choose at the kept position(s)."""
    import numpy as np

    from .contract import S, parse_key, trace_key
    from .trace import Trace

    out = dict(full.tensors)
    for key in [k for k in out if k not in other]:
        try:
            stage, layer, expert = parse_key(key)
        except ValueError:
            continue
        idx = trace_key(S.moe_router_indices, layer) if layer is not None else None
        if expert is not None and idx in out and expert not in set(np.asarray(out[idx]).ravel().tolist()):
            del out[key]
    return Trace(out, dict(full.meta))


def _narrow_for_diff(ref, cand, plan):
    """Both sides are saved: neither can be asked for more. Compare the stages both hold, at the
    layers both hold (a stage one side holds at a layer the other lacks is still Missing), within
    --stages/--layers; one note line per side for what it holds that was not compared."""
    from .trace import keep_planned, narrow_note, narrow_to

    ref, cand = keep_planned(ref, plan), keep_planned(cand, plan)
    if ref.meta.get("format") == "aprender" and cand.meta.get("format") != "aprender":
        cand = _drop_unrouted_experts(cand, ref)
    elif cand.meta.get("format") == "aprender" and ref.meta.get("format") != "aprender":
        ref = _drop_unrouted_experts(ref, cand)
    ref_cut, r_stages, r_layers = narrow_to(ref, cand)
    cand_cut, c_stages, c_layers = narrow_to(cand, ref)
    for side, other, stages, layers in (("reference", "candidate", r_stages, r_layers),
                                        ("candidate", "reference", c_stages, c_layers)):
        note = narrow_note(side, other, stages, layers)
        if note:
            print(f"note: {note}")
    return ref_cut, cand_cut


def cmd_backends(args) -> int:
    from .backends import default_registry

    reg = default_registry()
    for name in reg.names():
        spec = reg.get(name)
        reason = spec.availability()
        print(f"{name:12s} {'ok' if reason is None else 'unavailable: ' + reason}  {spec.description}")
    print(f"default candidate here: {reg.default_candidate()}")
    return 0


def _add_threshold_args(p) -> None:
    p.add_argument("--min-cosine", type=float, default=None, help="Diverge below this cosine")
    p.add_argument("--max-rel-l2", type=float, default=None, help="Diverge above this relative L2")
    p.add_argument("--router-tie-tol", type=float, default=None, help="router near-tie tolerance")
    p.add_argument("--json", default=None, help="also write the report as JSON here (and a heatmap PNG next to it)")
    p.add_argument("--png", default=None, help="write the layer x stage heatmap PNG here (needs matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    from .make_model import PRESETS, QUANT_CHOICES

    ap = argparse.ArgumentParser(prog="moeparity", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-model", help="write a random Qwen3-MoE GGUF")
    p.add_argument("out")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--quant", default="Q4_K_M", type=str.upper, choices=list(QUANT_CHOICES))
    p.add_argument("--seed", type=int, default=0)
    for flag, dest in (("--layers", "layers"), ("--hidden", "hidden"), ("--heads", "heads"),
                       ("--kv-heads", "kv_heads"), ("--head-dim", "head_dim"), ("--experts", "experts"),
                       ("--experts-used", "experts_used"), ("--expert-ff", "expert_ff"), ("--vocab", "vocab")):
        p.add_argument(flag, dest=dest, type=int, default=None, help="override the preset's value")
    p.add_argument("--tied", action="store_true", help="no output.weight: the head reuses token_embd")
    p.add_argument("--hot-layer", type=int, default=None, help="scale this layer's expert down-projections")
    p.add_argument("--hot-scale", type=float, default=1.0, help="the scale for --hot-layer (e.g. 1e6)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: cores, 1 for small files)")
    p.add_argument("--quiet", action="store_true", help="no progress output (shown for files over 64 MiB)")
    p.set_defaults(fn=cmd_make_model)

    p = sub.add_parser("info", help="describe a model file")
    p.add_argument("model", help="GGUF path or builtin:tiny / builtin:small")
    p.add_argument("--tensors", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("trace", help="run one backend's traced forward and save it as safetensors")
    p.add_argument("model", help="GGUF path or builtin:tiny")
    p.add_argument("--tokens", default=None, help="comma list of token ids (default: a fixed 8-token prompt)")
    _add_plan_args(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--backend", default=None, help="backend name (default: numpy / numpy-f64 by --dtype)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.set_defaults(fn=cmd_trace)

    p = sub.add_parser("check", help="compare a candidate with the reference and print the divergence table")
    p.add_argument("model", nargs="?", default="builtin:tiny", help="GGUF path (default: the built-in tiny model)")
    p.add_argument("--tokens", default=None)
    _add_plan_args(p)
    p.add_argument("--reference", default="numpy")
    p.add_argument("--candidate", default=None, help="default: cupy where a GPU is usable, else numpy-f64")
    p.add_argument("--save-dir", default=None, help="save both traces here as safetensors")
    p.add_argument("--inject", default=None, metavar="SPEC",
                   help="plant faults in the candidate only, e.g. 'scale=2@3:attn_out' or "
                        "'dispatch=q6_k@*:ffn_down_exps' (proves the harness finds them)")
    p.add_argument("--isolated", action="store_true",
                   help="also run each layer alone from the reference's input: wrong by itself vs inherited")
    p.add_argument("--forced-routing", action="store_true",
                   help="also run the candidate with the reference's expert choices: routing flips vs expert math")
    p.add_argument("--no-drilldown", action="store_true",
                   help="no per-expert drill-down where moe_ffn_out diverges (on by default)")
    _add_threshold_args(p)
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("diff", help="compare two saved traces (safetensors files or aprender dump directories)")
    p.add_argument("reference", help="a .safetensors trace or a dump directory (layer-<N>/<stage>.bin)")
    p.add_argument("candidate", help="a .safetensors trace or a dump directory")
    p.add_argument("--positions", default=None,
                   help="the token position a dump holds (default: the last position of the other trace)")
    p.add_argument("--tokens", default=None,
                   help="the prompt of a dump (it holds the last position); checked against the other trace")
    p.add_argument("--stages", default="all",
                   help="compare only these stages: 'all' or a comma list of stages/aliases (default all)")
    p.add_argument("--layers", default="all",
                   help="compare only these layers: 'all', N, START..END (END exclusive) or a list (default all)")
    _add_threshold_args(p)
    p.set_defaults(fn=cmd_diff)

    p = sub.add_parser("backends", help="list registered backends and whether they run here")
    p.set_defaults(fn=cmd_backends)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (CliError, ModelError, PlanError, ValueError, KeyError, OSError) as exc:  # DumpError, FaultError too
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"moeparity: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeparity: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unavailable backend and the like: still one line
        from .backends import BackendUnavailable

        if isinstance(exc, BackendUnavailable):
            print(f"moeparity: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
