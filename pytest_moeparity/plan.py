"""The save plan: which stages, layers, token positions and experts a traced forward captures.

Plain module (no pytest). Both backends of a comparison run under the same plan, so that
every (layer, stage) asked for exists on both sides unless a backend failed to capture it.

Grammar (all case-insensitive, whitespace ignored):
  stages     ``all`` | comma list of stage names or aliases (``layer_output``, ``router``, ...)
  layers     ``all`` | ``N`` | ``START..END`` (END exclusive, either side may be omitted) | comma list of those
  positions  ``all`` | ``last`` | comma list of ints (negative counts from the end)
  experts    ``routed`` (experts the backend chose at a captured position) | ``all`` | comma list
"""
from __future__ import annotations

from dataclasses import dataclass

from .contract import stage_contract


class PlanError(ValueError):
    """A save-plan specification that cannot be parsed or does not fit the model."""


def parse_stages(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Stage names in forward order. ``None`` or ``all`` gives every stage."""
    contract = stage_contract()
    if spec is None:
        return contract.names
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [str(s).strip().lower() for s in items]
    if not any(items):
        raise PlanError("empty stage list; valid stages: " + ", ".join(contract.names))
    wanted: set[str] = set()
    for item in items:
        if not item:
            raise PlanError(f"empty name in stage list {spec!r}")
        if item == "all":
            wanted.update(contract.names)
        elif item in contract.by_name:
            wanted.add(item)
        elif item in contract.aliases:
            wanted.update(contract.aliases[item])
        else:
            raise PlanError(f"unknown stage {item!r}; valid stages: " + ", ".join(contract.names)
                            + "; aliases: " + ", ".join(sorted(contract.aliases)) + ", all")
    return tuple(n for n in contract.names if n in wanted)


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PlanError(f"bad {what} {text!r}: expected an integer") from None


def parse_layers(spec: str | int | list[int] | None) -> tuple[tuple[int | None, int | None], ...] | None:
    """Layer ranges as half-open ``(start, end)`` pairs, ``None`` meaning all layers."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return ((spec, spec + 1),)
    if isinstance(spec, (list, tuple)):
        return tuple((int(n), int(n) + 1) for n in spec)
    text = str(spec).replace(" ", "").lower()
    if text in ("", "all"):
        if text == "":
            raise PlanError("empty layer specification; use 'all', 'N', 'START..END' or a list")
        return None
    ranges = []
    for part in text.split(","):
        if ".." in part:
            a, b = part.split("..", 1)
            start = _int(a, "layer range start") if a else None
            end = _int(b, "layer range end") if b else None
            if start is not None and end is not None and end <= start:
                raise PlanError(f"empty layer range {part!r} (END is exclusive and must exceed START)")
            if (start is not None and start < 0) or (end is not None and end < 0):
                raise PlanError(f"negative layer in {part!r}")
            ranges.append((start, end))
        else:
            n = _int(part, "layer")
            if n < 0:
                raise PlanError(f"negative layer {n}")
            ranges.append((n, n + 1))
    return tuple(ranges)


def parse_positions(spec: str | int | list[int] | None) -> str | tuple[int, ...]:
    if spec is None:
        return "all"
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, (list, tuple)):
        return tuple(int(p) for p in spec)
    text = str(spec).replace(" ", "").lower()
    if text in ("all", "last"):
        return text
    if not text:
        raise PlanError("empty position specification; use 'all', 'last' or a list of ints")
    return tuple(_int(p, "token position") for p in text.split(","))


def parse_experts(spec: str | int | list[int] | None) -> str | tuple[int, ...]:
    if spec is None:
        return "routed"
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, (list, tuple)):
        return tuple(sorted({int(e) for e in spec}))
    text = str(spec).replace(" ", "").lower()
    if text in ("routed", "all"):
        return text
    if not text:
        raise PlanError("empty expert specification; use 'routed', 'all' or a list of ids")
    out = tuple(sorted({_int(e, "expert id") for e in text.split(",")}))
    if any(e < 0 for e in out):
        raise PlanError("negative expert id")
    return out


@dataclass(frozen=True)
class SavePlan:
    """What a traced forward captures. Build with :meth:`parse`; :meth:`empty` captures nothing."""

    stages: tuple[str, ...] = ()
    layers: tuple[tuple[int | None, int | None], ...] | None = None
    positions: str | tuple[int, ...] = "all"
    experts: str | tuple[int, ...] = "routed"

    @classmethod
    def parse(cls, stages=None, layers=None, positions=None, experts=None) -> "SavePlan":
        return cls(stages=parse_stages(stages), layers=parse_layers(layers),
                   positions=parse_positions(positions), experts=parse_experts(experts))

    @classmethod
    def empty(cls) -> "SavePlan":
        return cls(stages=())

    @property
    def is_empty(self) -> bool:
        return not self.stages

    def wants_stage(self, stage: str) -> bool:
        return stage in self.stages

    def wants_layer(self, layer: int) -> bool:
        if self.layers is None:
            return True
        return any((a is None or layer >= a) and (b is None or layer < b) for a, b in self.layers)

    def wants(self, stage: str, layer: int | None = None) -> bool:
        """True when ``stage`` at ``layer`` is captured (model-scope stages ignore the layer range)."""
        if stage not in self.stages:
            return False
        return layer is None or self.wants_layer(layer)

    def resolve_layers(self, n_layers: int) -> list[int]:
        """Layers of an ``n_layers`` model that the plan captures; errors on out-of-range layers."""
        if self.layers is not None:
            for a, b in self.layers:
                if a is not None and a >= n_layers:
                    raise PlanError(f"layer {a} out of range: the model has {n_layers} layers (0..{n_layers})")
                if b is not None and b > n_layers:
                    raise PlanError(f"layer range end {b} out of range: the model has {n_layers} layers")
        return [layer for layer in range(n_layers) if self.wants_layer(layer)]

    def resolve_positions(self, n_tokens: int) -> list[int]:
        if n_tokens <= 0:
            raise PlanError("no tokens")
        if self.positions == "all":
            return list(range(n_tokens))
        if self.positions == "last":
            return [n_tokens - 1]
        out = []
        for p in self.positions:
            q = p + n_tokens if p < 0 else p
            if not 0 <= q < n_tokens:
                raise PlanError(f"token position {p} out of range for {n_tokens} tokens")
            if q not in out:
                out.append(q)
        return sorted(out)

    def resolve_experts(self, n_experts: int, routed: set[int] | None = None) -> list[int]:
        if self.experts == "all":
            return list(range(n_experts))
        if self.experts == "routed":
            return sorted(routed or ())
        bad = [e for e in self.experts if e >= n_experts]
        if bad:
            raise PlanError(f"expert ids {bad} out of range: the model has {n_experts} experts")
        return list(self.experts)

    def describe(self) -> str:
        layers = "all" if self.layers is None else ",".join(
            f"{'' if a is None else a}..{'' if b is None else b}" if (a is None or b is None or b - a != 1) else str(a)
            for a, b in self.layers)
        positions = self.positions if isinstance(self.positions, str) else ",".join(map(str, self.positions))
        experts = self.experts if isinstance(self.experts, str) else ",".join(map(str, self.experts))
        stages = "all" if self.stages == stage_contract().names else ",".join(self.stages)
        return f"stages={stages} layers={layers} positions={positions} experts={experts}"
