"""Measures the modular workload's preset: accuracy, LOO spread and timings.

Trains the full set and the K leave-one-out subsets (K + 1 runs), plus
``--num-random`` random subsets that each drop ``--drop`` of the K tasks (3 of 25:
the paper's protocol), all in one call with shared seeds (the mask is the only
difference). Prints a summary and writes JSON.

    python benchmarks/modular_cpu_preset.py --preset cpu --chunk-size 32 \
        --out results/modular_cpu_preset.json
    python benchmarks/modular_cpu_preset.py --quick     # CI smoke: 'tiny' preset

``--set field=value`` (repeatable) overrides a preset field (for tuning).
"""

from __future__ import annotations

import argparse
import platform

import jax
import numpy as np
from _common import (
    add_quick,
    add_workload_args,
    environment,
    fill_defaults,
    timed,
    write_json,
)

from tasksurrogate_jax.core.subsets import fixed_size_masks, leave_one_out_masks
from tasksurrogate_jax.workloads.modular import block_task_ids, modular_workload


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_quick(ap, "the 'tiny' preset and 4 random subsets", "modular_cpu_preset")
    add_workload_args(ap, "ModularConfig")
    ap.add_argument("--num-random", type=int, default=None,
                    help="random subsets dropping --drop tasks (64; quick 4)")
    ap.add_argument("--drop", type=int, default=3,
                    help="tasks each random subset drops")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="subsets per compiled call (default: by memory)")
    ap.add_argument("--seed", type=int, default=0)
    args = fill_defaults(ap.parse_args(), {"preset": "cpu", "num_random": 64},
                         {"preset": "tiny", "num_random": 4},
                         name="modular_cpu_preset")

    w, t_build = timed(lambda: modular_workload(args.preset, **args.overrides))
    c, K = w.config, w.num_tasks
    if not 0 < args.drop < K:
        ap.error(f"--drop must be between 1 and {K - 1} (the preset has {K} tasks)")
    key = jax.random.key(args.seed)
    loo = leave_one_out_masks(K)  # [K + 1, K]: the full set, then the LOO sets
    rand = fixed_size_masks(jax.random.key(args.seed + 1), args.num_random, K,
                            subset_size=K - args.drop)

    # All runs in one call (one compiled program), replicate 0 of 1:
    # losses and 0/1 accuracy [1, K + 1 + num_random, T] -> [K + 1 + num_random, T].
    result, t_train = timed(lambda: w.retrain(
        np.concatenate([loo, rand]), key=key, regime="scratch",
        chunk_size=args.chunk_size, progress=True))
    all_losses = np.asarray(result.losses[0], np.float64)
    all_accuracy = np.asarray(result.accuracy[0], np.float64)
    losses, accuracy = all_losses[:K + 1], all_accuracy[:K + 1]  # [K + 1, T]
    full = losses[0]
    effects = losses[1:] - full  # [K, T]: F(s* - e_i) - F(s*)
    mean_effect = effects.mean(1)
    # Locality: targets in block i versus the others, when task i is removed.
    tblock = block_task_ids(np.asarray(w.target.inputs), p=c.p, grid=c.grid)
    in_block = [effects[i, tblock == i].mean() for i in range(K)
                if (tblock == i).any()]
    out_block = [effects[i, tblock != i].mean() for i in range(K)]
    rand_mean = all_losses[K + 1:].mean(1)  # [num_random]
    summary = {
        "preset": args.preset,
        "config": w.fingerprint(),
        "num_tasks": K,
        "num_train": w.data.num_examples,
        "num_targets": w.num_targets,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "full_test_accuracy": float(accuracy[0].mean()),
        "full_mean_target_loss": float(full.mean()),
        "loo_accuracy_min": float(accuracy[1:].mean(1).min()),
        "loo_effect_mean_loss": mean_effect.tolist(),
        "loo_effect_std": float(mean_effect.std()),
        "loo_effect_min": float(mean_effect.min()),
        "loo_effect_max": float(mean_effect.max()),
        "loo_effect_relative_std": float(mean_effect.std() / full.mean()),
        "loo_effect_in_removed_block": float(np.mean(in_block)),
        "loo_effect_outside_removed_block": float(np.mean(out_block)),
        "random_subsets_mean_loss_std": float(rand_mean.std()),
        "random_subsets_accuracy_mean": float(all_accuracy[K + 1:].mean()),
        "seconds_build": t_build,
        "seconds_total_training": t_train,
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
