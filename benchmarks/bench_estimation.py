"""First-order estimates of F(s) versus real fine-tuning, side by side.

On the modular workload (``cpu`` preset): train θ* on all tasks, draw m subsets
(each drops 3 of the 25 tasks, the paper's protocol), then

- ``estimate``: ``workload.estimate`` (features at θ*, one vmapped solve per
  chunk of subsets), compiled on a first small call, then timed;
- ``fine-tune``: ``retraining.retrain`` from θ* on every subset (vmapped,
  ``workload.finetune_variant()``), the ground truth the estimate approximates.

Prints time ratio, relative error of the target-task score (mean over target
columns), Spearman of F̂ against F across subsets (mean over targets), and
``||θ_s − θ*|| / ||θ*||``; then the same errors for several ``proj_dim`` and
ridge values and for the full-space mode (on the first subsets only).

    python benchmarks/bench_estimation.py --num-subsets 256
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from _common import REPO_ROOT, environment, format_table, write_json

from tasksurrogate_jax import estimation, metrics
from tasksurrogate_jax.projection import num_parameters
from tasksurrogate_jax.subsets import fixed_size_masks
from tasksurrogate_jax.workloads.modular import modular_workload


def errors(estimated, exact) -> dict:
    """Relative error of the mean-target score and Spearman across subsets."""
    est_mean, exact_mean = estimated.mean(1), exact.mean(1)
    rel = np.abs(est_mean - exact_mean) / np.abs(exact_mean)
    return {
        "mean_rel_error": float(rel.mean()),
        "max_rel_error": float(rel.max()),
        "spearman_mean_target": float(metrics.spearman(exact_mean, est_mean)),
        "mean_spearman_per_target": float(metrics.mean_spearman(exact, estimated)),
    }


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--num-subsets", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proj-dim", type=int, default=128)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--output-mode", default="logits",
                    choices=estimation.OUTPUT_MODES)
    ap.add_argument("--solver", default="newton", choices=estimation.SOLVERS)
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--finetune-steps", type=int, default=None,
                    help="default: workload.finetune_variant() (a quarter of the "
                         "preset's steps)")
    ap.add_argument("--finetune-lr", type=float, default=None,
                    help="default: workload.finetune_variant() (a tenth of the "
                         "preset's learning rate)")
    ap.add_argument("--finetune-proximal", type=float, default=0.0,
                    help="μ > 0: fine-tune on L_s + μ/2 ||θ − θ*||² (full batch, "
                         "learning rate decayed to 0) and give every estimate "
                         "the matching ridge, μ p / d projected and μ in the "
                         "full space (--ridge and --sweep-ridges are ignored)")
    ap.add_argument("--sweep-proj-dims", type=int, nargs="*", default=[32, 128, 512])
    ap.add_argument("--sweep-ridges", type=float, nargs="*", default=[1e-4, 1e-3, 1e-2])
    ap.add_argument("--full-space-subsets", type=int, default=16)
    ap.add_argument("--out", default=str(REPO_ROOT / "results/bench_estimation.json"))
    args = ap.parse_args()

    workload = modular_workload(args.preset)
    key = jax.random.key(args.seed)
    masks = fixed_size_masks(jax.random.fold_in(key, 7), args.num_subsets,
                             workload.num_tasks, subset_size=workload.num_tasks - 3)
    theta, base_seconds = timed(lambda: workload.base_params(key=key))
    theta_norm = float(optax.tree_utils.tree_norm(theta))
    mu = args.finetune_proximal
    num_params = num_parameters(theta)

    def ridges(proj_dim):
        """The ridges to try at one projection dimension (None: full space)."""
        if mu > 0:
            return [mu if proj_dim is None else mu * num_params / proj_dim]
        return args.sweep_ridges

    if mu > 0:
        args.ridge = ridges(args.proj_dim)[0]
    settings = estimation.SolverSettings(args.solver, max_iter=args.max_iter)
    options = {"proj_dim": args.proj_dim, "ridge": args.ridge,
               "output_mode": args.output_mode, "settings": settings}

    # Estimation: compile on a first call with the same chunk shape, then time.
    chunk = min(64, args.num_subsets)
    _, compile_seconds = timed(lambda: workload.estimate(
        masks[:chunk], key=key, base_params=theta, chunk_size=chunk, **options).scores)
    estimate, estimate_seconds = timed(lambda: workload.estimate(
        masks, key=key, base_params=theta, chunk_size=chunk, **options))

    # Ground truth: fine-tuning from θ* on every subset (vmapped chunks).
    if mu > 0:
        spec = workload.finetune_variant(
            num_steps=args.finetune_steps, learning_rate=args.finetune_lr,
            proximal=mu, anchor=theta, batch_size=None, decay_to_zero=True)
    else:
        spec = workload.finetune_variant(num_steps=args.finetune_steps,
                                      learning_rate=args.finetune_lr)
    start = time.perf_counter()
    check = estimation.check_estimation(
        estimate.scores, masks, params=theta, data=workload.data,
        target=workload.target, spec=spec, key=jax.random.fold_in(key, 2),
        progress=True)
    finetune_seconds = time.perf_counter() - start
    exact = np.asarray(check.exact)
    first_order = errors(np.asarray(check.first_order), exact)

    headline = {
        "proj_dim": args.proj_dim, "ridge": args.ridge,
        "estimate_s": estimate_seconds, "estimate_compile_s": compile_seconds,
        "finetune_s": finetune_seconds,
        "speedup": finetune_seconds / estimate_seconds,
        **errors(np.asarray(estimate.scores), exact),
        "param_shift_mean": float(np.mean(check.param_shift)),
        "param_shift_max": float(np.max(check.param_shift)),
        "estimate_shift_mean": float(np.mean(estimate.delta_norm) / theta_norm),
        # The linearization's own error where fine-tuning went (no solver).
        "first_order_at_finetuned_rel_error": first_order["mean_rel_error"],
        "first_order_at_finetuned_spearman": first_order["mean_spearman_per_target"],
    }
    print(f"\nθ* trained in {base_seconds:.1f} s; {args.num_subsets} subsets, "
          f"fine-tuning {spec.num_steps} steps each.\n")
    print(format_table([headline], ["proj_dim", "ridge", "estimate_s", "finetune_s",
                                    "speedup", "mean_rel_error", "max_rel_error",
                                    "spearman_mean_target", "mean_spearman_per_target",
                                    "param_shift_mean",
                                    "first_order_at_finetuned_rel_error",
                                    "first_order_at_finetuned_spearman"]))

    sweep = []
    for proj_dim in args.sweep_proj_dims:
        for ridge in ridges(proj_dim):
            result, seconds = timed(lambda p=proj_dim, r=ridge: workload.estimate(
                masks, key=key, base_params=theta, chunk_size=chunk, proj_dim=p,
                ridge=r, output_mode=args.output_mode, settings=settings).scores)
            sweep.append({"mode": "projected", "proj_dim": proj_dim, "ridge": ridge,
                          "seconds": seconds,
                          **errors(np.asarray(result), exact)})
    few = args.full_space_subsets
    if few:
        for ridge in ridges(None):
            result, seconds = timed(lambda r=ridge: workload.estimate(
                masks[:few], key=key, base_params=theta, chunk_size=few,
                proj_dim=None, ridge=r, output_mode=args.output_mode,
                settings=estimation.SolverSettings("lbfgs", max_iter=200,
                                                   tol=1e-6)).scores)
            sweep.append({"mode": f"full space ({few} subsets)", "proj_dim": None,
                          "ridge": ridge, "seconds": seconds,
                          **errors(np.asarray(result), exact[:few])})
            projected = workload.estimate(masks[:few], key=key, base_params=theta,
                                          chunk_size=few, proj_dim=args.proj_dim,
                                          ridge=args.ridge if mu > 0 else ridge,
                                          output_mode=args.output_mode,
                                          settings=settings)
            sweep.append({"mode": f"projected ({few} subsets)",
                          "proj_dim": args.proj_dim,
                          "ridge": args.ridge if mu > 0 else ridge,
                          **errors(np.asarray(projected.scores), exact[:few])})
    print("\nError against fine-tuning, by projection dimension and ridge:\n")
    print(format_table(sweep, ["mode", "proj_dim", "ridge", "seconds",
                               "mean_rel_error", "max_rel_error",
                               "spearman_mean_target", "mean_spearman_per_target"]))

    path = write_json(args.out, {
        "benchmark": "bench_estimation", "environment": environment(),
        "preset": args.preset, "config": vars(args),
        "finetune_steps": spec.num_steps, "base_train_s": base_seconds,
        "headline": headline, "sweep": sweep,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
