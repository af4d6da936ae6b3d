"""Shared helpers for the benchmark scripts: environment, timing, tables, JSON."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from tasksurrogate_jax import cli, report

REPO_ROOT = Path(__file__).resolve().parent.parent
# Environment variables that set the thread counts of XLA and the BLAS libraries.
THREAD_VARIABLES = ("XLA_FLAGS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")


def environment() -> dict:
    """Versions, device and machine load, to store beside every measurement."""
    import scipy
    import sklearn

    device = jax.devices()[0]
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None)
        or __import__("jaxlib").__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "x64_enabled": bool(jax.config.jax_enable_x64),
        "threads_env": {k: os.environ.get(k) for k in THREAD_VARIABLES},
        "load_average": list(os.getloadavg()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parse_overrides(items: Sequence[str]) -> dict:
    """``["field=value", ...]`` -> ``{field: value}``, parsed as the command's
    ``--set`` is (Python literals, else strings)."""
    return dict(cli.parse_override(item) for item in items)


def time_call(
    fn: Callable[[], object], *, repeats: int = 3, warmup: bool = True,
    max_seconds: float = 60.0,
) -> dict:
    """Wall-clock seconds of ``fn()``, waiting on JAX results.

    Runs ``fn`` once untimed when ``warmup`` (compile, caches, thread pools),
    then up to ``repeats`` timed calls, stopping early once ``max_seconds`` of
    timed calls have passed (always at least one).

    Returns:
      ``{"best": min, "median": median, "times": [...], "result": last result}``.
    """
    if warmup:
        jax.block_until_ready(fn())
    times, result = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        if sum(times) >= max_seconds:
            break
    return {"best": min(times), "median": float(np.median(times)), "times": times,
            "result": result}


def compile_jitted(fn: Callable, *args) -> tuple[Callable, float]:
    """Ahead-of-time compiles ``jax.jit(fn)`` for ``args``; returns it and seconds."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def strip_results(record: dict) -> dict:
    """``time_call`` output without the (non-JSON) result."""
    return {k: v for k, v in record.items() if k != "result"}


def write_json(path: str | Path, payload: dict) -> Path:
    """Writes ``payload`` as indented JSON (arrays as lists, non-finite as null),
    creating parent folders: the package's own writer."""
    return report.write_json(payload, path)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Markdown table of ``rows`` restricted to ``columns`` (floats to 4 sig. fig.)."""

    def cell(value):
        if isinstance(value, (float, np.floating)):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
