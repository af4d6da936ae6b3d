"""One check of an accelerator: tests, the main job and three benchmarks, one JSON.

Runs, each as a subprocess with its own timeout (a failure or a timeout is
recorded and the next part runs):

- ``environment``: ``jax.devices()``, platform, device kind, the versions of
  python, jax, jaxlib, flax, optax and numpy;
- ``tests``: the fast test tier (``python -m pytest -q``; ``--quick``: a few
  representative test files), on the device found (``JAX_PLATFORMS`` set to
  its platform: the tests' conftest otherwise pins the CPU);
- ``main_job``: ``tasksurrogate run digits --preset cpu`` (``--quick``: the
  ``tiny`` preset with 2 replicates and 16 + 8 subsets), the README's job;
- ``retraining``, ``estimation``, ``scale``: ``bench_retraining.py``,
  ``bench_estimation.py`` and ``bench_scale.py`` at sizes that fit the budget
  (``--quick``: their own ``--quick`` sizes).

The JSON holds, per part, its command, exit code, wall seconds, its key
figures (:data:`FIGURES`) and on a failure the tail of its output. Given
``--cpu-reference`` (the JSON of an earlier run on a CPU), it also holds the
reference's figures and, for the retraining and estimation timings, the
ratios this device / CPU (below 1: this device is faster). Every child runs
with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that test workers can share
one GPU. Exit code 1 when a part failed.

    python benchmarks/device_check.py --quick --out results/device_check_cpu.json
    python benchmarks/device_check.py --cpu-reference results/device_check_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent

ENVIRONMENT = """
import json, platform, jax, jaxlib, flax, optax, numpy
d = jax.devices()
print(json.dumps({"devices": [str(x) for x in d], "device_count": len(d),
    "platform": d[0].platform, "device_kind": d[0].device_kind,
    "versions": {"python": platform.python_version(), "jax": jax.__version__,
                 "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                 "optax": optax.__version__, "numpy": numpy.__version__}}))
"""
# Each part's arguments: the full run fits 8 minutes on one GPU; --quick takes
# the fast tier's representative subset (kernels, subset sampling, estimation:
# linearized fine-tuning, projections), the tiny main job and the benchmarks'
# --quick sizes. The scale benchmark's sharded part (8 simulated CPU devices)
# is left out: it measures no accelerator.
FULL_ARGS = {
    "tests": [],
    "main_job": ["--preset", "cpu"],
    "retraining": ["--preset", "cpu", "--num-subsets", "32"],
    "estimation": ["--workload", "digits", "--preset", "cpu"],
    "scale": ["--sizes", "1000", "8000", "32000", "--exact-max", "8000",
              "--estimation-subsets", "20000", "--skip-sharding"],
}
QUICK_ARGS = {
    "tests": ["tests/test_kernels.py", "tests/test_subsets.py",
              "tests/test_estimation.py"],
    "main_job": ["--preset", "tiny", "--replicates", "2", "--num-subsets", "16",
                 "--num-heldout", "8", "--value-samples", "100"],
    "retraining": ["--quick"],
    "estimation": ["--quick"],
    "scale": ["--quick", "--skip-sharding"],
}
# Per-part timeouts in seconds: 8 minutes in all; quick: about 3 minutes in all
# on an idle 2-core CPU, with room for a loaded one.
TIMEOUTS = {"environment": 30, "tests": 180, "main_job": 90, "retraining": 45,
            "estimation": 75, "scale": 60}
QUICK_TIMEOUTS = {"environment": 60, "tests": 150, "main_job": 150, "retraining": 120,
                  "estimation": 180, "scale": 180}
# Timings compared with the CPU reference (part, figure).
RATIOS = [("retraining", "vmap_s"), ("retraining", "vmap_s_per_subset"),
          ("retraining", "loop_s"), ("estimation", "per_subset_s"),
          ("estimation", "finetune_per_subset_s")]


def commands(quick: bool, out: Path, workers: str) -> dict[str, list[str]]:
    """The command of each part (``out``: the folder their outputs go to)."""
    py, args = [sys.executable], QUICK_ARGS if quick else FULL_ARGS
    return {
        "environment": [*py, "-c", ENVIRONMENT],
        "tests": [*py, "-m", "pytest", "-q", "-n", workers, *args["tests"]],
        "main_job": [*py, "-m", "tasksurrogate_jax.pipeline.cli", "run", "digits",
                     "--quiet", "--out", str(out / "main_job"), *args["main_job"]],
        **{name: [*py, str(BENCHMARKS / f"bench_{name}.py"), *args[name],
                  "--out", str(out / f"{name}.json")]
           for name in ("retraining", "estimation", "scale")},
    }


def _pytest_counts(output: str) -> dict:
    """``{"passed": n, "failed": n, ...}`` from pytest's closing line."""
    counts = {}
    for line in output.splitlines()[::-1]:
        words = line.replace(",", " ").split()
        pairs = [(int(a), b.rstrip("s")) for a, b in zip(words, words[1:], strict=False)
                 if a.isdigit() and b.rstrip("s") in (
                     "passed", "failed", "error", "skipped", "xfailed", "deselected")]
        if pairs:
            counts = {name: n for n, name in pairs}
            break
    return counts


def figures(part: str, out: Path, output: str) -> dict:
    """The key figures of a finished part, from its JSON (or output)."""
    if part == "environment":
        return json.loads(output.strip().splitlines()[-1])
    if part == "tests":
        return _pytest_counts(output)
    if part == "main_job":
        r = json.loads((out / "main_job" / "results.json").read_text())
        return {"full_set_loss": r["full_set_loss"],
                "ceiling_loo_spearman": r["ceiling"]["loo_spearman_per_target"],
                "loo_spearman": {k: v["loo_spearman"] for k, v in r["methods"].items()},
                "estimation_median_relative_error":
                    r["estimation"]["median_relative_error"],
                "stage_seconds": r["seconds"]}
    r = json.loads((out / f"{part}.json").read_text())
    if part == "retraining":
        best_v, best_l = min(r["seconds_vmap"]), min(r["seconds_loop"])
        return {"num_subsets": r["num_subsets"], "vmap_s": best_v, "loop_s": best_l,
                "vmap_s_per_subset": best_v / r["num_subsets"],
                "compile_vmap_s": r["seconds_compile_vmap"],
                "speedup_loop_over_vmap": r["speedup_loop_over_vmap"],
                "accuracy_agreement": r["accuracy_agreement"]}
    if part == "estimation":
        return {"per_subset_s": r["per_subset_s"],
                "finetune_per_subset_s": r["finetune_per_subset_s"],
                "speedup": r["speedup_m1024"], "ceiling": r["ceiling"],
                "loo_spearman_per_target": r["loo_spearman_per_target"]}
    return {"surrogate": [{k: row[k] for k in ("solver", "num_subsets", "total_s",
                                               "heldout_spearman")}
                          for row in r["surrogate"]],
            "estimation_ms_per_subset": (r["estimation"] or {}).get("ms_per_subset")}


def run_part(part: str, command: list[str], *, timeout: float, out: Path,
             env: dict) -> dict:
    """Runs one part; never raises: a failure is recorded in the result."""
    start = time.perf_counter()
    record = {"command": command, "timeout_s": timeout}
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, timeout=timeout,
                              capture_output=True, text=True, check=False)
        output, record["returncode"] = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes)
                         else x or "" for x in (err.stdout, err.stderr))
        record["returncode"], record["error"] = None, f"timed out after {timeout} s"
    record["wall_s"] = time.perf_counter() - start
    if record["returncode"] == 0:
        try:
            record["figures"] = figures(part, out, done.stdout)
        except (OSError, ValueError, KeyError, TypeError) as err:
            record["error"] = f"figures: {err!r}"
    elif "error" not in record:
        record["error"] = f"exit code {record['returncode']}"
    record["ok"] = "error" not in record
    if not record["ok"]:
        record["output_tail"] = output[-3000:]
    return record


def ratios(parts: dict, reference: dict) -> dict:
    """This device's timing / the CPU reference's, for :data:`RATIOS`."""
    out = {}
    for part, name in RATIOS:
        mine = parts.get(part, {}).get("figures", {}).get(name)
        theirs = reference.get("parts", {}).get(part, {}).get("figures", {}).get(name)
        if mine is not None and theirs:
            out[f"{part}.{name}"] = mine / theirs
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a few test files, the tiny main job and the benchmarks' "
                    "--quick sizes (under 3 minutes on a 2-core CPU)")
    ap.add_argument("--parts", nargs="+", default=list(TIMEOUTS), choices=TIMEOUTS,
                    help="parts to run (default: all)")
    ap.add_argument("--timeout-scale", type=float, default=1.0,
                    help="multiplies every part's timeout (slow or loaded machines)")
    ap.add_argument("--test-workers", default="auto",
                    help="pytest-xdist workers of the tests part ('auto': one per "
                    "core)")
    ap.add_argument("--cpu-reference", default=None,
                    help="JSON of an earlier run on a CPU: adds its figures and the "
                    "ratios this device / CPU")
    ap.add_argument("--work-dir", default=None,
                    help="folder for the parts' outputs (default: a temporary one)")
    ap.add_argument("--out", default=None,
                    help="JSON path (results/device_check[_quick].json)")
    args = ap.parse_args(argv)
    if args.timeout_scale <= 0:
        ap.error("--timeout-scale must be positive")
    reference = None
    if args.cpu_reference is not None:
        try:
            reference = json.loads(Path(args.cpu_reference).read_text())
        except (OSError, ValueError) as err:
            ap.error(f"--cpu-reference {args.cpu_reference}: {err}")
        if "parts" not in reference:
            ap.error(f"--cpu-reference {args.cpu_reference}: not a device_check JSON")
    out_path = Path(args.out or REPO_ROOT / "results" / (
        "device_check_quick.json" if args.quick else "device_check.json"))

    timeouts = QUICK_TIMEOUTS if args.quick else TIMEOUTS
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        todo = commands(args.quick, work, args.test_workers)
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        start, parts = time.perf_counter(), {}
        for part in ["environment", *(p for p in args.parts if p != "environment")]:
            parts[part] = run_part(part, todo[part], out=work, env=env,
                                   timeout=timeouts[part] * args.timeout_scale)
            if part == "environment" and parts[part]["ok"]:
                # The tests' conftest pins the CPU unless told the platform.
                env["JAX_PLATFORMS"] = parts[part]["figures"]["platform"]
            print(f"{part}: {'ok' if parts[part]['ok'] else parts[part]['error']} "
                  f"({parts[part]['wall_s']:.1f} s)", flush=True)
    payload = {"benchmark": "device_check", "quick": args.quick,
               "device": parts["environment"].get("figures"),
               "wall_s": time.perf_counter() - start, "parts": parts,
               "failed": [p for p, r in parts.items() if not r["ok"]]}
    if reference is not None:
        payload["cpu_reference"] = {"path": str(args.cpu_reference),
                                    "device": reference.get("device"),
                                    "quick": reference.get("quick"),
                                    "parts": {p: r.get("figures")
                                              for p, r in reference["parts"].items()}}
        payload["ratios_device_over_cpu"] = ratios(parts, reference)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=1))
    print(f"wall time {payload['wall_s']:.0f} s; failed: {payload['failed'] or 'none'}"
          f"; wrote {out_path}")
    return 1 if payload["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
