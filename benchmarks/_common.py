"""Shared helpers of the benchmark scripts: machine description, memory sampling, result files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path


def machine() -> dict:
    info = {"host_cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["host_cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["ram_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            info["gpu"] = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class MemorySampler:
    """Peak anonymous RSS (dequantized arrays, not the memory-mapped file) sampled every 20 ms."""

    def __init__(self):
        self.peak_anon_kb = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_anon_kb = max(self.peak_anon_kb, _status_kb("RssAnon"))
            time.sleep(0.02)

    def __enter__(self):
        self.base_anon_kb = _status_kb("RssAnon")
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak_anon_kb = max(self.peak_anon_kb, _status_kb("RssAnon"))

    @property
    def peak_anon_mib(self) -> float:
        return self.peak_anon_kb / 1024

    @staticmethod
    def peak_rss_mib() -> float:
        return _status_kb("VmHWM") / 1024


def write_result(name: str, doc: dict, out: str | None) -> Path:
    path = Path(out) if out else Path(__file__).parent / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(doc, machine=machine(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def variant_builds(base, variants: list, threads: bool = True) -> list:
    """``base.variant(v)`` for each of ``variants`` (tuples of -D switches), in order, compiled side by side
    in threads: each build is a whole NVRTC compile (~40 s of one core on the GPU machines), so where
    CuPy's bindings release the GIL around it a cold machine's A/B of several builds waits for about one
    instead of each in turn (not yet timed on a GPU; where they do not, the builds take as long as before).
    ``threads=False`` (the scripts' --serial-builds): one after another."""
    from concurrent.futures import ThreadPoolExecutor

    if len(variants) < 2 or not threads:
        return [base.variant(v) for v in variants]
    with ThreadPoolExecutor(max_workers=len(variants)) as pool:
        return list(pool.map(base.variant, variants))
