"""Demonstration selection for in-context learning: kernel vs linear surrogates.

The paper's protocol (docs/method.md) on one of two in-context families,
evaluated by the pipeline's ``"fixed_size"`` protocol
(``tasksurrogate_jax.pipeline``; the same evaluation as ``tasksurrogate run
icl`` / ``icl_regression``):

- ``--family induction`` (workload ``icl``): token prompts whose answer hinges
  on an exact symbol match (the embedding linearization fails there);
- ``--family smooth`` (workload ``icl_regression``): in-context linear
  regression over probe inputs, where the prediction varies smoothly with the
  demonstrations (the linearization holds).

1. Train the workload's transformer; show it learns in context.
2. Per draw (``--draws``, seed ``--seed + d``): 200 distinct random 4-shot
   prompts from the pool of 50, scored exactly (forward passes) and by the
   embedding-space linearization; the estimate's relative error and Spearman
   and the scorers' time.
3. Surrogates fit on 80 prompts (exact or estimated scores): held-out
   Spearman on the other 120 and the Spearman of each surrogate's
   demonstration effects with the true ones, beside the truth's ceiling.
4. Under each chooser of ``benchmarks/_selection.py`` (linear, kernel,
   kernel + LCB, kernel + trust region) the 4-shot prompt with the lowest
   predicted mean target loss (exhaustive over all C(50, 4) prompts), and its
   true loss on held-out queries, beside a random prompt (the mean of the
   200), the best of the 80 fitting prompts and the best of the 200.
5. Mean and 95% Student-t interval over the draws of each chooser's held-out
   loss; paired differences to the linear chooser and the relative gain of
   kernel over linear (``_selection.RELATIVE_GAIN_FORMULA``).

    python benchmarks/bench_icl_selection.py --family smooth     # ~25 min
    python benchmarks/bench_icl_selection.py --family induction  # ~25 min
    python benchmarks/bench_icl_selection.py --family induction --preset paper \
        --oracle   # GPU/TPU
    python benchmarks/bench_icl_selection.py --family smooth --quick  # CI smoke
"""

from __future__ import annotations

import argparse
import itertools

import _selection
import jax
import numpy as np
from _common import (
    REPO_ROOT,
    add_quick,
    add_workload_args,
    environment,
    fill_defaults,
    format_table,
    timed,
    write_json,
)

from tasksurrogate_jax import pipeline
from tasksurrogate_jax.workloads import registry

FAMILIES = {"induction": "icl", "smooth": "icl_regression"}
SOURCES = ("exact", "estimated")


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


def describe_prompt(workload, family: str, mask) -> dict:
    """What a prompt holds of the pool's structure: distinct symbols and
    flipped labels (induction), planted weaknesses (smooth)."""
    chosen = np.nonzero(np.asarray(mask))[0]
    if family == "induction":  # a demonstration is [distractor, symbol, label]
        symbols = workload.demonstrations[chosen, 1]
        return {"distinct symbols": len(set(symbols.tolist())),
                "flipped labels": int(workload.pool_flipped[chosen].sum())}
    sources = workload.pool_duplicate_of[chosen]
    return {"noisy": int(workload.pool_noisy[chosen].sum()),
            "outliers": int(workload.pool_outlier[chosen].sum()),
            "duplicate pairs": int(np.isin(sources[sources >= 0], chosen).sum())}


def one_draw(workload, config, args) -> dict:
    """Steps 2-4 on one draw of prompts (``config.seed``)."""
    k, m = args.shots, args.num_fit
    run = pipeline.collect(config, workload=workload, log=lambda line: None)
    masks = run.masks
    # The scorers' speed: both compiled on these prompts already, then timed.
    exact, exact_s = timed(lambda: workload.exact_scores(masks))
    estimated, estimate_s = timed(
        lambda: workload.estimated_scores(masks, anchor=args.anchor))
    run = run._replace(estimated=np.asarray(estimated))
    results = pipeline.evaluate(config, run)
    exact = np.asarray(exact)
    estimation = results["estimation"]
    out = {
        "seed": config.seed,
        "exact_seconds": exact_s, "estimate_seconds": estimate_s,
        "estimate_median_relative_error": estimation["median_relative_error"],
        "estimate_spearman": estimation["spearman_across_subsets"],
        "ceiling": results["ceiling"], "truth": results["truth"],
        "methods": results["methods"], "selection": {},
    }

    def performance(name, mask_rows, target_loss, **extra):
        perf = workload.prompt_performance(mask_rows)
        row = {"heldout_loss": float(perf.loss.mean()),
               "target_loss": float(np.mean(target_loss)), **extra}
        if perf.accuracy is not None:
            row["heldout_accuracy"] = float(perf.accuracy.mean())
        if len(mask_rows) == 1:
            row["prompt"] = [workload.task_names[i]
                             for i in np.nonzero(mask_rows[0])[0]]
            row.update(describe_prompt(workload, args.family, mask_rows[0]))
        out["selection"][name] = row

    for source, scores in zip(SOURCES, (exact, run.estimated), strict=True):
        fits = _selection.fit_selectors(masks[:m], scores[:m], seed=config.seed)
        chosen, seconds = timed(lambda f=fits: _selection.choose_subsets(
            f, workload.num_tasks, size=k, coverage=args.coverage))
        for chooser, pick in chosen.items():
            extra = {key: pick[key] for key in ("kappa", "radius") if key in pick}
            performance(f"{chooser} ({source})", pick["mask"][None],
                        workload.exact_scores(pick["mask"][None]),
                        predicted_loss=pick["predicted"], **extra)
        out[f"choose_seconds_{source}"] = seconds
    mean_loss = exact.mean(1)
    performance("random prompt", masks, mean_loss)
    performance(f"best of the {m} fitting prompts",
                masks[np.argmin(mean_loss[:m])][None], mean_loss[:m].min())
    performance(f"best of the {args.num_prompts} prompts",
                masks[np.argmin(mean_loss)][None], mean_loss.min())
    return out


def column(draws, *path):
    values = []
    for draw in draws:
        for key in path:
            draw = draw[key]
        values.append(draw)
    return values


def _metrics(draws) -> list[str]:
    """The true-score metrics of a pick: the mean target loss (what every
    chooser minimises), the held-out loss (and accuracy: classification)."""
    has_accuracy = "heldout_accuracy" in draws[0]["selection"]["random prompt"]
    return ["target_loss", "heldout_loss"] + (["heldout_accuracy"] if has_accuracy
                                              else [])


def summarize(draws) -> dict:
    """Intervals over the draws: each chooser's target and held-out loss (and
    accuracy), its paired difference to the linear chooser, the relative gain."""
    interval = _selection.mean_interval
    names = list(draws[0]["selection"])
    metrics = _metrics(draws)
    summary = {"choosers": {}, "versus_linear": {}}
    for name in names:
        summary["choosers"][name] = {
            metric: interval(column(draws, "selection", name, metric))
            for metric in metrics}
    for source in SOURCES:
        linear = {metric: np.array(column(draws, "selection", f"linear ({source})",
                                          metric)) for metric in metrics}
        for chooser in _selection.CHOOSERS[1:]:
            name = f"{chooser} ({source})"
            row = {}
            for metric in metrics:
                values = np.array(column(draws, "selection", name, metric))
                lower = metric != "heldout_accuracy"
                sign = 1.0 if lower else -1.0
                gain = sign * (linear[metric] - values)
                row[f"{metric} improvement"] = interval(gain)
                row[f"{metric} relative gain"] = interval(_selection.relative_gain(
                    values, linear[metric], lower_is_better=lower))
                row[f"{metric} better/tied/worse"] = [
                    int(np.sum(gain > 0)), int(np.sum(gain == 0)),
                    int(np.sum(gain < 0))]
            summary["versus_linear"][name] = row
    return summary


def print_tables(workload, draws, summary, args, oracle):
    fmt = _selection.format_interval
    print(f"\nEstimation (embedding-space linearization, anchor "
          f"{args.anchor or 'the workload default'}) on {args.num_prompts} "
          f"prompts; mean ± std over {len(draws)} draws")
    est = {key: _pm(column(draws, key)) for key in (
        "exact_seconds", "estimate_seconds", "estimate_median_relative_error",
        "estimate_spearman")}
    print(format_table([est], list(est)))

    print(f"\nHeld-out prompts: fit on {args.num_fit}, predict "
          f"{args.num_prompts - args.num_fit} (exact scores as truth); effects: "
          f"Spearman with the true effect of each demonstration in "
          f"{args.shots}-shot prompts ({draws[0]['truth']}); mean ± std over draws")
    columns = ["surrogate", "held-out Spearman", "normalized error",
               "effect Spearman (per target)", "effect Spearman (mean target)"]
    rows = [{"surrogate": "ceiling of the truth",
             "held-out Spearman": _pm(column(draws, "ceiling", "heldout_spearman")),
             "effect Spearman (per target)": _pm(
                 column(draws, "ceiling", "effect_spearman_per_target")),
             "effect Spearman (mean target)": _pm(
                 column(draws, "ceiling", "effect_spearman_mean_target"))}]
    rows += [{"surrogate": name,
              "held-out Spearman": _pm(column(draws, "methods", name,
                                              "heldout_spearman")),
              "normalized error": _pm(column(draws, "methods", name,
                                             "normalized_error")),
              "effect Spearman (per target)": _pm(
                  column(draws, "methods", name, "effect_spearman")),
              "effect Spearman (mean target)": _pm(
                  column(draws, "methods", name, "effect_spearman_mean_target"))}
             for name in draws[0]["methods"]]
    print(format_table(rows, columns))

    first = draws[0]["selection"]
    described = [key for key in first[f"linear ({SOURCES[0]})"]
                 if key in ("distinct symbols", "flipped labels", "noisy",
                            "outliers", "duplicate pairs")]
    metrics = _metrics(draws)
    titles = {"target_loss": "target loss", "heldout_loss": "held-out loss",
              "heldout_accuracy": "held-out accuracy"}
    print(f"\nSelected {args.shots}-shot prompt: true mean loss on the "
          f"{workload.num_targets} target queries (what every chooser minimises) "
          f"and on {workload.heldout[0].shape[0]} held-out queries; mean and 95% "
          f"interval over {len(draws)} draws; prompt contents: mean over draws")
    rows = []
    for name in first:
        chooser = summary["choosers"][name]
        row = {"prompt chosen by": name}
        row.update({titles[metric]: fmt(chooser[metric]) for metric in metrics})
        if "predicted_loss" in first[name]:
            row["predicted target loss"] = _pm(
                column(draws, "selection", name, "predicted_loss"))
        for key in described:
            if key in first[name]:
                row[key] = f"{np.mean(column(draws, 'selection', name, key)):.1f}"
        rows.append(row)
    if oracle is not None:
        rows.append({"prompt chosen by": "true best prompt (all scored exactly)",
                     "held-out loss": f"{oracle['heldout_loss']:.4f}",
                     "target loss": f"{oracle['target_loss']:.4f}"})
    print(format_table(rows, ["prompt chosen by", *(titles[m] for m in metrics),
                              "predicted target loss", *described]))

    print("\nAgainst the linear chooser on the same scores, paired over the "
          "draws (improvement: loss reduction or accuracy gain, mean and 95% "
          f"interval); {_selection.RELATIVE_GAIN_FORMULA}")
    rows = []
    for name, row in summary["versus_linear"].items():
        for metric in metrics:
            rows.append({"chooser": name, "metric": titles[metric],
                         "improvement": fmt(row[f"{metric} improvement"]),
                         "relative gain": fmt(row[f"{metric} relative gain"], 3),
                         "better/tied/worse": "/".join(
                             map(str, row[f"{metric} better/tied/worse"]))})
    print(format_table(rows, ["chooser", "metric", "improvement", "relative gain",
                              "better/tied/worse"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="smooth")
    add_quick(ap, "the 'tiny' preset, 40 prompts (16 fit), 3 shots, 2 draws")
    add_workload_args(ap, "ICLConfig or ICLRegressionConfig")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="random prompts per draw (200; quick 40)")
    ap.add_argument("--num-fit", type=int, default=None,
                    help="of which the surrogates are fit on (80; quick 16)")
    ap.add_argument("--shots", type=int, default=None,
                    help="demonstrations per prompt (4; quick 3)")
    ap.add_argument("--draws", type=int, default=None,
                    help="independent draws of the prompts (10; quick 2)")
    ap.add_argument("--anchor", default=None,
                    help="the estimate's anchor (default: the workload's)")
    ap.add_argument("--coverage", type=float, default=0.9,
                    help="leave-one-out coverage the LCB's kappa is calibrated to")
    ap.add_argument("--truth-prompts", type=int, default=None,
                    help="prompts the true effects are computed on (default: the "
                         "pipeline's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle", action="store_true",
                    help="also score every prompt exactly to find the true best")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: "
                         "results/bench_icl_selection_<family>.json)")
    args = fill_defaults(
        ap.parse_args(),
        {"preset": "cpu", "num_prompts": 200, "num_fit": 80, "shots": 4, "draws": 10},
        {"preset": "tiny", "num_prompts": 40, "num_fit": 16, "shots": 3, "draws": 2})
    if not 2 < args.num_fit < args.num_prompts - 2:
        ap.error("--num-fit must leave at least 3 prompts on each side")
    if args.draws < 2:
        ap.error("--draws must be at least 2 (intervals over draws)")
    suffix = "_quick" if args.quick else ""
    out = args.out or str(
        REPO_ROOT / "results" / f"bench_icl_selection_{args.family}{suffix}.json")
    name = FAMILIES[args.family]

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, family "
          f"{args.family} (workload {name}), preset {args.preset}")
    overrides = args.overrides
    workload, train_s = timed(lambda: registry.make_workload(name, args.preset,
                                                             overrides))
    print(f"trained the transformer in {train_s:.1f} s; pool of "
          f"{workload.num_tasks} demonstrations, {workload.num_targets} target "
          f"queries, {workload.heldout[0].shape[0]} held-out queries "
          f"({workload.target_description})")
    if args.family == "induction":
        learning = {"accuracy": workload.in_context_accuracy(
            jax.random.key(args.seed + 1))}
        print(format_table([{"shots": str(i), "query accuracy": float(a)}
                            for i, a in enumerate(learning["accuracy"])],
                           ["shots", "query accuracy"]))
    else:
        learning = workload.in_context_loss(jax.random.key(args.seed + 1))
        print(format_table([{"demonstrations": str(i), "model": float(a),
                             "Bayes-optimal": float(b)}
                            for i, (a, b) in enumerate(zip(
                                learning["model"], learning["bayes"], strict=True))],
                           ["demonstrations", "model", "Bayes-optimal"]))

    draws, summary, oracle = [], None, None

    def save():
        return write_json(out, {
            "args": vars(args), "environment": environment(),
            "config": workload.store_config(), "train_seconds": train_s,
            "in_context_learning": learning, "draws": draws, "summary": summary,
            "relative_gain_formula": _selection.RELATIVE_GAIN_FORMULA,
            "oracle": oracle})

    for d in range(args.draws):
        config = pipeline.check_config(pipeline.PipelineConfig(
            workload=name, preset=args.preset, seed=args.seed + d, shots=args.shots,
            num_subsets=args.num_fit, num_heldout=args.num_prompts - args.num_fit,
            truth_prompts=args.truth_prompts, overrides=tuple(overrides.items())),
            workload)
        draws.append(one_draw(workload, config, args))
        summary = summarize(draws) if len(draws) > 1 else None
        # Every finished draw is on disk: an interrupted run keeps them.
        save()
        print(f"draw {d + 1}/{args.draws} done", flush=True)
    if args.oracle:
        mask, seconds = timed(lambda: _oracle_mask(workload, args.shots))
        perf = workload.prompt_performance(mask[None])
        oracle = {"heldout_loss": float(perf.loss[0]), "seconds": seconds,
                  "target_loss": float(np.asarray(
                      workload.exact_scores(mask[None])).mean()),
                  "prompt": [workload.task_names[i] for i in np.nonzero(mask)[0]]}
    print_tables(workload, draws, summary, args, oracle)
    print(f"\nwrote {save()}")


if __name__ == "__main__":
    main()
