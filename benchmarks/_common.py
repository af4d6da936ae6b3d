"""Shared helpers for the benchmark scripts: environment, timing, tables, JSON."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from tasksurrogate_jax.pipeline import cli, report

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


def add_quick(parser: argparse.ArgumentParser, what: str,
              name: str | None = None) -> None:
    """Adds ``--quick``: tiny sizes for the CI smoke test (``what`` says which),
    and with ``name`` ``--out``, the JSON path (default
    ``results/<name>[_quick].json``: see :func:`fill_defaults`)."""
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes for the CI smoke test: {what}")
    if name is not None:
        parser.add_argument("--out", default=None,
                            help=f"JSON path (results/{name}[_quick].json)")


def add_workload_args(parser: argparse.ArgumentParser, config: str) -> None:
    """Adds ``--preset`` (default ``None``: ``cpu``, ``tiny`` under ``--quick``,
    see :func:`fill_defaults`) and ``--set FIELD=VALUE`` (repeatable, into
    ``args.overrides``, a dict after :func:`fill_defaults`), fields of
    ``config``."""
    parser.add_argument("--preset", default=None,
                        help="workload preset (cpu; quick tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE", help=f"{config} field to override "
                        "(repeatable)")


def fill_defaults(args: argparse.Namespace, full: dict, quick: dict,
                  name: str | None = None) -> argparse.Namespace:
    """Sets every ``args.<field>`` left at ``None`` to ``quick[field]`` under
    ``--quick`` (``full[field]`` otherwise), ``args.out`` left at ``None`` to
    ``results/<name>[_quick].json`` when ``name`` is given, and parses
    ``args.overrides`` (:func:`add_workload_args`) into a dict. Returns ``args``."""
    for field, value in {**full, **(quick if args.quick else {})}.items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    if isinstance(getattr(args, "overrides", None), list):
        args.overrides = parse_overrides(args.overrides)
    if name is not None and getattr(args, "out", None) is None:
        args.out = str(REPO_ROOT / "results" / (
            f"{name}_quick.json" if args.quick else f"{name}.json"))
    return args


def compile_timed(lowerable: Callable, *args, **kwargs) -> tuple[Callable, float]:
    """Ahead-of-time compiles a ``jax.jit``-ed function (or ``jax.jit(fn)`` of a
    plain one) for ``args``/``kwargs``; returns it and the seconds it took."""
    fn = lowerable if hasattr(lowerable, "lower") else jax.jit(lowerable)
    start = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def memory_analysis(compiled) -> dict:
    """XLA's memory analysis of a compiled program: temp, argument, output and
    total bytes (``{"error": ...}`` where the backend does not report it)."""
    try:
        m = compiled.memory_analysis()
        out = {"temp_bytes": int(m.temp_size_in_bytes),
               "argument_bytes": int(m.argument_size_in_bytes),
               "output_bytes": int(m.output_size_in_bytes)}
        return {**out, "total_bytes": sum(out.values())}
    except Exception as err:  # noqa: BLE001 - not every backend reports it
        return {"error": repr(err)}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux ``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``(fn(), seconds)`` of one call, compilation included: :func:`time_call`
    without warm-up or repeats."""
    record = time_call(fn, repeats=1, warmup=False)
    return record["result"], record["best"]


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
