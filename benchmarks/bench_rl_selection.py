"""Multi-objective RL: task attribution and task selection with surrogates.

On the RL workload (``tasksurrogate_jax.workloads.rl``: CartPole variants with
different physics and target cart positions, one policy for all):

1. Train ``θ*`` on all variants; its returns against an untrained policy.
2. Ground truth: fine-tune ``θ*`` on the full set and on each leave-one-out
   set (and again with another training key: the ground truth's own noise).
3. Random subsets (each variant in with probability 1/2, or ``--subset-size``
   variants each; none empty, full or LOO): exact
   scores (fine-tuning) and first-order estimates (projected policy
   gradient); the estimate's relative error.
4. LOO correlation of the surrogates (linear and kernel, on exact and on
   estimated scores), the first-order estimate of the LOO sets themselves and
   gradient alignment at ``θ*`` (TracIn-style); held-out Spearman.
5. Selection, for each target variant: the subset with the best predicted
   target score under each surrogate (exhaustive over all non-empty subsets),
   fine-tuned on for real; its target return beside training on all variants,
   on random subsets, and on the best sampled subset. Improvement of kernel
   over linear selection.

    python benchmarks/bench_rl_selection.py            # cpu preset, ~10 min
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from _common import REPO_ROOT, environment, format_table, parse_overrides, write_json

from tasksurrogate_jax import attribution, metrics, pipeline, selection
from tasksurrogate_jax.subsets import (
    bernoulli_masks,
    fixed_size_masks,
    leave_one_out_masks,
    unique_masks,
)
from tasksurrogate_jax.workloads.rl import policy_gradients, rl_workload


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _random_subsets(key, num, num_tasks, size=None):
    """``num`` distinct non-empty subsets, none a LOO set or full: Bernoulli(1/2)
    or, with ``size``, uniform among those of ``size`` variants."""
    if size is None:
        masks = np.asarray(bernoulli_masks(key, 4 * num, num_tasks, p=0.5))
    else:
        masks = np.asarray(fixed_size_masks(key, 4 * num, num_tasks,
                                            subset_size=size))
    sizes = masks.sum(1)
    masks = np.asarray(unique_masks(masks[(sizes > 0) & (sizes < num_tasks - 1)]))
    if masks.shape[0] < num:
        raise ValueError(f"could not draw {num} distinct subsets of {num_tasks}.")
    return masks[:num]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="FIELD=VALUE", help="RLConfig field to override")
    ap.add_argument("--num-fit", type=int, default=60)
    ap.add_argument("--num-heldout", type=int, default=20)
    ap.add_argument("--subset-size", type=int, default=None,
                    help="variants per random subset (default: each in with "
                         "probability 1/2)")
    ap.add_argument("--proj-dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO_ROOT / "results/bench_rl_selection.json"))
    args = ap.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"preset {args.preset}")
    w = rl_workload(args.preset, **parse_overrides(args.overrides))
    k = w.num_tasks
    key = jax.random.key(args.seed)
    base, base_s = _timed(lambda: w.base_params(key=key))
    trained = -np.asarray(w.evaluate(base))
    untrained = -np.asarray(w.evaluate(w.init_fn(jax.random.key(args.seed + 100))))
    print(f"θ* trained in {base_s:.1f} s ({w.config.iterations} iterations)\n")
    print(format_table(
        [{"variant": n, "θ* return": float(a), "untrained return": float(b)}
         for n, a, b in zip(w.task_names, trained, untrained, strict=True)],
        ["variant", "θ* return", "untrained return"]))

    # Ground truth: LOO fine-tuning, twice (another training key).
    loo = np.asarray(leave_one_out_masks(k))
    truth, loo_s = _timed(lambda: np.asarray(w.exact_scores(loo, key=key)))
    true_effects = truth[1:] - truth[0]  # [K, T]
    replicate = np.asarray(w.exact_scores(loo, key=jax.random.fold_in(key, 1)))
    replicate_effects = replicate[1:] - replicate[0]

    masks = _random_subsets(jax.random.fold_in(key, 2),
                            args.num_fit + args.num_heldout, k, args.subset_size)
    m = args.num_fit
    exact, exact_s = _timed(lambda: np.asarray(w.exact_scores(masks, key=key)))
    estimated, estimate_s = _timed(lambda: np.asarray(
        w.estimated_scores(masks, key=key, proj_dim=args.proj_dim)))
    rel = float(np.mean(metrics.relative_error(estimated, exact)))
    rho = float(metrics.mean_spearman(exact, estimated))
    print(f"\n{masks.shape[0]} random subsets: fine-tuning {exact_s:.1f} s, "
          f"first-order estimate {estimate_s:.1f} s ({exact_s / estimate_s:.1f}x); "
          f"estimate relative error {rel:.2%}, Spearman across subsets {rho:.3f}")

    # Methods' LOO effects [K, T].
    effects, heldout = {}, {}
    fits = {}
    for source, scores in (("exact", exact), ("estimated", estimated)):
        fits[source] = pipeline.fit_surrogates(masks[:m], scores[:m], seed=args.seed)
        for kind in ("linear", "kernel"):
            name = f"{kind} surrogate ({source})"
            surrogate = fits[source][kind]
            effects[name] = np.asarray(attribution.loo_scores(surrogate))
            heldout[name] = float(metrics.mean_spearman(
                exact[m:], surrogate.predict(masks[m:])))
    loo_estimate = np.asarray(w.estimated_scores(loo, key=key, proj_dim=args.proj_dim))
    effects["first-order estimate of the LOO sets"] = loo_estimate[1:] - loo_estimate[0]
    examples, task, adv, _ = w.linearized_rollouts(key=key, proj_dim=args.proj_dim)
    grads = np.asarray(policy_gradients(examples, adv))
    per_variant = np.stack([grads[task == i].mean(0) for i in range(k)])  # [K, d]
    # Removing variant i removes its share of the update; for target t the
    # first-order change of minus the return is <g_t, g_i> (TracIn at θ*).
    effects["gradient alignment (TracIn at θ*)"] = (
        per_variant @ per_variant[list(w.targets)].T)
    effects["LOO fine-tuning, another key"] = replicate_effects
    rows = []
    for name, eff in effects.items():
        corr = metrics.loo_correlation(eff, true_effects)
        rows.append({"method": name, "LOO Spearman": float(corr.mean),
                     "LOO Spearman (mean target)": float(corr.mean_target),
                     "held-out Spearman": heldout.get(name)})
    print("\nAttribution: agreement with leave-one-out fine-tuning")
    print(format_table(rows, ["method", "LOO Spearman", "LOO Spearman (mean target)",
                              "held-out Spearman"]))

    # Selection per target: exhaustive over the 2^K - 1 subsets.
    chosen = {}
    for kind in ("linear", "kernel"):
        for t in range(w.num_targets):
            weights = np.eye(w.num_targets)[t]
            objective = selection.surrogate_objective(fits["exact"][kind],
                                                      target_weights=weights)
            chosen[(kind, t)] = selection.select_subset(objective, k).mask
    picks = np.stack([chosen[(kind, t)] for kind in ("linear", "kernel")
                      for t in range(w.num_targets)])
    picked_scores, select_s = _timed(lambda: np.asarray(
        w.exact_scores(picks, key=key)))
    sel_rows, returns = [], {}
    for i, kind in enumerate(("linear", "kernel")):
        per_target = picked_scores[i * w.num_targets:(i + 1) * w.num_targets]
        returns[kind] = -np.diagonal(per_target)
    returns["all variants"] = -truth[0]
    returns["random subsets (mean)"] = -exact.mean(0)
    returns[f"best of the {m} fitting subsets"] = -exact[:m].min(0)
    for t, target in enumerate(w.targets):
        row = {"target": w.task_names[target]}
        row.update({name: float(r[t]) for name, r in returns.items()})
        row["linear pick"] = "".join(str(int(b)) for b in chosen[("linear", t)])
        row["kernel pick"] = "".join(str(int(b)) for b in chosen[("kernel", t)])
        sel_rows.append(row)
    mean_row = {"target": "mean"}
    mean_row.update({name: float(np.mean(r)) for name, r in returns.items()})
    sel_rows.append(mean_row)
    print(f"\nSelection: target return after fine-tuning on the chosen subset "
          f"({select_s:.1f} s)")
    print(format_table(sel_rows, ["target", *returns, "linear pick", "kernel pick"]))
    gain = {kind: returns[kind] - returns["all variants"] for kind in ("linear",
                                                                      "kernel")}
    linear_gain, kernel_gain = float(np.mean(gain["linear"])), float(
        np.mean(gain["kernel"]))
    improvement = (kernel_gain - linear_gain) / abs(linear_gain) if linear_gain else (
        np.nan)
    print(f"\nmean gain over training on all variants: linear {linear_gain:+.2f}, "
          f"kernel {kernel_gain:+.2f} return; kernel over linear {improvement:+.0%}; "
          f"kernel better on {int(np.sum(gain['kernel'] > gain['linear']))} of "
          f"{w.num_targets} targets, worse on "
          f"{int(np.sum(gain['kernel'] < gain['linear']))}")

    path = write_json(args.out, {
        "args": vars(args), "environment": environment(),
        "config": w.store_config(), "base_seconds": base_s, "loo_seconds": loo_s,
        "exact_seconds": exact_s, "estimate_seconds": estimate_s,
        "theta_star_returns": trained, "untrained_returns": untrained,
        "estimate_relative_error": rel, "estimate_spearman": rho,
        "loo_table": rows, "selection": sel_rows,
        "improvement_kernel_over_linear": improvement,
        "true_effects": true_effects, "masks": masks, "exact": exact,
        "estimated": estimated,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
