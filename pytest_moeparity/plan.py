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


def _item_int(item, what: str) -> int:
    """An int from a list item: an int (NumPy ints too) or a string holding one; not a bool or float."""
    if isinstance(item, str):
        return _int(item.strip(), what)
    if isinstance(item, bool) or not hasattr(item, "__index__"):
        raise PlanError(f"bad {what} {item!r}: expected an integer")
    return int(item.__index__())


def _items(spec, what: str, usage: str) -> list:
    """The items of a comma string or a list, refusing an empty specification."""
    items = spec.replace(" ", "").lower().split(",") if isinstance(spec, str) else list(spec)
    if not items or items == [""]:
        raise PlanError(f"empty {what} specification; use {usage}")
    return items


_LAYER_USAGE = "'all', 'N', 'START..END' or a list"


def _layer_range(part) -> tuple[int | None, int | None]:
    if isinstance(part, str) and ".." in part:
        a, b = part.split("..", 1)
        start = _int(a, "layer range start") if a else None
        end = _int(b, "layer range end") if b else None
        if (start is not None and start < 0) or (end is not None and end < 0):
            raise PlanError(f"negative layer in {part!r}; layers count from 0")
        if start is not None and end is not None and end <= start:
            raise PlanError(f"empty layer range {part!r} (END is exclusive and must exceed START)")
        return (start, end)
    if isinstance(part, str) and not part.strip():
        raise PlanError("empty name in layer list")
    n = _item_int(part, "layer")
    if n < 0:
        raise PlanError(f"negative layer {n}; layers count from 0")
    return (n, n + 1)


def parse_layers(spec: str | int | list | None) -> tuple[tuple[int | None, int | None], ...] | None:
    """Layer ranges as half-open ``(start, end)`` pairs, ``None`` meaning all layers.

    A list holds ints or strings of the string grammar (``[0, "4..6"]``); it gets the same checks.
    """
    if spec is None:
        return None
    if isinstance(spec, str) and spec.replace(" ", "").lower() == "all":
        return None
    if not isinstance(spec, (str, list, tuple)):
        spec = [spec]
    items = _items(spec, "layer", _LAYER_USAGE)
    return tuple(_layer_range(p.replace(" ", "").lower() if isinstance(p, str) else p) for p in items)


def parse_positions(spec: str | int | list[int] | None) -> str | tuple[int, ...]:
    """``all``, ``last`` or token positions (negative counts from the end)."""
    if spec is None:
        return "all"
    if isinstance(spec, str) and spec.replace(" ", "").lower() in ("all", "last"):
        return spec.replace(" ", "").lower()
    if not isinstance(spec, (str, list, tuple)):
        spec = [spec]
    items = _items(spec, "position", "'all', 'last' or a list of ints")
    out = []
    for p in items:
        if isinstance(p, str) and not p.strip():
            raise PlanError("empty name in position list")
        out.append(_item_int(p, "token position"))
    return tuple(out)


def parse_experts(spec: str | int | list[int] | None) -> str | tuple[int, ...]:
    """``routed``, ``all`` or expert ids (sorted, duplicates dropped)."""
    if spec is None:
        return "routed"
    if isinstance(spec, str) and spec.replace(" ", "").lower() in ("routed", "all"):
        return spec.replace(" ", "").lower()
    if not isinstance(spec, (str, list, tuple)):
        spec = [spec]
    items = _items(spec, "expert", "'routed', 'all' or a list of ids")
    out = set()
    for e in items:
        if isinstance(e, str) and not e.strip():
            raise PlanError("empty name in expert list")
        n = _item_int(e, "expert id")
        if n < 0:
            raise PlanError(f"negative expert id {n}; experts count from 0")
        out.add(n)
    return tuple(sorted(out))


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
            if not self.layers:
                raise PlanError("empty layer specification; use " + _LAYER_USAGE)
            for a, b in self.layers:
                if (a is not None and a < 0) or (b is not None and b < 0):
                    raise PlanError(f"negative layer in range {a}..{b}; layers count from 0")
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
        if not self.positions:
            raise PlanError("empty position specification; use 'all', 'last' or a list of ints")
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
        if not self.experts:
            raise PlanError("empty expert specification; use 'routed', 'all' or a list of ids")
        bad = [e for e in self.experts if not 0 <= e < n_experts]
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
