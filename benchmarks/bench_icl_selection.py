"""Demonstration selection for in-context learning: kernel vs linear surrogates.

The paper's protocol (docs/method.md) on the synthetic ICL
workload (``tasksurrogate_jax.workloads.icl``), evaluated by the pipeline's
``"fixed_size"`` protocol (``tasksurrogate_jax.pipeline``; the same evaluation
as ``tasksurrogate run icl``):

1. Train the workload's transformer; show it learns in context (query
   accuracy by number of demonstrations, on fresh tasks).
2. Draw 200 distinct random 4-shot prompts from the pool of 50; score them
   exactly (forward passes) and by the embedding-space linearization; report
   the estimate's relative error and Spearman (``pipeline.evaluate``) and the
   time of each scorer.
3. Fit linear and kernel surrogates on 80 prompts (exact or estimated scores);
   held-out Spearman and normalized error on the other 120 (against the exact
   scores), and the Spearman of each surrogate's demonstration effects with
   the true ones (forward passes of many 4-shot prompts), beside the truth's
   ceiling.
4. Under each surrogate, choose the 4-shot prompt with the lowest predicted
   mean target loss (exhaustive search over all C(50, 4) prompts) and measure
   its true loss and accuracy on held-out queries, beside random prompts, the
   best of the 80 fitting prompts and the best of the 200 sampled prompts
   (optionally the true best prompt, ``--oracle``).
5. Print the improvement of kernel over linear selection: the relative
   reduction of held-out loss and the relative gain in held-out accuracy.

Repeats draw new prompt sets (seeds ``--seed + r``); tables give mean ± std.

    python benchmarks/bench_icl_selection.py            # cpu preset, ~8 min
    python benchmarks/bench_icl_selection.py --preset paper --oracle   # GPU/TPU
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import numpy as np
from _common import REPO_ROOT, environment, format_table, parse_overrides, write_json

from tasksurrogate_jax import pipeline, selection
from tasksurrogate_jax.workloads.icl import icl_workload


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _pm(values) -> str:
    values = np.asarray(values, float)
    if values.size == 1:
        return f"{values[0]:.4f}"
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def _oracle_mask(workload, shots: int, chunk: int = 16384) -> np.ndarray:
    """The prompt with the lowest true mean target loss, over all of them."""
    best, best_mask = np.inf, None
    combos = itertools.combinations(range(workload.num_tasks), shots)
    while True:
        rows = np.array(list(itertools.islice(combos, chunk)))
        if rows.size == 0:
            return best_mask
        masks = np.zeros((len(rows), workload.num_tasks), np.float32)
        np.put_along_axis(masks, rows, 1.0, axis=1)
        loss = np.asarray(workload.exact_scores(masks)).mean(1)
        if loss.min() < best:
            best, best_mask = loss.min(), masks[loss.argmin()]


def one_repeat(workload, config, args) -> dict:
    """Steps 2-4 on one draw of prompts (``config.seed``)."""
    k, m = args.shots, args.num_fit
    run = pipeline.collect(config, workload=workload, log=lambda line: None)
    masks = run.masks
    # The scorers' speed: both compiled on these prompts already, then timed.
    exact, exact_s = _timed(lambda: workload.exact_scores(masks))
    estimated, estimate_s = _timed(
        lambda: workload.estimated_scores(masks, anchor=args.anchor))
    run = run._replace(estimated=np.asarray(estimated))
    results = pipeline.evaluate(config, run)
    exact = np.asarray(exact)
    estimation = results["estimation"]
    out = {
        "exact_seconds": exact_s, "estimate_seconds": estimate_s,
        "estimate_median_relative_error": estimation["median_relative_error"],
        "estimate_spearman": estimation["spearman_across_subsets"],
        "ceiling": results["ceiling"], "truth": results["truth"],
        "methods": results["methods"], "selection": {},
    }

    def performance(name, mask_rows, target_loss):
        perf = workload.prompt_performance(mask_rows)
        out["selection"][name] = {
            "heldout_loss": float(perf.loss.mean()),
            "heldout_accuracy": float(perf.accuracy.mean()),
            "target_loss": float(np.mean(target_loss)),
        }
        if len(mask_rows) == 1:  # a demonstration is [distractor, symbol, label]
            symbols = workload.demonstrations[np.nonzero(mask_rows[0])[0], 1]
            out["selection"][name]["distinct_symbols"] = len(set(symbols.tolist()))

    for source, scores in (("exact", exact), ("estimated", run.estimated)):
        # The surrogates the evaluation fit (same scores, settings and seed).
        fits = pipeline.fit_surrogates(masks[:m], scores[:m], seed=config.seed)
        for kind in ("linear", "kernel"):
            surrogate, name = fits[kind], f"{kind} ({source})"
            chosen, seconds = _timed(
                lambda s=surrogate: selection.select_subset(s, workload.num_tasks,
                                                            size=k))
            performance(name, chosen.mask[None],
                        workload.exact_scores(chosen.mask[None]))
            out["selection"][name].update(
                prompt=[workload.task_names[i] for i in chosen.indices],
                predicted_loss=chosen.predicted, search_seconds=seconds,
                method=chosen.method, num_evaluated=chosen.num_evaluated)
    mean_loss = exact.mean(1)
    performance(f"random prompt (mean of the {args.num_prompts})", masks, mean_loss)
    performance(f"best of the {m} fitting prompts",
                masks[np.argmin(mean_loss[:m])][None], mean_loss[:m].min())
    performance(f"best of the {args.num_prompts} prompts",
                masks[np.argmin(mean_loss)][None], mean_loss.min())
    return out


def improvement(selection_rows: dict, source: str, metric: str) -> float:
    """Kernel selection relative to linear selection on held-out queries:
    ``(L_linear - L_kernel) / L_linear`` for the loss, ``A_kernel / A_linear - 1``
    for the accuracy (``+0.4`` = 40% better)."""
    linear = selection_rows[f"linear ({source})"][metric]
    kernel = selection_rows[f"kernel ({source})"][metric]
    if metric == "heldout_accuracy":
        return kernel / linear - 1.0
    return (linear - kernel) / linear


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="FIELD=VALUE", help="ICLConfig field to override")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--num-fit", type=int, default=80)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3,
                    help="independent draws of the prompts")
    ap.add_argument("--anchor", default="mean")
    ap.add_argument("--truth-prompts", type=int, default=None,
                    help="prompts the true effects are computed on (default: the "
                         "pipeline's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle", action="store_true",
                    help="also score every prompt exactly to find the true best")
    ap.add_argument("--out",
                    default=str(REPO_ROOT / "results/bench_icl_selection.json"))
    args = ap.parse_args()
    if not 2 < args.num_fit < args.num_prompts - 2:
        ap.error("--num-fit must leave at least 3 prompts on each side")

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"preset {args.preset}")
    overrides = parse_overrides(args.overrides)
    workload, train_s = _timed(lambda: icl_workload(args.preset, **overrides))
    c = workload.config
    print(f"trained the transformer in {train_s:.1f} s ({c.num_steps} steps); "
          f"pool {workload.num_tasks} demonstrations "
          f"({int(workload.pool_flipped.sum())} with a wrong label), "
          f"{workload.num_targets} target queries, "
          f"{workload.heldout[0].shape[0]} held-out queries\n")
    accuracy = workload.in_context_accuracy(jax.random.key(args.seed + 1))
    print("In-context learning: query accuracy on fresh tasks by demonstrations shown")
    print(format_table([{"shots": str(i), "accuracy": float(a)}
                        for i, a in enumerate(accuracy)], ["shots", "accuracy"]))

    repeats = []
    for r in range(args.repeats):
        config = pipeline.check_config(pipeline.PipelineConfig(
            workload="icl", preset=args.preset, seed=args.seed + r, shots=args.shots,
            num_subsets=args.num_fit, num_heldout=args.num_prompts - args.num_fit,
            truth_prompts=args.truth_prompts, overrides=tuple(overrides.items())))
        repeats.append(one_repeat(workload, config, args))
        print(f"\nrepeat {r + 1}/{args.repeats} done")
    oracle = None
    if args.oracle:
        mask, seconds = _timed(lambda: _oracle_mask(workload, args.shots))
        perf = workload.prompt_performance(mask[None])
        oracle = {"heldout_loss": float(perf.loss[0]),
                  "heldout_accuracy": float(perf.accuracy[0]),
                  "prompt": [n for n, b in zip(workload.task_names, mask, strict=True)
                             if b], "seconds": seconds}

    def column(path):
        vals = []
        for rep in repeats:
            v = rep
            for p in path:
                v = v[p]
            vals.append(v)
        return vals

    print("\nEstimation (embedding-space linearization, anchor "
          f"{args.anchor!r}) on {args.num_prompts} prompts")
    est = {key: _pm(column([key])) for key in (
        "exact_seconds", "estimate_seconds", "estimate_median_relative_error",
        "estimate_spearman")}
    print(format_table([est], list(est)))

    print(f"\nHeld-out prompts: fit on {args.num_fit}, predict "
          f"{args.num_prompts - args.num_fit} (exact scores as truth); effects: "
          f"Spearman with the true effect of each demonstration in "
          f"{args.shots}-shot prompts ({repeats[0]['truth']})")
    columns = ["surrogate", "held-out Spearman", "normalized error",
               "effect Spearman (per target)", "effect Spearman (mean target)"]
    ceiling = {"surrogate": "ceiling of the truth",
               "held-out Spearman": _pm(column(["ceiling", "heldout_spearman"])),
               "effect Spearman (per target)": _pm(
                   column(["ceiling", "effect_spearman_per_target"])),
               "effect Spearman (mean target)": _pm(
                   column(["ceiling", "effect_spearman_mean_target"]))}
    rows = [ceiling] + [
        {"surrogate": name,
         "held-out Spearman": _pm(column(["methods", name, "heldout_spearman"])),
         "normalized error": _pm(column(["methods", name, "normalized_error"])),
         "effect Spearman (per target)": _pm(
             column(["methods", name, "effect_spearman"])),
         "effect Spearman (mean target)": _pm(
             column(["methods", name, "effect_spearman_mean_target"]))}
        for name in repeats[0]["methods"]]
    print(format_table(rows, columns))

    print(f"\nSelected {args.shots}-shot prompt: true loss and accuracy on "
          "held-out queries")
    rows = [{"prompt chosen by": name,
             "held-out loss": _pm(column(["selection", name, "heldout_loss"])),
             "held-out accuracy": _pm(column(["selection", name, "heldout_accuracy"])),
             "target loss": _pm(column(["selection", name, "target_loss"])),
             "predicted target loss": (
                 _pm(column(["selection", name, "predicted_loss"]))
                 if "predicted_loss" in repeats[0]["selection"][name] else ""),
             "distinct symbols": (
                 _pm(column(["selection", name, "distinct_symbols"]))
                 if "distinct_symbols" in repeats[0]["selection"][name] else "")}
            for name in repeats[0]["selection"]]
    if oracle is not None:
        rows.append({"prompt chosen by": "true best prompt (all scored exactly)",
                     "held-out loss": f"{oracle['heldout_loss']:.4f}",
                     "held-out accuracy": f"{oracle['heldout_accuracy']:.4f}"})
    print(format_table(rows, ["prompt chosen by", "held-out loss",
                              "held-out accuracy", "target loss",
                              "predicted target loss", "distinct symbols"]))

    gains = {}
    for source in ("exact", "estimated"):
        for metric in ("heldout_loss", "heldout_accuracy"):
            values = [improvement(rep["selection"], source, metric) for rep in repeats]
            gains[f"{source}/{metric}"] = values
            print(f"kernel over linear selection ({source} scores, {metric}): "
                  f"{_pm(values)} "
                  f"(per repeat: {', '.join(f'{v:+.0%}' for v in values)})")
    path = write_json(args.out, {
        "args": vars(args), "environment": environment(),
        "config": workload.store_config(), "train_seconds": train_s,
        "in_context_accuracy": accuracy, "repeats": repeats,
        "improvement_kernel_over_linear": gains, "oracle": oracle,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
