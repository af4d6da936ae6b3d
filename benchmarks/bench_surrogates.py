"""Kernel surrogate fit and hyperparameter selection against scikit-learn.

Synthetic problem: ``num_tasks`` tasks, ``num_targets`` targets, ``m`` subsets
(Bernoulli(0.5) masks); each target's score is a random sparse quadratic
function of the mask plus Gaussian noise. In one run, with the same data and
hyperparameters:

- fit: ``fit_kernel_surrogate(...).predict(test_masks)`` (jitted, compiled
  ahead of time; compile time reported apart; also timed without the outer
  jit, as plain library calls) against scikit-learn's
  ``KernelRidge(kernel="rbf").fit(...).predict(test_masks)``; predictions are
  compared with each other and with a float64 SciPy Cholesky solve.
- selection: ``select_kernel_hyperparameters`` (``method="loo"`` and
  ``method="kfold"`` with 5 contiguous folds) against ``GridSearchCV(KernelRidge,
  cv=5, scoring="neg_mean_squared_error", refit=False)`` over the same
  6 x 6 (gamma, ridge) grid.

Ratios are scikit-learn seconds / ours (above 1 = ours faster).

Usage (repo root)::

    python benchmarks/bench_surrogates.py                      # full default set
    python benchmarks/bench_surrogates.py --quick              # CI smoke, seconds
    python benchmarks/bench_surrogates.py --sizes 500 2000 --dtypes float64 \
        --selection-sizes 500
"""

from __future__ import annotations

import argparse
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
from _common import (  # noqa: E402
    add_quick,
    compile_timed,
    environment,
    fill_defaults,
    format_table,
    strip_results,
    time_call,
    write_json,
)
from sklearn.kernel_ridge import KernelRidge  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold  # noqa: E402

from tasksurrogate_jax.core.surrogates import (  # noqa: E402
    default_gamma_grid,
    default_ridge_grid,
    fit_kernel_surrogate,
    select_kernel_hyperparameters,
)

# Agreement of our predictions with scikit-learn's, as max |diff| / max |pred|.
TOLERANCE = {"float64": 1e-6, "float32": 1e-3}
NUM_FOLDS = 5


def make_problem(num_subsets, num_tasks, num_targets, num_test, *, seed=0,
                 num_pairs=25, interaction_density=0.2, noise=0.1):
    """Masks and scores with linear effects, sparse pairwise interactions, noise.

    Returns:
      ``(masks [m, K], scores [m, T], test_masks [num_test, K])`` in float64.
    """
    rng = np.random.default_rng(seed)
    masks = (rng.random((num_subsets, num_tasks)) < 0.5).astype(np.float64)
    test_masks = (rng.random((num_test, num_tasks)) < 0.5).astype(np.float64)
    bias = rng.normal(size=num_targets)
    linear = rng.normal(size=(num_tasks, num_targets)) / np.sqrt(num_tasks)
    pairs = np.array([rng.choice(num_tasks, 2, replace=False)
                      for _ in range(num_pairs)])
    interaction = rng.normal(size=(num_pairs, num_targets)) * (
        rng.random((num_pairs, num_targets)) < interaction_density)
    clean = (bias + masks @ linear
             + (masks[:, pairs[:, 0]] * masks[:, pairs[:, 1]]) @ interaction)
    scores = clean + noise * clean.std() * rng.normal(size=clean.shape)
    return masks, scores, test_masks


def reference_predictions(masks, scores, test_masks, gamma, ridge):
    """Float64 kernel ridge predictions by SciPy Cholesky (the exact answer)."""

    def rbf(a, b):
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.exp(-gamma * np.maximum(sq, 0.0))

    k = rbf(masks, masks)
    k[np.diag_indices_from(k)] += ridge
    alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(k, lower=True), scores)
    return rbf(test_masks, masks) @ alpha


def _relative_gap(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def bench_fit(masks, scores, test_masks, dtype, *, gamma, ridge, repeats,
              reference):
    """Times our jitted fit+predict and scikit-learn's; checks agreement."""
    x, y, xt = (a.astype(dtype) for a in (masks, scores, test_masks))

    def ours_fn(x, y, xt):
        # jitter=0 so that both solve (K + ridge I) alpha = y exactly.
        return fit_kernel_surrogate(x, y, gamma=gamma, ridge=ridge, jitter=0.0,
                                    standardize=False).predict(xt)

    xj, yj, xtj = jnp.asarray(x), jnp.asarray(y), jnp.asarray(xt)
    compiled, compile_s = compile_timed(ours_fn, xj, yj, xtj)
    ours = time_call(lambda: compiled(xj, yj, xtj), repeats=repeats)
    # The same library calls without an outer jit (fit jitted inside, predict eager).
    eager = time_call(lambda: ours_fn(xj, yj, xtj), repeats=repeats)
    sk = time_call(
        lambda: KernelRidge(kernel="rbf", gamma=gamma, alpha=ridge).fit(x, y)
        .predict(xt), repeats=repeats)
    ours_pred, sk_pred = np.asarray(ours["result"]), np.asarray(sk["result"])
    gap = _relative_gap(ours_pred, sk_pred)
    tolerance = TOLERANCE[np.dtype(dtype).name]
    return {
        "compile_s": compile_s,
        "ours": strip_results(ours),
        "sklearn": strip_results(sk),
        "ratio": sk["best"] / ours["best"],
        "ours_no_outer_jit": strip_results(eager),
        "ratio_no_outer_jit": sk["best"] / eager["best"],
        "ours_dtype": str(ours_pred.dtype),
        "sklearn_dtype": str(sk_pred.dtype),
        "max_abs_diff": float(np.max(np.abs(ours_pred - sk_pred))),
        "rel_diff": gap,
        "ours_rel_err_vs_f64": _relative_gap(ours_pred, reference),
        "sklearn_rel_err_vs_f64": _relative_gap(sk_pred, reference),
        "tolerance": tolerance,
        "agree": gap <= tolerance,
    }


def bench_selection(masks, scores, dtype, *, gammas, ridges, methods, repeats):
    """Times our LOO and k-fold selection and ``GridSearchCV``; compares choices."""
    x, y = masks.astype(dtype), scores.astype(dtype)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    out = {}
    for method in ("loo", "kfold"):
        if method not in methods:
            continue

        def select(x, y, method=method):
            search = select_kernel_hyperparameters(
                x, y, gammas=gammas, ridges=ridges, method=method,
                num_folds=NUM_FOLDS, criterion="mse", standardize=False)
            return search.gamma, search.ridge, search.mean_table

        compiled, compile_s = compile_timed(select, xj, yj)
        timing = time_call(lambda compiled=compiled: compiled(xj, yj),
                           repeats=repeats, warmup=False, max_seconds=30.0)
        gamma, ridge, table = (np.asarray(a) for a in timing["result"])
        out[method] = {"compile_s": compile_s, **strip_results(timing),
                       "gamma": float(gamma), "ridge": float(ridge),
                       "mean_table": table}
    if "sklearn" in methods:
        search = GridSearchCV(
            KernelRidge(kernel="rbf"),
            {"gamma": [float(g) for g in gammas], "alpha": [float(r) for r in ridges]},
            cv=KFold(NUM_FOLDS), scoring="neg_mean_squared_error", refit=False)
        timing = time_call(lambda: search.fit(x, y), repeats=repeats, warmup=False,
                           max_seconds=30.0)
        res = search.cv_results_
        table = np.full((len(gammas), len(ridges)), np.nan)
        for g, r, score in zip(res["param_gamma"], res["param_alpha"],
                               res["mean_test_score"], strict=True):
            table[list(gammas).index(g), list(ridges).index(r)] = -score
        out["sklearn"] = {**strip_results(timing),
                          "gamma": float(search.best_params_["gamma"]),
                          "ridge": float(search.best_params_["alpha"]),
                          "mean_table": table}
        if "kfold" in out:
            ours_table = out["kfold"]["mean_table"]
            out["kfold"]["same_choice_as_sklearn"] = (
                np.isclose(out["kfold"]["gamma"], out["sklearn"]["gamma"])
                and np.isclose(out["kfold"]["ridge"], out["sklearn"]["ridge"]))
            out["kfold"]["table_rel_diff_vs_sklearn"] = float(
                np.max(np.abs(ours_table - table) / np.abs(table)))
        for method in ("loo", "kfold"):
            if method in out:
                out[method]["ratio"] = out["sklearn"]["best"] / out[method]["best"]
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quick(parser, "m = 100, 20 targets, 50 test masks, one repeat",
              "bench_surrogates")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="numbers of subsets m for the fit benchmark "
                        "(500 2000 8000; quick 100)")
    parser.add_argument("--selection-sizes", type=int, nargs="*", default=None,
                        help="m for the selection benchmark (default: --sizes)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                        choices=["float32", "float64"])
    parser.add_argument("--selection-methods", nargs="+",
                        default=["sklearn", "loo", "kfold"],
                        choices=["sklearn", "loo", "kfold"])
    parser.add_argument("--num-tasks", type=int, default=50)
    parser.add_argument("--num-targets", type=int, default=None,
                        help="targets (1000; quick 20)")
    parser.add_argument("--num-test", type=int, default=None,
                        help="masks to predict after the fit (1000; quick 50)")
    parser.add_argument("--gamma", type=float, default=None,
                        help="fit gamma (default 1 / num_tasks)")
    parser.add_argument("--ridge", type=float, default=1e-2, help="fit ridge")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls (3; quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    return fill_defaults(
        parser.parse_args(argv),
        {"sizes": [500, 2000, 8000], "num_targets": 1000, "num_test": 1000,
         "repeats": 3},
        {"sizes": [100], "num_targets": 20, "num_test": 50, "repeats": 1},
        name="bench_surrogates")


def main(argv=None):
    args = parse_args(argv)
    selection_sizes = (args.sizes if args.selection_sizes is None
                       else args.selection_sizes)
    gamma = 1.0 / args.num_tasks if args.gamma is None else args.gamma
    gammas = default_gamma_grid(args.num_tasks)
    ridges = default_ridge_grid()
    payload = {
        "environment": environment(),
        "config": {**vars(args), "selection_sizes": selection_sizes, "fit_gamma": gamma,
                   "gammas": gammas, "ridges": ridges, "num_folds": NUM_FOLDS,
                   "tolerance": TOLERANCE},
        "fit": [], "selection": [],
    }
    fit_rows, selection_rows = [], []
    for m in sorted(set(args.sizes) | set(selection_sizes)):
        masks, scores, test_masks = make_problem(
            m, args.num_tasks, args.num_targets, args.num_test, seed=args.seed)
        reference = (reference_predictions(masks, scores, test_masks, gamma,
                                           args.ridge) if m in args.sizes else None)
        for dtype in args.dtypes:
            base = {"m": m, "dtype": dtype, "num_tasks": args.num_tasks,
                    "num_targets": args.num_targets}
            if m in args.sizes:
                start = time.perf_counter()
                record = {**base, "load_before": os.getloadavg()[0],
                          **bench_fit(masks, scores, test_masks, dtype, gamma=gamma,
                                      ridge=args.ridge, repeats=args.repeats,
                                      reference=reference)}
                record["wall_s"] = time.perf_counter() - start
                payload["fit"].append(record)
                fit_rows.append({
                    **base, "ours_s": record["ours"]["best"],
                    "compile_s": record["compile_s"],
                    "sklearn_s": record["sklearn"]["best"], "ratio": record["ratio"],
                    "no_jit_s": record["ours_no_outer_jit"]["best"],
                    "no_jit_ratio": record["ratio_no_outer_jit"],
                    "rel_diff": record["rel_diff"],
                    "ours_err_f64": record["ours_rel_err_vs_f64"],
                    "sk_err_f64": record["sklearn_rel_err_vs_f64"],
                    "agree": record["agree"], "load": record["load_before"]})
                print(format_table(fit_rows[-1:], list(fit_rows[-1])), flush=True)
                write_json(args.out, payload)
            if m in selection_sizes:
                record = {**base, "load_before": os.getloadavg()[0],
                          **bench_selection(masks, scores, dtype, gammas=gammas,
                                            ridges=ridges,
                                            methods=args.selection_methods,
                                            repeats=args.repeats)}
                payload["selection"].append(record)
                row = {**base, "load": record["load_before"]}
                for method in ("sklearn", "loo", "kfold"):
                    if method in record:
                        r = record[method]
                        row[f"{method}_s"] = r["best"]
                        row[f"{method}_choice"] = f"{r['gamma']:.3g}/{r['ridge']:.0e}"
                        if method != "sklearn":
                            row[f"{method}_compile_s"] = r["compile_s"]
                            row[f"{method}_ratio"] = r.get("ratio")
                row["kfold_same"] = record.get("kfold", {}).get(
                    "same_choice_as_sklearn")
                selection_rows.append(row)
                print(format_table(selection_rows[-1:], list(row)), flush=True)
                write_json(args.out, payload)

    fit_columns = ["m", "dtype", "ours_s", "compile_s", "sklearn_s", "ratio",
                   "no_jit_s", "no_jit_ratio", "rel_diff", "ours_err_f64",
                   "sk_err_f64", "agree", "load"]
    print("\nFit + predict (ratio = sklearn / ours; no_jit = library calls without"
          " an outer jit; rel_diff = max|ours-sk|/max|sk|)")
    print(format_table(fit_rows, fit_columns))
    if selection_rows:
        print("\nSelection over a 6 x 6 grid (ratio = GridSearchCV / ours; "
              "choice = gamma/ridge)")
        print(format_table(selection_rows, list(selection_rows[0])))
    path = write_json(args.out, payload)
    print(f"\nwrote {path}")
    failed = [r for r in payload["fit"] if not r["agree"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
