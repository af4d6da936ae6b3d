"""Scale: kernel surrogates at m = 100,000, estimation of many subsets, sharding.

Three measurements, each in its own child process (so that the peak resident
memory is that measurement's alone):

1. **Kernel surrogate fit + predict**, K = ``--num-tasks`` (50) tasks, T =
   ``--num-targets`` (100) targets, m in ``--sizes`` (1,000 to 100,000) random
   masks (each task in with probability 1/2), 1,000 held-out masks. The scores
   are a planted smooth function (linear effects plus a rank-4 tanh term, so
   tasks interact) with noise; the held-out Spearman (mean over targets) is
   against the noiseless function. The exact solver (dense m × m Cholesky)
   runs up to ``--exact-max`` subsets, the large-m solver (Nyström centres,
   preconditioned conjugate gradients) at every size; both with the same
   width and ridge.
2. **Estimation of many subsets** on the ``modular`` workload (``--preset``):
   ``--estimation-subsets`` random subsets with the workload's estimator
   (``--estimation-output-mode``, ``--estimation-proj-dim``), time and peak
   memory, the scores streamed to a chunk store.
3. **Sharded programs** on 8 simulated CPU devices (on any machine)
   (``XLA_FLAGS=--xla_force_host_platform_device_count=8``): retraining,
   linearized estimation and exhaustive selection over a mesh of 8 devices
   against the same programs on one device of that process (max absolute
   difference), and XLA's per-device memory of a retraining chunk.

Writes ``results/bench_scale.json`` and prints the tables last.

    python benchmarks/bench_scale.py
    python benchmarks/bench_scale.py --sizes 1000 8000 --skip-estimation
    python benchmarks/bench_scale.py --quick     # CI smoke, tiny presets
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

import numpy as np
from _common import (
    add_quick,
    environment,
    fill_defaults,
    format_table,
    memory_analysis,
    peak_rss_mib,
    write_json,
)

HELDOUT = 1000
SIMULATED_DEVICES = 8


def peak_rss_gb() -> float:
    return peak_rss_mib() / 2**10


# ---------------------------------------------------------------------------
# Children (one measurement each; print one JSON line).


def planted_problem(seed: int, num_subsets: int, num_tasks: int, num_targets: int):
    """Masks ``[m + HELDOUT, K]`` float32, noisy and noiseless scores ``[., T]``."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((num_subsets + HELDOUT, num_tasks)) < 0.5).astype(np.float32)
    rank = 4
    linear = rng.normal(size=(num_tasks, num_targets)) / np.sqrt(num_tasks)
    pair_in = rng.normal(size=(num_tasks, rank)) / np.sqrt(num_tasks)
    pair_out = rng.normal(size=(rank, num_targets))
    clean = masks @ linear + np.tanh(masks @ pair_in) @ pair_out
    noisy = clean + 0.1 * clean.std() * rng.normal(size=clean.shape)
    return masks, noisy.astype(np.float32), clean.astype(np.float32)


def child_surrogate(args) -> dict:
    import jax

    from tasksurrogate_jax.core import metrics, nystrom, surrogates

    masks, noisy, clean = planted_problem(args.seed, args.m, args.num_tasks,
                                          args.num_targets)
    fit_masks, fit_scores = masks[:args.m], noisy[:args.m]
    held_masks, held_truth = masks[args.m:], clean[args.m:]
    rss_before = peak_rss_gb()
    start = time.perf_counter()
    iterations = None
    if args.solver == "exact":
        surrogate = surrogates.fit_kernel_surrogate(fit_masks, fit_scores,
                                                    ridge=args.ridge, solver="exact")
    else:
        fit = nystrom.fit_nystrom_surrogate(fit_masks, fit_scores, ridge=args.ridge,
                                            key=jax.random.key(args.seed))
        surrogate = fit.surrogate
        iterations = int(np.max(np.asarray(fit.iterations)))
    jax.block_until_ready(surrogate.alpha)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    predicted = jax.block_until_ready(surrogate.predict(held_masks))
    predict_s = time.perf_counter() - start
    spearman = np.asarray(metrics.spearman(held_truth, np.asarray(predicted)))
    return {"section": "surrogate", "solver": args.solver, "num_subsets": args.m,
            "num_centers": int(surrogate.train_masks.shape[0]),
            "cg_iterations": iterations,
            "fit_s": fit_s, "predict_s": predict_s, "total_s": fit_s + predict_s,
            "heldout_spearman": float(np.nanmean(spearman)),
            "peak_rss_gb": peak_rss_gb(), "rss_before_fit_gb": rss_before}


def child_estimation(args) -> dict:
    import jax

    from tasksurrogate_jax.core.subsets import fixed_size_masks
    from tasksurrogate_jax.estimate.estimation import EstimationSettings
    from tasksurrogate_jax.workloads import modular_workload

    workload = modular_workload(args.preset)
    key = jax.random.key(args.seed)
    params = jax.block_until_ready(workload.base_params(key=key))
    masks = np.asarray(fixed_size_masks(
        jax.random.fold_in(key, 2), args.m, workload.num_tasks,
        subset_size=workload.num_tasks - workload.num_tasks // 4))
    settings = EstimationSettings(output_mode=args.output_mode,
                                  proj_dim=args.proj_dim)
    rss_before = peak_rss_gb()
    with tempfile.TemporaryDirectory() as store:
        start = time.perf_counter()
        result = workload.estimate(masks, key=key, settings=settings,
                                   base_params=params, chunk_size=args.chunk_size,
                                   store_dir=Path(store) / "estimates")
        scores = np.asarray(jax.block_until_ready(result.scores))
        seconds = time.perf_counter() - start
    return {"section": "estimation", "workload": "modular", "preset": args.preset,
            "num_subsets": args.m, "num_targets": int(scores.shape[1]),
            "output_mode": args.output_mode, "proj_dim": args.proj_dim,
            "chunk_size": args.chunk_size, "seconds": seconds,
            "ms_per_subset": 1e3 * seconds / args.m,
            "scores_gb": scores.nbytes / 2**30,
            "all_finite": bool(np.isfinite(scores).all()),
            "peak_rss_gb": peak_rss_gb(), "rss_before_estimation_gb": rss_before}


def child_sharding(args) -> dict:
    """Run with 8 simulated devices: each program on a mesh of all 8 and on a
    mesh of the first device alone, in this one process."""
    import jax

    from tasksurrogate_jax.core import surrogates
    from tasksurrogate_jax.downstream import selection
    from tasksurrogate_jax.truth import retraining, sharding
    from tasksurrogate_jax.workloads import digits_workload

    if jax.device_count() != SIMULATED_DEVICES:
        raise RuntimeError(f"expected {SIMULATED_DEVICES} devices, got "
                           f"{jax.device_count()}: set XLA_FLAGS.")
    workload = digits_workload(args.preset)
    key = jax.random.key(args.seed)
    params = workload.base_params(key=key)
    rng = np.random.default_rng(args.seed)
    masks = (rng.random((args.m, workload.num_tasks)) < 0.6).astype(np.float32)
    masks[:, 0] = 1.0  # never empty
    meshes = {"eight": sharding.subset_mesh(),
              "one": sharding.subset_mesh(jax.devices()[:1])}
    out, seconds = {}, {}
    for name, mesh in meshes.items():
        start = time.perf_counter()
        out[name, "finetune"] = np.asarray(workload.retrain(
            masks, key=key, regime="finetune", base_params=params, chunk_size=32,
            progress=False, mesh=mesh).losses)[0]  # replicate 0
        out[name, "estimate"] = np.asarray(workload.estimate(
            masks, key=key, base_params=params, chunk_size=32, mesh=mesh).scores)
        fitted = surrogates.fit_kernel_surrogate(masks, out[name, "finetune"],
                                                 solver="exact")
        chosen = selection.select_subset(fitted, workload.num_tasks,
                                         method="exhaustive", mesh=mesh)
        out[name, "selection"] = np.asarray([chosen.predicted])
        seconds[name] = time.perf_counter() - start

    def chunk_memory(mesh, rows=64):
        """XLA's per-device memory of one fine-tuning chunk of ``rows``."""
        split = mesh if sharding.num_shards(mesh) > 1 else None
        compiled = retraining.retrain_chunk.lower(
            sharding.shard_subsets(masks[np.arange(rows) % args.m], mesh),
            sharding.replicate(params, mesh), sharding.replicate(key, mesh),
            sharding.replicate(workload.data, mesh),
            sharding.replicate(workload.target, mesh), spec=workload.finetune_spec,
            mesh=split).compile()
        return memory_analysis(compiled).get("total_bytes", np.nan) / 2**20

    return {"section": "sharding", "workload": "digits", "preset": args.preset,
            "num_subsets": args.m, "devices": SIMULATED_DEVICES,
            "max_abs_diff": {what: float(np.max(np.abs(out["eight", what]
                                                       - out["one", what])))
                             for what in ("finetune", "estimate", "selection")},
            "max_abs_value": {what: float(np.max(np.abs(out["one", what])))
                              for what in ("finetune", "estimate", "selection")},
            "chunk64_mib_per_device": {"eight": chunk_memory(meshes["eight"]),
                                       "one": chunk_memory(meshes["one"])},
            "seconds": seconds}


def run_child(args, section: str, extra: list[str], env=None) -> dict:
    """Runs this script as a child measuring one thing; returns its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", section,
               "--seed", str(args.seed), "--num-tasks", str(args.num_tasks),
               "--num-targets", str(args.num_targets), "--ridge", str(args.ridge),
               "--preset", args.preset,
               "--out", args.out, *extra]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


CHILDREN = {"surrogate": child_surrogate, "estimation": child_estimation,
            "sharding": child_sharding}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_quick(ap, "m = 300 (exact and Nystrom), 64 estimated subsets and 8 "
              "sharded ones on the 'tiny' presets", "bench_scale")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="numbers of subsets m of the surrogate fits "
                    "(1000 ... 100000; quick 300)")
    ap.add_argument("--exact-max", type=int, default=16000,
                    help="largest m for the exact solver")
    ap.add_argument("--num-tasks", type=int, default=50)
    ap.add_argument("--num-targets", type=int, default=None,
                    help="targets of the surrogate fits (100; quick 10)")
    ap.add_argument("--ridge", type=float, default=1e-1)
    ap.add_argument("--preset", default=None,
                    help="preset of the modular (estimation) and digits (sharding) "
                    "workloads (cpu; quick tiny)")
    ap.add_argument("--estimation-subsets", type=int, default=None,
                    help="subsets to estimate (100000; quick 64)")
    ap.add_argument("--output-mode", default="margin",
                    help="estimation output mode (margin: the fastest; see "
                         "bench_estimation.py for its accuracy)")
    ap.add_argument("--proj-dim", type=int, default=None,
                    help="estimation projection dimension (512; quick 64)")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="subsets per compiled estimation call (256; quick 32)")
    ap.add_argument("--sharding-subsets", type=int, default=None,
                    help="subsets of the sharded programs (61; quick 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-estimation", action="store_true")
    ap.add_argument("--skip-sharding", action="store_true")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--m", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--solver", help=argparse.SUPPRESS)
    args = fill_defaults(
        ap.parse_args(),
        {"sizes": [1000, 2000, 4000, 8000, 16000, 32000, 100000], "num_targets": 100,
         "preset": "cpu", "estimation_subsets": 100000, "proj_dim": 512,
         "chunk_size": 256, "sharding_subsets": 61},
        {"sizes": [300], "num_targets": 10, "preset": "tiny",
         "estimation_subsets": 64, "proj_dim": 64, "chunk_size": 32,
         "sharding_subsets": 8},
        name="bench_scale")
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    payload = {"benchmark": "bench_scale", "environment": environment(),
               "arguments": {k: v for k, v in vars(args).items()
                             if k not in ("child", "m", "solver")},
               "surrogate": [], "estimation": None, "sharding": None}

    def save(section, row):
        print(json.dumps(row), flush=True)
        if isinstance(payload[section], list):
            payload[section].append(row)
        else:
            payload[section] = row
        write_json(args.out, payload)  # after every measurement: nothing lost

    for m in args.sizes:
        for solver in ("exact", "nystrom"):
            if solver == "exact" and m > args.exact_max:
                continue
            save("surrogate", run_child(args, "surrogate",
                                        ["--m", str(m), "--solver", solver]))
    if not args.skip_sharding:
        save("sharding", run_child(
            args, "sharding", ["--m", str(args.sharding_subsets)],
            env={"JAX_PLATFORMS": "cpu",  # simulated devices, on any machine
                 "XLA_FLAGS": "--xla_force_host_platform_device_count="
                              f"{SIMULATED_DEVICES}"}))
    if not args.skip_estimation:
        save("estimation", run_child(
            args, "estimation",
            ["--m", str(args.estimation_subsets), "--output-mode", args.output_mode,
             "--proj-dim", str(args.proj_dim), "--chunk-size", str(args.chunk_size)]))

    print(f"\nKernel surrogate fit + predict (K={args.num_tasks}, "
          f"T={args.num_targets}, {HELDOUT} held-out masks):")
    print(format_table(payload["surrogate"], [
        "solver", "num_subsets", "num_centers", "cg_iterations", "fit_s", "predict_s",
        "total_s", "heldout_spearman", "peak_rss_gb"]))
    if payload["sharding"]:
        row = payload["sharding"]
        print(f"\nSharded on {row['devices']} simulated devices vs one device "
              f"(digits {args.preset}, {row['num_subsets']} subsets):")
        print(format_table([
            {"program": what, "max_abs_diff": row["max_abs_diff"][what],
             "max_abs_value": row["max_abs_value"][what]}
            for what in row["max_abs_diff"]],
            ["program", "max_abs_diff", "max_abs_value"]))
        print("fine-tuning chunk of 64, MiB per device: {eight:.3g} on 8 devices, "
              "{one:.3g} on one".format(**row["chunk64_mib_per_device"]))
    if payload["estimation"]:
        print(f"\nEstimation (modular {args.preset}):")
        print(format_table([payload["estimation"]], [
            "num_subsets", "output_mode", "proj_dim", "seconds", "ms_per_subset",
            "scores_gb", "peak_rss_gb"]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
