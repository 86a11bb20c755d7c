"""The stage contract (``contracts/stages.yaml``) and trace-key helpers.

Every backend, the save plan and the report take stage names from here; nothing else
spells a stage name as a string literal except through :data:`S`.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import yaml

_HERE = Path(__file__).resolve().parent
# Installed wheels carry the contracts inside the package; a source checkout keeps them at the
# repository's top level.
_CANDIDATES = (_HERE / "contracts", _HERE.parent / "contracts")


def contracts_dir() -> Path:
    for cand in _CANDIDATES:
        if (cand / "stages.yaml").is_file():
            return cand
    raise FileNotFoundError(
        "pytest-moeparity: contracts/stages.yaml not found (looked in "
        + ", ".join(str(c) for c in _CANDIDATES) + "); the installation is incomplete")


@dataclass(frozen=True)
class Stage:
    name: str
    scope: str  # "model", "layer" or "expert"
    shape: tuple[str, ...]
    kind: str  # "float" or "index"
    meaning: str
    order: int


@dataclass(frozen=True)
class StageContract:
    version: int
    stages: tuple[Stage, ...]
    aliases: dict

    @functools.cached_property
    def by_name(self) -> dict[str, Stage]:
        return {s.name: s for s in self.stages}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def scope_of(self, name: str) -> str:
        return self.by_name[name].scope


@functools.lru_cache(maxsize=None)
def load_yaml(name: str) -> dict:
    with open(contracts_dir() / name, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@functools.lru_cache(maxsize=None)
def stage_contract() -> StageContract:
    raw = load_yaml("stages.yaml")
    stages = []
    for i, s in enumerate(raw["stages"]):
        if s["scope"] not in ("model", "layer", "expert"):
            raise ValueError(f"contracts/stages.yaml: stage {s['name']!r} has bad scope {s['scope']!r}")
        stages.append(Stage(name=s["name"], scope=s["scope"], shape=tuple(str(d) for d in s["shape"]),
                            kind=s.get("kind", "float"), meaning=s.get("meaning", ""), order=i))
    aliases = {k.lower(): tuple(v) for k, v in (raw.get("aliases") or {}).items()}
    names = {s.name for s in stages}
    for alias, targets in aliases.items():
        bad = [t for t in targets if t not in names]
        if bad:
            raise ValueError(f"contracts/stages.yaml: alias {alias!r} names unknown stages {bad}")
    return StageContract(version=int(raw["version"]), stages=tuple(stages), aliases=aliases)


# S.moe_ffn_out == "moe_ffn_out": attribute access fails loudly on a misspelt stage name.
S = SimpleNamespace(**{name: name for name in stage_contract().names})

# ---- trace keys ---------------------------------------------------------------------------
_KEY_RE = re.compile(r"^(?:layer\.(\d+)\.)?(?:expert\.(\d+)\.)?([a-z0-9_]+)$")


def trace_key(stage: str, layer: int | None = None, expert: int | None = None) -> str:
    """``lm_head``, ``layer.6.moe_ffn_out`` or ``layer.6.expert.17.moe_expert_out``."""
    if layer is None:
        return stage
    if expert is None:
        return f"layer.{layer}.{stage}"
    return f"layer.{layer}.expert.{expert}.{stage}"


def parse_key(key: str) -> tuple[str, int | None, int | None]:
    """Inverse of :func:`trace_key`: ``(stage, layer, expert)``."""
    m = _KEY_RE.match(key)
    if not m:
        raise ValueError(f"not a trace key: {key!r}")
    layer, expert, stage = m.groups()
    return stage, (int(layer) if layer is not None else None), (int(expert) if expert is not None else None)


def shape_symbols(cfg) -> dict[str, int]:
    """Values of the contract's shape symbols for a model config (T is filled in by the caller)."""
    return {"H": cfg.hidden, "NH": cfg.n_heads, "NKV": cfg.n_kv_heads, "HD": cfg.head_dim,
            "E": cfg.n_experts, "K": cfg.n_experts_used, "F": cfg.expert_ff, "V": cfg.vocab}


def stage_shape(stage: str, cfg, n_tokens: int) -> tuple[int, ...]:
    """Per-position shape of ``stage`` for a model config, evaluated from the contract."""
    env = dict(shape_symbols(cfg), T=n_tokens)
    out = []
    for dim in stage_contract().by_name[stage].shape:
        val = 1
        for factor in dim.split("*"):
            val *= env[factor.strip()]
        out.append(val)
    return tuple(out)
