"""Measures the modular workload's preset: accuracy, LOO spread and timings.

Trains the full set and the K leave-one-out subsets (K + 1 runs), plus
``--num-random`` random subsets that each drop 3 of the 25 tasks (the paper's
protocol), all with shared seeds (the mask is the only difference). Prints a
summary and writes JSON.

    python benchmarks/modular_cpu_preset.py --preset cpu --chunk-size 32 \
        --out results/modular_cpu_preset.json

Extra ``--set field=value`` pairs override preset fields (for tuning).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
from _common import REPO_ROOT, environment, parse_overrides, write_json

from tasksurrogate_jax.subsets import fixed_size_masks, leave_one_out_masks
from tasksurrogate_jax.workloads.modular import block_task_ids, modular_workload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--num-random", type=int, default=64)
    ap.add_argument("--drop", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="field=value overrides")
    ap.add_argument("--out", default=str(REPO_ROOT / "results/modular_cpu_preset.json"))
    args = ap.parse_args()
    overrides = parse_overrides(args.set)

    t0 = time.perf_counter()
    w = modular_workload(args.preset, **overrides)
    c = w.config
    K = w.num_tasks
    key = jax.random.key(args.seed)
    loo = leave_one_out_masks(K)
    rand = fixed_size_masks(jax.random.key(args.seed + 1), args.num_random, K,
                            subset_size=K - args.drop)
    t_build = time.perf_counter() - t0

    t0 = time.perf_counter()
    r_loo = w.retrain(loo, key=key, regime="scratch", chunk_size=args.chunk_size,
                      progress=True)
    jax.block_until_ready(r_loo.losses)
    t_loo = time.perf_counter() - t0
    t0 = time.perf_counter()
    r_rand = w.retrain(rand, key=key, regime="scratch", chunk_size=args.chunk_size,
                       progress=True)
    jax.block_until_ready(r_rand.losses)
    t_rand = time.perf_counter() - t0

    losses = np.asarray(r_loo.losses[0], np.float64)  # one replicate
    full = losses[0]
    effects = losses[1:] - full  # [K, T]: F(s* - e_i) - F(s*)
    mean_effect = effects.mean(1)
    # Locality: targets in block i versus the others, when task i is removed.
    tblock = block_task_ids(np.asarray(w.target.inputs), p=c.p, grid=c.grid)
    in_block = [effects[i, tblock == i].mean() for i in range(K)
                if (tblock == i).any()]
    out_block = [effects[i, tblock != i].mean() for i in range(K)]
    rand_mean = np.asarray(r_rand.losses[0], np.float64).mean(1)
    summary = {
        "preset": args.preset,
        "config": w.fingerprint(),
        "num_train": w.data.num_examples,
        "num_targets": w.num_targets,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "full_test_accuracy": float(np.asarray(r_loo.accuracy[0]).mean()),
        "full_mean_target_loss": float(full.mean()),
        "loo_accuracy_min": float(np.asarray(r_loo.accuracy[1:]).mean(1).min()),
        "loo_effect_mean_loss": mean_effect.tolist(),
        "loo_effect_std": float(mean_effect.std()),
        "loo_effect_min": float(mean_effect.min()),
        "loo_effect_max": float(mean_effect.max()),
        "loo_effect_relative_std": float(mean_effect.std() / full.mean()),
        "loo_effect_in_removed_block": float(np.mean(in_block)),
        "loo_effect_outside_removed_block": float(np.mean(out_block)),
        "random_subsets_mean_loss_std": float(rand_mean.std()),
        "random_subsets_accuracy_mean": float(np.asarray(r_rand.accuracy).mean()),
        "seconds_build": t_build,
        "seconds_loo_runs": t_loo,
        "seconds_random_runs": t_rand,
        "seconds_total_training": t_loo + t_rand,
        "num_runs": int(loo.shape[0] + rand.shape[0]),
    }
    for k, v in summary.items():
        if k not in ("loo_effect_mean_loss", "config"):
            print(f"{k:36s} {v}")
    print("config", summary["config"])
    print("LOO effects (mean target loss):", np.round(mean_effect, 4).tolist())
    print("wrote", write_json(args.out, {**summary, "environment": environment()}))


if __name__ == "__main__":
    main()
