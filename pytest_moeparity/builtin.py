"""The built-in models: made on demand from a preset and cached, so the main job needs no download."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from .make_model import PRESETS, make_model

# Bump when the generator's output for a given (preset, quant, seed) changes.
GENERATOR_VERSION = 2
BUILTIN_PREFIX = "builtin:"


def cache_dir() -> Path:
    root = os.environ.get("MOEPARITY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pytest-moeparity")
    return Path(root)


def builtin_path(preset: str = "tiny", quant: str = "Q4_K_M", seed: int = 0, **make_kwargs) -> Path:
    """Path of a cached built-in model, writing it first when absent."""
    if preset not in PRESETS:
        raise ValueError(f"unknown built-in model {preset!r}; choose one of {', '.join(PRESETS)}")
    key = json.dumps({"v": GENERATOR_VERSION, "spec": asdict(PRESETS[preset]), "quant": quant.upper(),
                      "seed": seed, **make_kwargs}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache_dir() / f"{preset}-{quant.lower()}-s{seed}-{digest}.gguf"
    if not path.exists():
        make_model(path, PRESETS[preset], quant=quant, seed=seed, **make_kwargs)
    return path


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """``builtin:tiny`` (optionally ``builtin:tiny:Q8_0``) or a file path."""
    s = str(spec)
    if s.startswith(BUILTIN_PREFIX):
        parts = s[len(BUILTIN_PREFIX):].split(":")
        preset = parts[0] or "tiny"
        quant = parts[1] if len(parts) > 1 else "Q4_K_M"
        return builtin_path(preset, quant)
    return Path(s)
