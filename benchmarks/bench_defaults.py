"""The baselines' default settings against the best of a grid, on LOO truth.

Issue 23, item 2: are the defaults of ``influence_scores`` and ``trak_scores``
(``damping="auto"``, TRAK's ``proj_dim="auto"``; rules in
``tasksurrogate_jax/estimate/baselines/``) close to the best their grid offers, when
both are scored against leave-one-out fine-tuning? The grid is for this
benchmark only: the defaults never see a ground truth.

Two data sets and models:

- ``digits``: ``tasksurrogate_jax.digits_workload("cpu")`` (Flax NNX MLP
  64-64-10, Adam; 10 sources, four of them planted with noise; SGD
  fine-tuning).
- ``cancer``: scikit-learn's bundled breast-cancer set (569 rows, 30
  features, 2 classes; a stratified 80/20 split: 455 training rows, 114
  targets), in 8 sources: flipped labels, half the labels flipped, Gaussian
  input noise, one class only, and 4 clean; a Flax **Linen** MLP 30-32-32-2
  (GELU) through ``SupervisedWorkload(apply_fn=..., init_fn=...)``, trained
  and fine-tuned with AdamW.

For each: θ* (``base_params``), the LOO ground truth
(``replicate_scores(leave_one_out_masks(K), regime="finetune",
replicates=4)``) and its split-half ceiling, then

- influence at its defaults, and over ``hessian × damping`` with the damping
  a multiple of the largest eigenvalue of the curvature (the grid);
- TRAK at its defaults, and over ``proj_dim × damping`` (damping a multiple
  of the largest eigenvalue of ``ΦᵀΦ`` at that d; one projection key);
- for reference the former defaults (influence: exact Hessian, 1e-3; the
  pipeline's Gauss-Newton, 1.0; TRAK: d = 512, 1e-3) and kronfluence's rule
  (0.1 × the mean eigenvalue ``trace(G)/p`` of the Gauss-Newton matrix, its
  trace exact) and, for SGD fine-tuning, λ = 1/(η·T) of its T steps at rate η;

- the estimation's default (``EstimationSettings()``: ``proj_dim="auto"``,
  4 batch orders) against the full space with one batch order, d = 512 with
  one (the former default) and d = 2048 with four: LOO effects read directly off the
  estimates of the LOO sets, with batch orders other than the truth's;

scored by the LOO Spearman per target (``loo_correlation(...).mean``) and of
the mean target. A grid point where conjugate gradients do not converge
counts as failed (it raises by default). ``--variants`` adds settings the
rules were not chosen on (a wider digits MLP, digits with 359 training
examples, breast cancer fine-tuned with SGD at a 10× smaller step).

    python benchmarks/bench_defaults.py            # about 2 minutes on 2 cores
    python benchmarks/bench_defaults.py --quick    # CI smoke, under a minute
    python benchmarks/bench_defaults.py --variants # + held-out settings: ~8 min

Writes ``results/bench_defaults.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import (
    add_quick,
    environment,
    fill_defaults,
    format_table,
    timed,
    write_json,
)
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import tasksurrogate_jax as ts
from tasksurrogate_jax.core import metrics
from tasksurrogate_jax.estimate import baselines as bl
from tasksurrogate_jax.estimate.projection import num_parameters, ravel_rows
from tasksurrogate_jax.pipeline import loo_effects
from tasksurrogate_jax.truth.reliability import loo_reliability

# Damping grid: multiples of the largest eigenvalue of the matrix damped.
FRACTIONS = (1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 3.0)
QUICK_FRACTIONS = (0.01, 0.05, 0.2, 1.0)
PROJ_DIMS = (64, 256, 1024, 4096, None)
QUICK_PROJ_DIMS = (64, None)
# The estimation default first, then the alternatives it is measured against.
ESTIMATION_SETTINGS = (
    ("default", ts.EstimationSettings()),
    ("full space, 1 batch order", ts.EstimationSettings(proj_dim="full",
                                                        batch_orders=1)),
    ("d = 512, 1 batch order (former default)",
     ts.EstimationSettings(proj_dim=512, batch_orders=1)),
    ("d = 2048", ts.EstimationSettings(proj_dim=2048)),
)
CANCER_NAMES = ("flipped-labels", "half-flipped", "input-noise", "one-class")


# ---------------------------------------------------------------------------
# The second data set and model: breast cancer, a Flax Linen MLP, AdamW.


class LinenMLP(nn.Module):
    """``depth`` GELU layers of ``hidden`` units, then 2 logits (Flax Linen)."""

    hidden: int = 32
    depth: int = 2

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.Dense(2)(x)


def breast_cancer_workload(*, num_tasks: int = 8, hidden: int = 32,
                           num_steps: int = 300, finetune: str = "adamw",
                           finetune_lr: float = 1e-3, finetune_steps: int = 100,
                           seed: int = 0) -> ts.SupervisedWorkload:
    """Breast cancer in ``num_tasks`` sources (see the module doc).

    Features standardized with the training split's mean and std. Task 3
    (``one-class``) is ``n // num_tasks`` benign training rows; the rest are
    split at random into the other tasks; task 0 has every label flipped,
    task 1 half of them, task 2 Gaussian noise of std 1 on its inputs.
    """
    x, y = load_breast_cancer(return_X_y=True)
    train, test = train_test_split(np.arange(y.size), test_size=0.2, stratify=y,
                                   random_state=seed)
    x = ((x - x[train].mean(0)) / x[train].std(0)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    inputs, labels = x[train].copy(), y[train].copy()
    ids = np.full(train.size, -1)
    ids[rng.choice(np.flatnonzero(labels == 1), train.size // num_tasks,
                   replace=False)] = 3
    others = [k for k in range(num_tasks) if k != 3]
    rest = rng.permutation(np.flatnonzero(ids < 0))
    for k, rows in zip(others, np.array_split(rest, len(others)), strict=True):
        ids[rows] = k
    labels[ids == 0] = 1 - labels[ids == 0]
    half = rng.choice(np.flatnonzero(ids == 1), np.sum(ids == 1) // 2,
                      replace=False)
    labels[half] = 1 - labels[half]
    noisy = ids == 2
    inputs[noisy] += rng.normal(size=inputs[noisy].shape).astype(np.float32)
    names = list(CANCER_NAMES) + [f"clean-{k:02d}" for k in range(4, num_tasks)]
    data = ts.make_task_data(inputs, labels, ids, num_tasks=num_tasks,
                             task_names=names, num_classes=2)
    target = ts.make_target_data(x[test], y[test], num_classes=2)

    model = LinenMLP(hidden)

    def apply_fn(params, batch):
        return model.apply({"params": params}, batch)

    def init_fn(key):
        return model.init(key, jnp.zeros((1, x.shape[1]), jnp.float32))["params"]

    tune = (optax.adamw(finetune_lr, weight_decay=1e-2) if finetune == "adamw"
            else optax.sgd(finetune_lr))
    return ts.SupervisedWorkload(
        apply_fn=apply_fn, init_fn=init_fn, data=data, target=target,
        train=ts.TrainSettings(optax.adamw(3e-3, weight_decay=1e-2), num_steps, 64),
        finetune=ts.TrainSettings(tune, finetune_steps, 64),
        description={"data": "sklearn breast_cancer", "model": f"Linen MLP 30-"
                     f"{hidden}-{hidden}-2", "finetune": finetune,
                     "finetune_lr": finetune_lr, "seed": seed},
        name="breast-cancer")


# ---------------------------------------------------------------------------
# Reference rule: kronfluence's 0.1 × mean eigenvalue (needs the trace).


def gauss_newton_trace(apply_fn, loss_fn, params, data, batch_size=64) -> float:
    """``trace(G)``, ``G = Σ_n ω_n J_nᵀ ∇²_f ℓ_n J_n / W``, exact, from
    per-example output Jacobians."""
    ids = np.asarray(data.task_ids)
    keep = np.flatnonzero(ids >= 0)

    @jax.jit
    def chunk(x, y):
        def one(xi, yi):
            def model(p):
                return apply_fn(p, xi[None])[0]

            jac = ravel_rows(jax.jacrev(model)(params))  # [C, p]
            hess = jax.hessian(lambda o: loss_fn(o[None], yi[None])[0])(model(params))
            return jnp.sum(hess * (jac @ jac.T))

        return jnp.sum(jax.vmap(one)(x, y))

    total = 0.0
    for start in range(0, keep.size, batch_size):
        rows = keep[start:start + batch_size]
        total += float(chunk(data.inputs[rows], data.labels[rows]))
    return total / keep.size


# ---------------------------------------------------------------------------
# Measurement.


def correlation(effects, scores) -> dict:
    c = metrics.loo_correlation(true_effects=effects,
                                predicted_effects=np.asarray(scores))
    return {"spearman": float(c.mean), "spearman_mean_target": float(c.mean_target)}


def evaluate(name, workload, *, key, replicates, fractions, proj_dims,
             hessians=bl.HESSIANS, horizon=None) -> dict:
    """One data set: truth, defaults, grid and references (module doc).
    ``horizon``: ``(η, T)`` of an SGD fine-tuning, for the 1/(η·T) row."""
    start = time.perf_counter()
    theta = workload.base_params(key=key)
    loo = workload.replicate_scores(ts.leave_one_out_masks(workload.num_tasks),
                                    key=key, regime="finetune",
                                    replicates=replicates, base_params=theta,
                                    progress=False)
    effects = loo_effects(loo)
    ceiling = loo_reliability(np.asarray(loo))
    truth_s = time.perf_counter() - start
    args = (workload.apply_fn, theta, workload.data, workload.target)
    loss_fn = workload.loss_fn
    proj_key = jax.random.fold_in(key, 1)
    n = int(np.sum(np.asarray(workload.data.task_ids) >= 0))
    p = num_parameters(theta)
    rows = []

    def add(method, setting, scores, **fields):
        row = {"method": method, "setting": setting, **fields}
        if scores is None:
            row.update(spearman=math.nan, spearman_mean_target=math.nan)
        else:
            row.update(correlation(effects, scores))
        rows.append(row)
        return row

    # Influence: default, grid, references.
    (scores, info), influence_s = timed(lambda: bl.influence_scores(
        *args, loss_fn=loss_fn, return_info=True))
    add("influence", "default", scores, hessian=info.hessian, damping=info.damping,
        fraction=bl.DAMPING_FRACTION, cg_residual=info.cg_residual)
    for hessian in hessians:
        top = bl.influence_damping(workload.apply_fn, theta, workload.data,
                                   loss_fn=loss_fn, hessian=hessian)
        top /= bl.DAMPING_FRACTION
        for fraction in fractions:
            try:
                scores, info = bl.influence_scores(
                    *args, loss_fn=loss_fn, hessian=hessian,
                    damping=fraction * top, return_info=True)
                setting = "grid"
            except RuntimeError:  # CG did not converge: a failed grid point
                _, info = bl.influence_scores(
                    *args, loss_fn=loss_fn, hessian=hessian,
                    damping=fraction * top, return_info=True,
                    cg_max_residual=math.inf)
                scores, setting = None, "grid: CG failed"
            add("influence", setting, scores, hessian=hessian,
                damping=fraction * top, fraction=fraction,
                cg_residual=info.cg_residual)
    for setting, hessian, damping in (("former default", "exact", 1e-3),
                                      ("former pipeline", "gauss_newton", 1.0)):
        scores, info = bl.influence_scores(*args, loss_fn=loss_fn, hessian=hessian,
                                           damping=damping, return_info=True,
                                           cg_max_residual=math.inf)
        add("influence", setting, scores, hessian=hessian, damping=damping,
            cg_residual=info.cg_residual)
    mean_eigenvalue = gauss_newton_trace(workload.apply_fn, loss_fn, theta,
                                         workload.data) / p
    scores, info = bl.influence_scores(*args, loss_fn=loss_fn,
                                       damping=0.1 * mean_eigenvalue,
                                       return_info=True, cg_max_residual=math.inf)
    add("influence", "0.1 × mean eigenvalue", scores, hessian="gauss_newton",
        damping=0.1 * mean_eigenvalue, cg_residual=info.cg_residual)
    if horizon is not None:  # T steps of SGD at rate η damp below 1/(η·T)
        damping = 1.0 / (horizon[0] * horizon[1])
        scores, info = bl.influence_scores(*args, loss_fn=loss_fn, damping=damping,
                                           return_info=True)
        add("influence", "1/(η·T) of the SGD fine-tuning", scores,
            hessian="gauss_newton", damping=damping, cg_residual=info.cg_residual)

    # TRAK: default, grid, former default.
    (scores, info), trak_s = timed(lambda: bl.trak_scores(
        *args, key=proj_key, loss_fn=loss_fn, return_info=True))
    add("trak", "default", scores, proj_dim=info.proj_dim, damping=info.damping,
        fraction=bl.DAMPING_FRACTION)
    # The default's d joins the grid; d = p only while the [p, p] kernel is
    # within PROJ_DIM_MAX.
    dims = sorted({d for d in (*proj_dims, info.proj_dim) if d is not None
                   and d < p}) + ([None] if p <= bl.PROJ_DIM_MAX else [])
    for proj_dim in dims:
        _, info = bl.trak_scores(*args, key=proj_key, proj_dim=proj_dim,
                                 loss_fn=loss_fn, return_info=True)
        for fraction in fractions:
            damping = fraction * info.top_eigenvalue
            scores = bl.trak_scores(*args, key=proj_key, proj_dim=proj_dim,
                                    damping=damping, loss_fn=loss_fn)
            add("trak", "grid", scores, proj_dim=proj_dim, damping=damping,
                fraction=fraction)
    if p > 512:
        add("trak", "former default",
            bl.trak_scores(*args, key=proj_key, proj_dim=512, damping=1e-3,
                           loss_fn=loss_fn), proj_dim=512, damping=1e-3)

    # Estimation: LOO effects read directly off the estimates of the LOO sets,
    # with batch orders other than the truth's (as the pipeline draws them).
    loo_masks = ts.leave_one_out_masks(workload.num_tasks)
    estimate_key = jax.random.fold_in(key, 7)
    estimation_s = {}
    for setting, settings in ESTIMATION_SETTINGS:
        if isinstance(settings.proj_dim, int) and settings.proj_dim >= p:
            continue  # no projection below the parameter count: "full" is it
        estimated, estimation_s[setting] = timed(
            lambda s=settings: workload.estimated_scores(
                loo_masks, key=estimate_key, base_params=theta, settings=s))
        estimated = np.asarray(estimated)
        add("estimation", setting, estimated[1:] - estimated[:1],
            proj_dim=settings.resolved_proj_dim(p) or "full",
            batch_orders=settings.batch_orders)

    summary = {}
    for method in ("influence", "trak"):
        default = next(r for r in rows if r["method"] == method
                       and r["setting"] == "default")
        grid = [r for r in rows if r["method"] == method and r["setting"] == "grid"
                and np.isfinite(r["spearman"])]
        best = max(grid, key=lambda r: r["spearman"])
        best_target = max(grid, key=lambda r: r["spearman_mean_target"])
        summary[method] = {
            "default": default["spearman"], "best": best["spearman"],
            "gap": default["spearman"] - best["spearman"],
            "best_at": {k: best[k] for k in ("hessian", "proj_dim", "fraction",
                                              "damping") if k in best},
            "default_mean_target": default["spearman_mean_target"],
            "best_mean_target": best_target["spearman_mean_target"],
            "gap_mean_target": (default["spearman_mean_target"]
                                - best_target["spearman_mean_target"]),
        }
    estimation = [r for r in rows if r["method"] == "estimation"]
    best = max(estimation, key=lambda r: r["spearman"])
    summary["estimation"] = {
        "default": estimation[0]["spearman"], "best": best["spearman"],
        "gap": estimation[0]["spearman"] - best["spearman"],
        "best_at": {"setting": best["setting"]},
        "default_mean_target": estimation[0]["spearman_mean_target"],
        "best_mean_target": max(r["spearman_mean_target"] for r in estimation),
        "gap_mean_target": estimation[0]["spearman_mean_target"] - max(
            r["spearman_mean_target"] for r in estimation),
    }
    return {
        "name": name, "description": workload.description, "num_examples": n,
        "num_parameters": p, "num_tasks": workload.num_tasks,
        "num_targets": workload.num_targets, "replicates": replicates,
        "ceiling": {"spearman": ceiling.mean,
                    "spearman_mean_target": ceiling.mean_target},
        "mean_eigenvalue": mean_eigenvalue, "truth_s": truth_s,
        "influence_default_s": influence_s, "trak_default_s": trak_s,
        "estimation_s": estimation_s,
        "rows": rows, "summary": summary,
        "wall_s": time.perf_counter() - start,
    }


def print_result(result):
    print(f"\n## {result['name']}: n = {result['num_examples']}, p = "
          f"{result['num_parameters']}, K = {result['num_tasks']}, T = "
          f"{result['num_targets']}; ceiling (split-half, {result['replicates']} "
          f"replicates): {result['ceiling']['spearman']:.3f} per target, "
          f"{result['ceiling']['spearman_mean_target']:.3f} mean target; "
          f"{result['wall_s']:.0f} s\n")
    print(format_table(result["rows"], ["method", "setting", "hessian", "proj_dim",
                                        "batch_orders", "fraction", "damping",
                                        "spearman",
                                        "spearman_mean_target", "cg_residual"]))
    print()
    print(format_table(
        [{"method": m, **{k: v for k, v in s.items() if k != "best_at"},
          "best_at": ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else
                               f"{k}={v}" for k, v in s["best_at"].items())}
         for m, s in result["summary"].items()],
        ["method", "default", "best", "gap", "best_at", "default_mean_target",
         "best_mean_target", "gap_mean_target"]))


def workloads(quick: bool, variants: bool):
    """``(name, workload, (η, T) of an SGD fine-tuning or None)``."""

    def digits(preset, **overrides):
        workload = ts.digits_workload(preset, **overrides)
        return workload, (workload.config.finetune_learning_rate,
                          workload.config.finetune_steps)

    if quick:
        yield "digits (tiny)", *digits("tiny", finetune_steps=10)
        yield "breast cancer (quick)", breast_cancer_workload(
            hidden=8, num_steps=100, finetune_steps=20), None
        return
    yield "digits", *digits("cpu")
    yield "breast cancer", breast_cancer_workload(), None
    if variants:
        yield "digits, hidden 256", *digits("cpu", hidden=256)
        yield "digits, 359 examples", *digits("cpu", test_fraction=0.8)
        yield "breast cancer, SGD 0.01", breast_cancer_workload(
            finetune="sgd", finetune_lr=0.01), (0.01, 100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_quick(ap, "tiny sizes and grid, Gauss-Newton only, 2 replicates",
              "bench_defaults")
    ap.add_argument("--variants", action="store_true",
                    help="also the held-out settings (a few minutes more)")
    ap.add_argument("--replicates", type=int, default=None,
                    help="ground-truth replicates (4; quick 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = fill_defaults(ap.parse_args(), {"replicates": 4}, {"replicates": 2},
                         name="bench_defaults")
    if args.replicates < 2:
        ap.error("--replicates must be >= 2 (the ceiling is their agreement)")
    fractions = QUICK_FRACTIONS if args.quick else FRACTIONS
    proj_dims = QUICK_PROJ_DIMS if args.quick else PROJ_DIMS
    start = time.perf_counter()
    results = []
    for name, workload, horizon in workloads(args.quick, args.variants):
        result = evaluate(name, workload, key=jax.random.key(args.seed),
                          replicates=args.replicates, fractions=fractions,
                          proj_dims=proj_dims, horizon=horizon,
                          hessians=("gauss_newton",) if args.quick else bl.HESSIANS)
        print_result(result)
        results.append(result)
    wall_s = time.perf_counter() - start
    path = write_json(args.out, {
        "benchmark": "bench_defaults", "environment": environment(),
        "config": vars(args), "damping_fraction": bl.DAMPING_FRACTION,
        "fractions": list(fractions), "proj_dims": list(proj_dims),
        "results": results, "wall_s": wall_s})
    print(f"\nwall time {wall_s:.0f} s (load average {os.getloadavg()[0]:.1f}); "
          f"wrote {path}")
    print("\ndefault − best over the grid (LOO Spearman per target):")
    for result in results:
        gaps = ", ".join(f"{m} {s['default']:.3f} vs {s['best']:.3f} "
                         f"({s['gap']:+.3f})" for m, s in result["summary"].items())
        print(f"  {result['name']}: {gaps}")


if __name__ == "__main__":
    main()
