"""Fault injection: plant a known bug in a candidate and check the harness names it.

Spec grammar (several specs separated by ``;``)::

    KIND[=VALUE]@LAYER:STAGE[#EXPERT]     per-layer (and per-expert) stages; LAYER may be '*'
    KIND[=VALUE]@STAGE                    model stages (embedding, final_norm, lm_head)
    dispatch=QTYPE@LAYER:TENSOR           quant-type mis-dispatch of a weight tensor

KIND is ``nan`` / ``inf`` (element 0 of every position becomes NaN / +Inf), ``scale=S``
(multiply by S), ``add=A`` (add A to every element) or ``zero``. ``dispatch=q6_k@*:ffn_down_exps``
reproduces the historical bug: that tensor's bytes are read with the Q6_K layout whatever their
real type (rows read as far as whole Q6_K blocks fit; the rest contributes 0).
Examples: ``nan@6:moe_ffn_out``, ``scale=2@3:attn_out``, ``inf@0:q_post_rope``, ``nan@lm_head``.

``#EXPERT`` on a per-expert stage (``scale=2@3:moe_expert_out#5``) faults that expert only. On the
router's per-expert columns (``moe_router_logits``, ``moe_router_probs``, shape ``[E]``) it faults
that expert's column only: ``add=4@3:moe_router_logits#5`` favours expert 5 at layer 3 (a
routing flip without any change to the experts' arithmetic); ``add=1e-6@...#E`` breaks a tie.

Faults change the value the forward goes on with (so they propagate downstream), and the
captured copy shows them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .contract import stage_contract

VALUE_KINDS = ("nan", "inf", "scale", "add", "zero")
# layer stages whose last axis is the expert axis: '#E' faults one column
COLUMN_STAGES = ("moe_router_logits", "moe_router_probs")
_SPEC_RE = re.compile(r"^(?P<kind>[a-z_]+)(?:=(?P<value>[^@]+))?@(?:(?P<layer>\*|\d+):)?(?P<target>[a-z0-9_]+)(?:#(?P<expert>\d+))?$")


class FaultError(ValueError):
    """A fault spec that cannot be parsed."""


@dataclass(frozen=True)
class Fault:
    kind: str
    value: float | str | None
    layer: int | str | None  # int, '*' (every layer) or None (model stage)
    target: str              # stage name, or weight tensor name for 'dispatch'
    expert: int | None = None

    @property
    def column(self) -> bool:
        """True for ``#E`` on a router column stage: only column E of the [T, E] value is faulted."""
        return self.expert is not None and self.target in COLUMN_STAGES

    def matches(self, stage: str, layer: int | None, expert: int | None = None) -> bool:
        if self.kind == "dispatch" or stage != self.target:
            return False
        if self.layer != "*" and self.layer != layer:
            return False
        if self.column:
            return expert is None
        return self.expert is None or self.expert == expert

    def apply(self, value):
        """The faulted value (a new array; works for NumPy and CuPy arrays alike)."""
        if self.column:
            out = value.copy()
            out[..., self.expert] = Fault(self.kind, self.value, self.layer, self.target).apply(
                value[..., self.expert:self.expert + 1])[..., 0]
            return out
        if self.kind == "scale":
            return value * self.value
        if self.kind == "add":
            return value + self.value
        if self.kind == "zero":
            return value * 0
        out = value.copy()
        flat = out.reshape(out.shape[0], -1)
        flat[:, 0] = float("nan") if self.kind == "nan" else float("inf")
        return out

    def __str__(self) -> str:
        v = "" if self.value is None else f"={self.value}"
        where = self.target if self.layer is None else f"{self.layer}:{self.target}"
        e = "" if self.expert is None else f"#{self.expert}"
        return f"{self.kind}{v}@{where}{e}"


def parse_faults(spec: str | None) -> list[Fault]:
    if not spec:
        return []
    from .model import LAYER_TENSORS
    from .quants import qtype_from_name

    contract = stage_contract()
    out = []
    for part in spec.replace(" ", "").split(";"):
        if not part:
            continue
        m = _SPEC_RE.match(part.lower())
        if not m:
            raise FaultError(f"bad fault spec {part!r}: expected KIND[=VALUE]@LAYER:STAGE "
                             "(e.g. nan@6:moe_ffn_out, scale=2@3:attn_out, dispatch=q6_k@*:ffn_down_exps)")
        kind, value, layer, target, expert = m.group("kind", "value", "layer", "target", "expert")
        layer = None if layer is None else (layer if layer == "*" else int(layer))
        expert = None if expert is None else int(expert)
        if kind == "dispatch":
            if target not in LAYER_TENSORS or layer is None:
                raise FaultError(f"{part!r}: dispatch faults name a layer weight tensor "
                                 f"({', '.join(LAYER_TENSORS)}) with a layer, e.g. dispatch=q6_k@*:ffn_down_exps")
            if value is None:
                raise FaultError(f"{part!r}: dispatch needs the wrong type, e.g. dispatch=q6_k@6:ffn_down_exps")
            try:
                value = qtype_from_name(value).name
            except ValueError as exc:
                raise FaultError(f"{part!r}: {exc}") from None
            out.append(Fault(kind, value, layer, target))
            continue
        if kind not in VALUE_KINDS:
            raise FaultError(f"{part!r}: unknown fault kind {kind!r}; kinds: {', '.join(VALUE_KINDS)}, dispatch")
        if target not in contract.by_name:
            raise FaultError(f"{part!r}: unknown stage {target!r}; valid stages: {', '.join(contract.names)}")
        st = contract.by_name[target]
        if st.kind == "index":
            raise FaultError(f"{part!r}: {target} holds expert ids; inject into moe_router_logits instead")
        if (st.scope == "model") != (layer is None):
            raise FaultError(f"{part!r}: {target} is a {st.scope} stage: "
                             + ("give no layer" if st.scope == "model" else "give a layer, e.g. 3:" + target))
        if expert is not None and st.scope != "expert" and target not in COLUMN_STAGES:
            raise FaultError(f"{part!r}: #EXPERT only applies to per-expert stages and to "
                             + ", ".join(COLUMN_STAGES))
        if kind in ("scale", "add"):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise FaultError(f"{part!r}: {kind} needs a number, e.g. {kind}=2") from None
        elif value is not None:
            raise FaultError(f"{part!r}: {kind} takes no value")
        out.append(Fault(kind, value, layer, target, expert))
    return out


def dispatch_overrides(faults: list[Fault]) -> list[Fault]:
    return [f for f in faults if f.kind == "dispatch"]


def dispatch_type(faults: list[Fault], layer: int, tensor: str) -> str | None:
    """The wrong quant type name a dispatch fault forces on (layer, tensor), or None."""
    for f in faults:
        if f.kind == "dispatch" and f.target == tensor and (f.layer == "*" or f.layer == layer):
            return f.value
    return None


def misdispatch_dequantize(raw, wrong_qtype_name: str, n_cols: int, dtype=None):
    """Dequantize rows of ``raw`` ([..., row_bytes]) with the layout of ``wrong_qtype_name``.

    The historical bug: bytes of one quant type read by another type's kernel. Each row is
    read as whole blocks of the wrong type as far as they fit inside the row's real bytes;
    columns beyond them contribute 0. Never reads outside the tensor.
    """
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    from .model import dequantize_raw

    wrong = GGMLQuantizationType[wrong_qtype_name]
    block, tsize = GGML_QUANT_SIZES[wrong]
    row_bytes = raw.shape[-1]
    n_blocks = min(row_bytes // tsize, n_cols // block)
    out = np.zeros((*raw.shape[:-1], n_cols), dtype=dtype or np.float32)
    if n_blocks:
        with np.errstate(all="ignore"):  # garbage scales (NaN/Inf halves) are the point of the fault
            vals = dequantize_raw(np.ascontiguousarray(raw[..., : n_blocks * tsize]), wrong, out.dtype)
        out[..., : n_blocks * block] = vals
    return out
