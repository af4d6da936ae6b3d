"""Why do (or don't) kernel surrogates beat linear ones on the modular workload?

Reuses a pipeline run's stored scores (``tasksurrogate run modular --preset
cpu`` writes them to ``results/modular-cpu-finetune-seed0``; a missing stage is
computed and stored; ``--workload digits`` and ``--regime scratch`` for the
others) and varies what the surrogates see, all on the same retrained
models:

- the number of fitting subsets (the first n rows of the fitting pool);
- the kernel's hyperparameters: closed-form LOO cross-validation on MSE or
  Spearman, the reference code's fixed ``γ = 1/K, λ = 1e-2``, and fixed γ with
  the CV ridge;
- the target aggregation: one surrogate per target column, or one fitted on
  the mean target loss;
- the ceiling: the split-half reliability of the ground truth's replicates;
  with ``--stability VARIANT ...`` (each a space-free list of ``field=value``
  workload overrides joined by commas), the same ceiling for other training
  settings (only the LOO stages are run for those).

For each: LOO Spearman of the predicted effects (mean over targets, and on the
mean target) and held-out Spearman, for the linear and the kernel surrogate.

    python benchmarks/modular_attribution_study.py \
        --run-dir results/modular-cpu-finetune-seed0
    python benchmarks/modular_attribution_study.py --quick   # CI smoke
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from _common import (
    REPO_ROOT,
    add_quick,
    environment,
    fill_defaults,
    format_table,
    parse_overrides,
    write_json,
)

from tasksurrogate_jax.core import metrics, surrogates
from tasksurrogate_jax.downstream import attribution
from tasksurrogate_jax.pipeline import PipelineConfig, ceiling, collect


def scores_of(surrogate, true_effects, heldout_masks, heldout_true):
    effects = np.asarray(attribution.loo_scores(surrogate))
    loo = metrics.loo_correlation(true_effects=true_effects, predicted_effects=effects)
    predicted = np.asarray(surrogate.predict(heldout_masks))
    return {"loo_spearman": float(loo.mean),
            "loo_spearman_mean_target": float(loo.mean_target),
            "heldout_spearman": float(metrics.mean_spearman(heldout_true, predicted)),
            "heldout_spearman_mean_target": float(metrics.spearman(
                heldout_true.mean(1), predicted.mean(1)))}


def ceiling_of(run, num_fit) -> dict:
    """The ground truth's reliability across its replicates (the pipeline's)."""
    effects = run.loo_scores[:, 1:] - run.loo_scores[:, :1]  # [R, K, T]
    reliable = ceiling(run.loo_scores, run.exact[:, num_fit:])
    return {"loo_spearman": reliable["loo_spearman_per_target"],
            "loo_spearman_mean_target": reliable["loo_spearman_mean_target"],
            "heldout_spearman": reliable["heldout_spearman"],
            "effect_std": float(effects.mean(0).mean(1).std()),
            "replicate_effect_std": float(effects.mean(2).std(0).mean()),
            "full_set_loss": float(run.loo_scores[:, 0].mean())}


def kernel_variants(masks, scores, num_tasks):
    """(name, fitted kernel surrogate) for each hyperparameter choice."""
    out = []
    for criterion in ("mse", "spearman"):
        search = surrogates.select_kernel_hyperparameters(
            masks, scores, criterion=criterion,
            ridges=surrogates.default_ridge_grid(len(masks), scores.dtype))
        out.append((f"kernel, LOO-CV {criterion} (γ={float(search.gamma):.3g}, "
                    f"λ={float(search.ridge):.3g})",
                    surrogates.fit_kernel_surrogate(masks, scores,
                                                    gamma=float(search.gamma),
                                                    ridge=float(search.ridge))))
    out.append(("kernel, reference fixed (γ=1/K, λ=1e-2)",
                surrogates.fit_kernel_surrogate(masks, scores, gamma=1.0 / num_tasks,
                                                ridge=1e-2)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_quick(ap, "the 'tiny' preset from scratch, 2 replicates, 12 + 6 subsets, "
              "no stored run folder, no baselines, the cheapest estimates")
    ap.add_argument("--run-dir", "--out-dir", dest="run_dir", default=None,
                    help="the pipeline run's folder, same configuration (default "
                    "results/<workload>-<preset>-<regime>-seed<seed>; quick: none, "
                    "nothing stored)")
    ap.add_argument("--workload", default="modular")
    ap.add_argument("--preset", default=None, help="workload preset (cpu; quick tiny)")
    ap.add_argument("--regime", default=None, choices=("finetune", "scratch"),
                    help="ground-truth regime (finetune; quick scratch: the tiny "
                    "preset fine-tunes full-batch, so its replicates coincide)")
    ap.add_argument("--replicates", type=int, default=None,
                    help="paired replicates of the ground truth (4; quick 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-subsets", type=int, default=None,
                    help="fitting subsets (96; quick 12)")
    ap.add_argument("--num-heldout", type=int, default=None,
                    help="held-out subsets (32; quick 6)")
    ap.add_argument("--drop", type=int, default=3, help="tasks each subset drops")
    ap.add_argument("--sizes", type=int, nargs="*", default=None,
                    help="numbers of fitting subsets to compare (12 24 48 96; "
                    "quick 6 12)")
    ap.add_argument("--stability", nargs="*", default=[],
                    help="workload overrides, e.g. batch_size=None,num_steps=1200")
    ap.add_argument("--out", "--json", dest="out", default=None,
                    help="JSON path (results/attribution_study[_quick].json)")
    args = fill_defaults(
        ap.parse_args(),
        {"preset": "cpu", "regime": "finetune", "replicates": 4, "num_subsets": 96,
         "num_heldout": 32, "sizes": [12, 24, 48, 96]},
        {"preset": "tiny", "regime": "scratch", "replicates": 2, "num_subsets": 12,
         "num_heldout": 6, "sizes": [6, 12]},
        name="attribution_study")
    if max(args.sizes) > args.num_subsets:
        ap.error(f"--sizes must be at most --num-subsets ({args.num_subsets})")
    if args.run_dir is None and not args.quick:
        args.run_dir = str(REPO_ROOT / "results" / (
            f"{args.workload}-{args.preset}-{args.regime}-seed{args.seed}"))

    config = PipelineConfig(workload=args.workload, preset=args.preset,
                            seed=args.seed, regime=args.regime,
                            replicates=args.replicates, num_subsets=args.num_subsets,
                            num_heldout=args.num_heldout, drop=args.drop)
    if args.quick:  # the stages this study does not read, at their cheapest
        config = dataclasses.replace(config, baselines=(), value_samples=0,
                                     estimation_method="solve", estimation_ridge=1.0,
                                     proj_dim=32)
    run = collect(config, out_dir=args.run_dir)
    num_tasks = run.masks.shape[1]
    true_effects = (run.loo_scores[:, 1:] - run.loo_scores[:, :1]).mean(0)
    exact = run.exact.mean(0)
    m = args.num_subsets
    heldout_masks, heldout_true = run.masks[m:], exact[m:]
    rows = []

    def add(setting, surrogate, num_fit, mean_target=False):
        truth = true_effects.mean(1, keepdims=True) if mean_target else true_effects
        held = heldout_true.mean(1, keepdims=True) if mean_target else heldout_true
        rows.append({"setting": setting, "num_fit": num_fit, "mean_target": mean_target,
                     **scores_of(surrogate, truth, heldout_masks, held)})

    for n in args.sizes:
        masks, scores = run.masks[:n], exact[:n]
        add("linear (least squares)", surrogates.fit_linear_surrogate(masks, scores),
            num_fit=n)
        for name, surrogate in kernel_variants(masks, scores, num_tasks):
            add(name, surrogate, num_fit=n)
    masks, mean_scores = run.masks[:m], exact[:m].mean(1, keepdims=True)
    add("linear on the mean target", surrogates.fit_linear_surrogate(
        masks, mean_scores), num_fit=m, mean_target=True)
    for name, surrogate in kernel_variants(masks, mean_scores, num_tasks):
        add(f"{name} on the mean target", surrogate, num_fit=m, mean_target=True)

    ceilings = [{"variant": "preset", **ceiling_of(run, m)}]
    for variant in args.stability:
        overrides = tuple(parse_overrides(variant.split(",")).items())
        other = collect(dataclasses.replace(
            config, overrides=overrides, num_subsets=4, num_heldout=3,
            baselines=(), value_samples=0), out_dir=None)
        ceilings.append({"variant": variant, **ceiling_of(other, 4)})
    print("\nThe ground truth's ceiling (split-half reliability of its replicates):\n")
    print(format_table(ceilings, ["variant", "loo_spearman", "loo_spearman_mean_target",
                                  "heldout_spearman", "effect_std",
                                  "replicate_effect_std", "full_set_loss"]))
    print()
    print(format_table(rows, ["setting", "num_fit", "mean_target", "loo_spearman",
                              "loo_spearman_mean_target", "heldout_spearman",
                              "heldout_spearman_mean_target"]))
    path = write_json(args.out, {"benchmark": "modular_attribution_study",
                                  "environment": environment(), "config": vars(args),
                                  "ceilings": ceilings, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
