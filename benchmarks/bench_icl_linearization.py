"""How well does a first-order model in the input embeddings predict a prompt's
loss? In-context linear regression (``tasksurrogate_jax.workloads.icl_regression``).

GradSel (Zhang et al., 2025) estimates a prompt's outputs by a first-order
expansion in the input embeddings around an anchor prompt and reports under 1%
error on 7B-34B language models; on the synthetic token family
(``workloads/icl.py``) the same estimate is off by 99% (benchmarks/README.md).
This benchmark measures it on the smooth family, for each:

- design of a demonstration: ``"probe"`` (noisy labels at D fixed probe
  inputs: prompts differ in their labels only) and ``"random"`` (Garg et al.:
  one pair with a random ``x``);
- number of shots (``--shots``, default 4 and 8);
- what is linearized: the loss (``"loss"``) or the model's prediction, the
  loss then taken of the first-order prediction (``"output"``, GradSel);
- anchor: the pool's mean embedding (``mean``), one random prompt (``one``),
  the nearest of ``A`` random prompts (``nearest-A``, ``--anchors``);

on ``--num-prompts`` random prompts from the pool of 50 demonstrations (with
noisy labels, outliers and near-duplicates), against their exact losses
(forward passes), per target query:

- ``median rel``: median over (prompt, query) of ``|F̂ - F| / |F|``;
  ``mean rel``: its mean (dominated by the few queries a prompt fits almost
  exactly, ``F ≈ 0``: a squared error has no floor);
  ``pooled rel``: ``Σ|F̂ - F| / Σ|F|``; ``mean-target rel``: the relative
  error of each prompt's mean loss over the targets (what selection ranks);
- ``Spearman``: across prompts, per target, averaged; ``Spearman (mean)``: of
  the mean loss over targets;
- ``Bayes ridge`` rows: the same first-order model of the Bayes-optimal
  predictor (ridge, a function of the raw ``(x, y)``), anchored at the same
  prompts: the error the design itself forces on any in-context learner.

Also: the transformer's in-context loss by shots beside the Bayes predictor's,
and what the planted weaknesses do to the exact target loss.

    python benchmarks/bench_icl_linearization.py                 # ~8 min, 2 cores
    python benchmarks/bench_icl_linearization.py --designs probe --shots 4
    python benchmarks/bench_icl_linearization.py --quick         # CI smoke

Writes ``results/bench_icl_linearization.json``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    add_quick,
    add_workload_args,
    environment,
    fill_defaults,
    format_table,
    timed,
    write_json,
)

from tasksurrogate_jax.core import metrics
from tasksurrogate_jax.workloads.icl import NearestAnchors
from tasksurrogate_jax.workloads.icl_regression import (
    bayes_predictions,
    icl_regression_workload,
)


def _spearman(a, b) -> float:
    return float(metrics.spearman(np.asarray(a, float), np.asarray(b, float)))


def errors(exact: np.ndarray, estimated: np.ndarray, clean: np.ndarray) -> dict:
    """The estimate's errors against the exact losses ``[prompts, targets]``;
    ``clean`` marks the prompts without an outlier."""
    absolute = np.abs(estimated - exact)
    relative = absolute / np.abs(exact)
    mean_exact, mean_estimated = exact.mean(1), estimated.mean(1)
    return {
        "median_relative_error": float(np.median(relative)),
        "mean_relative_error": float(np.mean(relative)),
        "pooled_relative_error": float(absolute.sum() / np.abs(exact).sum()),
        "mean_target_relative_error": float(np.mean(
            np.abs(mean_estimated - mean_exact) / mean_exact)),
        "spearman": float(metrics.mean_spearman(exact, estimated)),
        "spearman_mean_target": _spearman(mean_exact, mean_estimated),
        "median_relative_error_without_outliers": (
            float(np.median(relative[clean])) if clean.any() else None),
    }


def prompt_indices(masks, shots: int) -> np.ndarray:
    """``[m, num_tasks]`` masks -> ``[m, shots]`` pool indices in pool order."""
    order = np.argsort(1 - np.asarray(masks), axis=1, kind="stable")
    return np.sort(order[:, :shots], axis=1)


def bayes_first_order(workload, indices: np.ndarray, anchors: np.ndarray) -> tuple:
    """Exact and first-order (output, nearest anchor in the raw inputs) squared
    errors of the Bayes ridge predictor on the same prompts.

    Args:
      indices: ``[m, shots]`` the prompts; anchors: ``[A, 1 or P, shots]``
        (each anchor the mean of its prompts' inputs, as the workload's).

    Returns:
      ``(exact [m, T], estimated [m, T])``.
    """
    c = workload.config
    pool_x = jnp.asarray(workload.pool_x)  # [K, L, D]
    pool_y = jnp.asarray(workload.pool_y)  # [K, L]
    query_x = jnp.asarray(workload.query_x)
    labels = jnp.asarray(workload.query_labels)

    def predict(x, y):  # [shots, L, D], [shots, L] -> [T]
        return bayes_predictions(x.reshape(-1, c.input_dim)[None],
                                 y.reshape(-1)[None], query_x, noise=c.train_noise)

    anchor_x = pool_x[anchors].mean(1)  # [A, shots, L, D]
    anchor_y = pool_y[anchors].mean(1)

    def one(idx):
        x, y = pool_x[idx], pool_y[idx]
        distance = (jnp.sum(jnp.square(anchor_x - x), axis=(1, 2, 3))
                    + jnp.sum(jnp.square(anchor_y - y), axis=(1, 2)))
        a = jnp.argmin(distance)
        value, slope = jax.jvp(predict, (anchor_x[a], anchor_y[a]),
                               (x - anchor_x[a], y - anchor_y[a]))
        return (jnp.square(predict(x, y) - labels),
                jnp.square(value + slope - labels))

    exact, estimated = jax.jit(jax.vmap(one))(jnp.asarray(indices))
    return np.asarray(exact), np.asarray(estimated)


def weakness_effects(workload, masks, exact) -> dict:
    """Mean exact target loss of prompts with and without each weakness."""
    loss = exact.mean(1)
    out = {}
    for name, member in (("noisy", workload.pool_noisy),
                         ("outlier", workload.pool_outlier)):
        has = masks[:, member].sum(1) > 0
        out[name] = {"with": float(loss[has].mean()) if has.any() else None,
                     "without": float(loss[~has].mean()) if (~has).any() else None,
                     "num_with": int(has.sum())}
    return out


def redundancy(workload, shots: int, *, contexts: int, seed: int) -> dict:
    """A near-duplicate pair against two distinct clean demonstrations: mean
    exact target loss of ``{source, duplicate} + context`` minus that of
    ``{source, other clean} + context``, over random clean contexts (> 0:
    the duplicate adds less than a fresh demonstration)."""
    rng = np.random.default_rng(seed)
    k = workload.num_tasks
    clean = np.nonzero(~workload.pool_noisy & ~workload.pool_outlier
                       & (workload.pool_duplicate_of < 0))[0]
    rows_dup, rows_other = [], []
    for j in np.nonzero(workload.pool_duplicate_of >= 0)[0]:
        i = workload.pool_duplicate_of[j]
        candidates = clean[clean != i]
        for _ in range(contexts):
            pick = rng.choice(candidates, shots - 1, replace=False)
            dup, other = np.zeros(k, np.float32), np.zeros(k, np.float32)
            dup[[i, j, *pick[:-1]]] = 1
            other[[i, *pick]] = 1
            rows_dup.append(dup)
            rows_other.append(other)
    if not rows_dup:
        return {}
    both = np.asarray(workload.exact_scores(np.array(rows_dup + rows_other))).mean(1)
    diff = both[: len(rows_dup)] - both[len(rows_dup):]
    per_pair = diff.reshape(-1, contexts).mean(1)
    return {"mean_difference": float(diff.mean()),
            "per_pair": per_pair.tolist(),
            "mean_loss_of_distinct": float(both[len(rows_dup):].mean())}


def one_design(design: str, args, overrides: dict) -> dict:
    workload, train_s = timed(
        lambda: icl_regression_workload(args.preset, **{**overrides, "design": design}))
    c = workload.config
    print(f"\n== design {design!r}: trained in {train_s:.1f} s ({c.num_steps} "
          f"steps, D={c.input_dim}); pool {workload.num_tasks} "
          f"({int(workload.pool_noisy.sum())} noisy, "
          f"{int(workload.pool_outlier.sum())} outliers, "
          f"{int((workload.pool_duplicate_of >= 0).sum())} near-duplicates), "
          f"{workload.num_targets} targets")
    icl = workload.in_context_loss(jax.random.key(args.seed + 1))
    pairs = zip(icl["model"], icl["bayes"], strict=True)
    print(format_table([{"shots": str(n), "transformer": float(m),
                         "Bayes ridge": float(b)} for n, (m, b) in enumerate(pairs)],
                       ["shots", "transformer", "Bayes ridge"]))
    out = {"train_seconds": train_s, "config": workload.store_config(),
           "in_context_loss": {k: v.tolist() for k, v in icl.items()}, "shots": {}}
    for shots in args.shots:
        masks = np.asarray(workload.sample_prompts(
            jax.random.key(args.seed), args.num_prompts, shots=shots))
        exact, exact_s = timed(lambda m=masks: workload.exact_scores(m))
        exact = np.asarray(exact)
        clean = np.broadcast_to(
            (masks[:, workload.pool_outlier].sum(1) == 0)[:, None], exact.shape)
        anchors = {"mean": "mean",
                   "one": prompt_indices(np.asarray(workload.sample_prompts(
                       jax.random.key(args.seed + 7), 1, shots=shots)), shots)[0]}
        for a in args.anchors:
            anchors[f"nearest-{a}"] = NearestAnchors(a, seed=args.seed + 7)
        rows = []
        for linearize in ("output", "loss"):
            for name, anchor in anchors.items():
                estimated, seconds = timed(
                    lambda m=masks, a=anchor, lin=linearize: workload.estimated_scores(
                        m, anchor=a, linearize=lin))
                rows.append({"linearize": linearize, "anchor": name,
                             "seconds": seconds,
                             **errors(exact, np.asarray(estimated), clean)})
        indices = prompt_indices(masks, shots)
        for name, anchor in anchors.items():
            groups, _ = workload.anchor_prompts(shots, anchor)
            bayes_exact, bayes_est = bayes_first_order(workload, indices, groups)
            rows.append({"linearize": "output (Bayes ridge)", "anchor": name,
                         **errors(bayes_exact, bayes_est, clean)})
        out["shots"][str(shots)] = {
            "num_prompts": args.num_prompts, "exact_seconds": exact_s,
            "exact_target_loss": {"mean": float(exact.mean()),
                                  "std_of_prompt_means": float(exact.mean(1).std())},
            "weaknesses": weakness_effects(workload, masks, exact),
            "redundancy": redundancy(workload, shots, contexts=args.contexts,
                                     seed=args.seed),
            "rows": rows,
        }
        weak = out["shots"][str(shots)]["weaknesses"]
        red = out["shots"][str(shots)]["redundancy"]
        print(f"{shots} shots: exact scores of {args.num_prompts} prompts in "
              f"{exact_s:.2f} s; mean target loss {exact.mean():.4f} (std of "
              f"prompt means {exact.mean(1).std():.4f}); with/without a noisy "
              f"label {weak['noisy']['with']:.4f}/{weak['noisy']['without']:.4f}, "
              f"an outlier {weak['outlier']['with']:.4f}/"
              f"{weak['outlier']['without']:.4f}; near-duplicate pair minus "
              f"distinct pair {red.get('mean_difference', float('nan')):+.4f}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_quick(ap, "the 'tiny' preset, the probe design, 3 shots, 40 prompts, "
              "anchors 8, 4 contexts", "bench_icl_linearization")
    add_workload_args(ap, "ICLRegressionConfig")
    ap.add_argument("--designs", nargs="+", default=None, choices=["probe", "random"],
                    help="demonstration designs (probe random; quick probe)")
    ap.add_argument("--shots", nargs="+", type=int, default=None,
                    help="demonstrations per prompt (4 8; quick 3)")
    ap.add_argument("--anchors", nargs="+", type=int, default=None,
                    help="numbers of random anchor prompts (nearest-A; 16 128 512; "
                    "quick 8)")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="random prompts scored (200; quick 40)")
    ap.add_argument("--contexts", type=int, default=None,
                    help="random contexts per near-duplicate pair (redundancy; 20; "
                    "quick 4)")
    ap.add_argument("--seed", type=int, default=0)
    args = fill_defaults(
        ap.parse_args(),
        {"preset": "cpu", "designs": ["probe", "random"], "shots": [4, 8],
         "anchors": [16, 128, 512], "num_prompts": 200, "contexts": 20},
        {"preset": "tiny", "designs": ["probe"], "shots": [3], "anchors": [8],
         "num_prompts": 40, "contexts": 4},
        name="bench_icl_linearization")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"preset {args.preset}")
    overrides = args.overrides
    if "design" in overrides:
        ap.error("choose designs with --designs, not --set design=...")
    start = time.perf_counter()
    results = {design: one_design(design, args, overrides) for design in args.designs}
    total = time.perf_counter() - start
    path = write_json(args.out, {
        "environment": environment(), "args": vars(args), "seconds": total,
        "designs": results})

    columns = ["design", "shots", "linearize", "anchor", "median rel", "pooled rel",
               "mean-target rel", "mean rel", "Spearman", "Spearman (mean)",
               "median rel (no outlier)", "seconds"]
    table = []
    for design, res in results.items():
        for shots, per in res["shots"].items():
            for row in per["rows"]:
                table.append({
                    "design": design, "shots": shots, "linearize": row["linearize"],
                    "anchor": row["anchor"],
                    "median rel": row["median_relative_error"],
                    "pooled rel": row["pooled_relative_error"],
                    "mean-target rel": row["mean_target_relative_error"],
                    "mean rel": row["mean_relative_error"],
                    "Spearman": row["spearman"],
                    "Spearman (mean)": row["spearman_mean_target"],
                    "median rel (no outlier)":
                        row["median_relative_error_without_outliers"],
                    "seconds": row.get("seconds")})
    print(f"\nwrote {path} ({total:.0f} s in all)\n")
    print(f"First-order estimates of {args.num_prompts} random prompts' per-query "
          "squared errors against forward passes (rel = |F̂ - F| / |F|)")
    print(format_table(table, columns))


if __name__ == "__main__":
    main()
