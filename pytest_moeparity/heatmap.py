"""A picture of a parity report: the layer x stage grid as a heatmap PNG.

Plain module (no pytest). Each cell is coloured by its verdict (Match green, Diverge orange,
NanGpu red, NanCpu purple, NanBoth dark red, Missing grey) and shaded by a metric:
``cosine`` (default) shades by -log10(1 - cosine), the number of matching digits (deeper green =
closer; deeper orange = further off), ``rel_l2`` by -log10(relative L2 error). The number is
written in the cell; a Diverge cell that only rel_l2 failed (a scale error, cosine 1.0) is
labelled ``rl2=X`` with its relative L2 error instead, and shaded by it (:func:`cell_label`).
Cells downstream of the first divergence are hatched; the first divergence is outlined in black.

matplotlib is optional (``pip install 'pytest-moeparity[plot]'``): without it
:func:`write_heatmap` returns None and callers print :data:`MISSING_MATPLOTLIB` once.
Only matplotlib's object API is used (no pyplot), so no global backend state is touched.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

from .atomic import write_bytes

from .contract import stage_contract

MISSING_MATPLOTLIB = "matplotlib is not installed: no heatmap picture (pip install 'pytest-moeparity[plot]')"

COLOURS = {
    "Match": (0.17, 0.63, 0.37),
    "Diverge": (0.99, 0.55, 0.24),
    "NanGpu": (0.87, 0.18, 0.15),
    "NanCpu": (0.46, 0.42, 0.69),
    "NanBoth": (0.40, 0.00, 0.05),
    "Missing": (0.74, 0.74, 0.74),
}
_SEVERITY = {"Match": 0, "Missing": 1, "Diverge": 2, "NanCpu": 3, "NanBoth": 4, "NanGpu": 5}
SCORE_CAP = 9.0


def heatmap_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def png_path_for(json_path: str | os.PathLike) -> Path:
    """``report.json`` -> ``report.png`` (any other name gets ``.png`` appended)."""
    p = Path(json_path)
    return p.with_suffix(".png") if p.suffix.lower() == ".json" else p.with_name(p.name + ".png")


def _as_doc(report) -> dict:
    return report if isinstance(report, dict) else report.to_json()


def _num(x) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if x in ("inf", "-inf", "nan"):
        return float(x)
    return None


def cell_score(cell: dict, metric: str = "cosine") -> float | None:
    """The shading value of one cell: matching digits (-log10 of the error), capped at 9."""
    m = cell.get("metrics") or {}
    if m.get("kind") == "index":
        agree = _num(m.get("agreement"))
        if agree is None:
            return None
        return SCORE_CAP if agree >= 1.0 else max(-math.log10(max(1.0 - agree, 1e-12)), 0.0) + 0.0
    if metric == "rel_l2":
        rel = _num(m.get("rel_l2"))
        if rel is None or math.isnan(rel):
            return None
        return SCORE_CAP if rel <= 0 else max(min(-math.log10(rel), SCORE_CAP), 0.0) + 0.0
    cos = _num(m.get("cosine"))
    if cos is None or math.isnan(cos):
        return None
    if cos >= 1.0:
        return SCORE_CAP
    return max(min(-math.log10(max(1.0 - cos, 1e-30)), SCORE_CAP), 0.0) + 0.0


def _rank(cell: dict) -> tuple:
    score = cell_score(cell)
    return (_SEVERITY.get(cell.get("verdict"), 0), -(score if score is not None else SCORE_CAP))


def row_of(cell: dict) -> tuple[int, int, str]:
    """(group, layer, label) of a cell: ``embed`` rows before the layers, ``final`` after."""
    contract = stage_contract()
    if cell.get("layer") is None:
        first_layer_order = min((s.order for s in contract.stages if s.scope != "model"), default=0)
        st = contract.by_name.get(cell["stage"])
        return (0, -1, "embed") if st is not None and st.order < first_layer_order else (2, -1, "final")
    return (1, int(cell["layer"]), str(cell["layer"]))


def grid(doc: dict, metric: str = "cosine"):
    """(row labels, column stages, {(row, stage): worst cell}) in the table's layout."""
    contract = stage_contract()

    cells: dict[tuple[str, str], dict] = {}
    rows: dict[tuple[int, int], str] = {}
    for c in doc.get("cells", []):
        if c.get("stage") not in contract.by_name:
            continue
        g, layer, label = row_of(c)
        rows[(g, layer)] = label
        key = (label, c["stage"])
        if key not in cells or _rank(c) > _rank(cells[key]):
            cells[key] = c
    present = {s for _, s in cells}
    columns = [n for n in contract.names if n in present]
    return [rows[k] for k in sorted(rows)], columns, cells


def _shade(verdict: str, score: float | None) -> tuple[float, float, float]:
    base = COLOURS.get(verdict, (1.0, 1.0, 1.0))
    if verdict == "Match":
        t = 0.3 + 0.7 * min(max((score if score is not None else SCORE_CAP) / 8.0, 0.0), 1.0)
    elif verdict == "Diverge":
        t = 0.45 + 0.55 * (1.0 - min(max((score or 0.0) / 3.0, 0.0), 1.0))
    elif verdict == "Missing":
        t = 0.7
    else:
        t = 1.0
    return tuple(1.0 - t * (1.0 - b) for b in base)


def rel_l2_only(cell: dict) -> bool:
    """True for a Diverge cell that only rel_l2 failed (cosine passed): a scale error, where the
    cosine number (``9+``) would hide what is wrong."""
    m = cell.get("metrics") or {}
    return (cell.get("verdict") == "Diverge" and m.get("kind") != "index" and bool(m.get("rel_l2_exceeded"))
            and not m.get("cosine_below") and _num(m.get("rel_l2")) is not None)


def _fmt_rel(rel: float) -> str:
    if math.isinf(rel) or math.isnan(rel):
        return str(rel)
    return f"{rel:.1f}" if 0.1 <= rel < 100 else f"{rel:.1g}"


def cell_label(cell: dict, metric: str = "cosine") -> str:
    """The text written in a cell: ``nan``, ``–`` (Missing), ``tie``, the matching digits of
    ``metric`` (``9+`` = exact), or ``rl2=X`` where rel_l2 is what failed and cosine is shown."""
    if metric == "cosine" and rel_l2_only(cell):
        return "rl2=" + _fmt_rel(_num((cell.get("metrics") or {}).get("rel_l2")))
    return _label(cell, cell_score(cell, metric))


def _label(cell: dict, score: float | None) -> str:
    v = cell.get("verdict")
    if v in ("NanGpu", "NanCpu", "NanBoth"):
        return "nan"
    if v == "Missing":
        return "–"
    m = cell.get("metrics") or {}
    if m.get("kind") == "index" and m.get("tie_positions") and v == "Match":
        return "tie"
    if score is None:
        return ""
    return f"{score:.0f}+" if score >= SCORE_CAP else f"{score:.1f}"


def render_figure(report, metric: str = "cosine", title: str | None = None):
    """A matplotlib Figure of the report (raises ImportError without matplotlib)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    if metric not in ("cosine", "rel_l2"):
        raise ValueError(f"metric must be 'cosine' or 'rel_l2', not {metric!r}")
    doc = _as_doc(report)
    rows, columns, cells = grid(doc, metric)
    nr, nc = max(len(rows), 1), max(len(columns), 1)
    width = min(max(2.2 + 0.55 * nc, 8.0), 40.0)
    fig = Figure(figsize=(width, min(2.6 + 0.26 * nr, 60)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlim(0, nc)
    ax.set_ylim(nr, 0)
    annotate = nr * nc <= 2500
    fd = doc.get("first_divergence") or None
    for i, r in enumerate(rows):
        for j, s in enumerate(columns):
            c = cells.get((r, s))
            if c is None:
                continue
            # a cell only rel_l2 failed is shaded (and labelled) by rel_l2 even on the cosine map
            score = cell_score(c, "rel_l2" if rel_l2_only(c) else metric)
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=_shade(c["verdict"], score), edgecolor="white",
                                   linewidth=0.5, hatch="///" if c.get("downstream") else None))
            if annotate:
                ax.text(j + 0.5, i + 0.5, cell_label(c, metric), ha="center", va="center", fontsize=6,
                        color="black" if c["verdict"] in ("Match", "Diverge", "Missing") else "white")
    if fd is not None:
        row = row_of(fd)[2]
        if row in rows and fd["stage"] in columns:
            ax.add_patch(Rectangle((columns.index(fd["stage"]), rows.index(row)), 1, 1, fill=False,
                                   edgecolor="black", linewidth=2.5))
    ax.set_xticks([j + 0.5 for j in range(len(columns))])
    ax.set_xticklabels(columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks([i + 0.5 for i in range(len(rows))])
    ax.set_yticklabels(rows, fontsize=7)
    ax.set_ylabel("layer")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if title is None:
        meta = doc.get("meta") or {}
        ref = (meta.get("reference") or {}).get("backend", "reference")
        cand = (meta.get("candidate") or {}).get("backend", "candidate")
        where = "no divergence"
        if fd is not None:
            layer = "model" if fd.get("layer") is None else f"layer {fd['layer']}"
            exp = "" if fd.get("expert") is None else f" expert {fd['expert']}"
            where = f"first divergence: {layer}, {fd['stage']}{exp} ({fd['verdict']})"
        what = "-log10(1 - cosine)" if metric == "cosine" else "-log10(rel_l2)"
        title = f"{ref} vs {cand}: {where}\ncell number = {what} (matching digits); hatched = downstream"
    ax.set_title(title, fontsize=9)
    handles = [Patch(facecolor=COLOURS[v], label=v) for v in COLOURS]
    handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2, label="first divergence"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), max(int(width / 1.6), 2)), fontsize=7,
               frameon=False)
    fig.subplots_adjust(bottom=min(1.5 / fig.get_figheight(), 0.5), top=1 - 0.7 / fig.get_figheight(),
                        left=0.6 / fig.get_figwidth(), right=1 - 0.2 / fig.get_figwidth())
    return fig


def heatmap_png_bytes(report, metric: str = "cosine") -> bytes | None:
    """The PNG as bytes, or None without matplotlib."""
    if not heatmap_available():
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = render_figure(report, metric)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_heatmap(report, path: str | os.PathLike, metric: str = "cosine") -> Path | None:
    """Write the PNG atomically; None (nothing written) without matplotlib."""
    png = heatmap_png_bytes(report, metric)
    if png is None:
        return None
    return write_bytes(path, png)
