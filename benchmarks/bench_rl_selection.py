"""Multi-objective RL: task attribution and task selection with surrogates.

On the RL workload (``tasksurrogate_jax.workloads.rl``: CartPole variants with
different physics and target cart positions, one policy for all), evaluated
by the pipeline's ``"loo"`` protocol (``tasksurrogate_jax.pipeline``; the same
evaluation as ``tasksurrogate run rl``):

1. Train ``θ*`` on all variants; its returns against an untrained policy.
2. Ground truth: fine-tune ``θ*`` on the full set and on each leave-one-out
   set, in ``--replicates`` paired replicates (other training keys): their
   split-half agreement is the ground truth's ceiling.
3. Random subsets (uniform over those neither empty, full nor leave-one-out,
   or each dropping ``--drop`` variants): exact scores (fine-tuning, the same
   replicates) and first-order estimates (projected policy gradient); the
   estimate's error.
4. LOO correlation of the surrogates (linear and kernel, on exact and on
   estimated scores, and the kernel surrogate's Banzhaf values), of the
   first-order estimate of the LOO sets themselves and of gradient alignment
   at ``θ*`` (TracIn-style), each with a bootstrap interval beside the
   ceiling; held-out Spearman.
5. Selection over ``--draws`` independent draws. Draw ``d`` takes the
   pipeline's fitting subsets of seed ``--seed + d`` (draw 0: those of step 3)
   with the mean of their first ``--fit-replicates`` replicates (the
   surrogates' input; the ground truth has more), fits the surrogates of
   ``benchmarks/_selection.py`` on them and, for each target variant, picks
   the subset with the best predicted target return under each chooser
   (linear, kernel, kernel + LCB, kernel + trust region; exhaustive over all
   non-empty subsets). Every pick, the best sampled subset of each target and
   the full set are fine-tuned on again in ``--replicates`` paired replicates
   with training and evaluation episodes of their own, independent of the
   fitting scores, so that neither a surrogate nor the best sampled subset
   profits from the noise it was chosen on. Per draw: the mean over targets of
   each chooser's target return; over draws: means with 95% Student-t
   intervals, paired differences to the linear chooser and the relative gain,
   beside the measurement noise of the picks' returns.

    python benchmarks/bench_rl_selection.py             # cpu preset, 15-26 min
    python benchmarks/bench_rl_selection.py --draws 0   # attribution only
    python benchmarks/bench_rl_selection.py --quick     # CI smoke
"""

from __future__ import annotations

import argparse
import time

import _selection
import jax
import numpy as np
from _common import (
    add_quick,
    add_workload_args,
    environment,
    fill_defaults,
    format_table,
    write_json,
)

from tasksurrogate_jax import pipeline
from tasksurrogate_jax.core.subsets import leave_one_out_masks
from tasksurrogate_jax.pipeline import report
from tasksurrogate_jax.truth import reliability
from tasksurrogate_jax.truth.chunking import pad_rows
from tasksurrogate_jax.workloads.rl import policy_gradients, rl_workload

# Subsets per compiled call when re-measuring picks: a draw has 10 to 50
# distinct ones, padded to a multiple of this (one compiled shape).
PICK_CHUNK = 8
CHOOSERS = _selection.CHOOSERS
BASELINES = ("best sampled", "all variants")


def extra_methods(workload, run, config) -> dict:
    """LOO-effect predictions ``{name: [K, T]}`` beyond the pipeline's: the
    first-order estimate of the LOO sets, and gradient alignment at ``θ*``."""
    key = pipeline.stage_keys(config.seed)["estimated"]  # the estimate's key
    loo = np.asarray(leave_one_out_masks(workload.num_tasks))
    estimate = np.asarray(run.workload.estimated_scores(
        loo, key=key, base_params=run.theta))
    examples, task, adv, _ = workload.linearized_rollouts(
        key=key, base_params=run.theta, proj_dim=run.workload.estimation.proj_dim)
    grads = np.asarray(policy_gradients(examples, adv))
    per_variant = np.stack([grads[task == i].mean(0)
                            for i in range(workload.num_tasks)])  # [K, d]
    # Removing variant i removes its share of the update; for target t the
    # first-order change of minus the return is <g_t, g_i> (TracIn at θ*).
    return {"first-order estimate of the LOO sets": estimate[1:] - estimate[0],
            "gradient alignment (TracIn at θ*)":
                per_variant @ per_variant[list(workload.targets)].T}


def attribution(workload, config, out_dir) -> tuple:
    """Steps 1-4: prints the tables; returns ``(run, results, θ* returns,
    untrained returns)``."""
    run = pipeline.collect(config, workload=workload, out_dir=out_dir)
    trained = -np.asarray(workload.evaluate(run.theta))
    untrained = -np.asarray(workload.evaluate(
        workload.init_fn(jax.random.key(config.seed + 100))))
    print(f"\nθ* trained in {run.seconds['base']:.1f} s "
          f"({workload.config.iterations} iterations)\n")
    print(format_table(
        [{"variant": n, "θ* return": float(a), "untrained return": float(b)}
         for n, a, b in zip(workload.task_names, trained, untrained, strict=True)],
        ["variant", "θ* return", "untrained return"]))
    results = pipeline.evaluate(config, run._replace(
        baselines={**run.baselines, **extra_methods(workload, run, config)}))
    est = results["estimation"]
    print(f"\n{run.masks.shape[0]} random subsets: fine-tuning "
          f"{run.seconds['subsets']:.1f} s ({config.replicates} replicates), "
          f"first-order estimate {run.seconds['estimated']:.1f} s; estimate median "
          f"relative error {est['median_relative_error']:.2%}, Spearman across "
          f"subsets {est['spearman_across_subsets']:.3f}")
    print("\nAttribution: agreement with leave-one-out fine-tuning")
    print(report.format_table(results))
    return run, results, trained, untrained


def fresh_returns(workload, evaluate, masks, *, key, replicates: int,
                  base_params) -> np.ndarray:
    """Target returns ``[R, n, T]`` of fine-tuning ``θ*`` on each of ``masks``
    in ``R`` paired replicates of their own: replicate ``r`` trains with the
    streams of replicate ``r`` of ``fold_in(key, 1)`` and is evaluated on
    episodes from ``fold_in(fold_in(key, 2), r)``, shared by the subsets
    within it (``evaluate``: the vmapped ``workload.evaluate(params, key)``)."""
    n = masks.shape[0]
    padded = pad_rows(np.asarray(masks), -(-n // PICK_CHUNK) * PICK_CHUNK)
    train_key, eval_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    returns = []
    for r in range(replicates):
        policies = workload.train_subsets(padded, key=train_key, replicate=r,
                                          base_params=base_params,
                                          chunk_size=PICK_CHUNK)
        returns.append(-np.asarray(evaluate(policies, jax.random.fold_in(
            eval_key, r)))[:n])
    return np.stack(returns)


def fitting_data(workload, config, run, draw: int, replicates: int) -> tuple:
    """Draw ``draw``'s fitting masks ``[m, K]`` and losses ``[replicates, m,
    T]``: the pipeline's of seed ``config.seed + draw``, its first
    ``replicates`` replicates (draw 0: the run's own)."""
    m = config.num_subsets
    if draw == 0:
        return np.asarray(run.masks[:m]), np.asarray(run.exact)[:replicates, :m]
    keys = pipeline.stage_keys(config.seed + draw)
    masks = pipeline.loo_protocol_masks(keys["subsets"], config,
                                        workload.num_tasks)[:m]
    scores = workload.replicate_scores(
        masks, key=keys["base"], regime=config.regime, replicates=replicates,
        base_params=run.theta, chunk_size=config.chunk_size)
    return masks, np.asarray(scores)


def one_draw(workload, evaluate, config, run, draw: int,
             fit_replicates: int) -> dict:
    """One draw of step 5: picks, their re-measured returns and the noise."""
    start = time.perf_counter()
    num_tasks, num_targets = workload.num_tasks, workload.num_targets
    replicates = config.replicates
    masks, losses = fitting_data(workload, config, run, draw, fit_replicates)
    fit_returns = -losses.mean(0)  # [m, T]
    fits = _selection.fit_selectors(masks, losses.mean(0), seed=config.seed + draw)
    picks = {name: [] for name in (*CHOOSERS, *BASELINES)}
    predicted = {name: [] for name in CHOOSERS}
    kappas = []
    for t in range(num_targets):
        chosen = _selection.choose_subsets(
            fits, num_tasks, target_weights=np.eye(num_targets)[t])
        for name in CHOOSERS:
            picks[name].append(chosen[name]["mask"])
            predicted[name].append(-chosen[name]["predicted"])
        kappas.append(chosen["kernel + LCB"]["kappa"])
        picks["best sampled"].append(masks[np.argmax(fit_returns[:, t])])
        picks["all variants"].append(np.ones(num_tasks))
    picks = {name: np.asarray(rows, np.float64) for name, rows in picks.items()}
    unique, index = np.unique(np.concatenate(list(picks.values())), axis=0,
                              return_inverse=True)
    index = index.reshape(len(picks), num_targets)
    measured = fresh_returns(workload, evaluate, unique,
                             key=jax.random.key(config.seed + draw),
                             replicates=replicates, base_params=run.theta)
    targets = np.arange(num_targets)
    per_replicate = {name: measured[:, index[i], targets]  # [R, T]
                     for i, name in enumerate(picks)}
    differences = {name: (per_replicate[name] - per_replicate["linear"]).mean(1)
                   for name in CHOOSERS[1:]}  # [R] paired, per replicate
    # Across the distinct subsets the choosers picked (not the baselines).
    chosen_rows = np.unique(index[:len(CHOOSERS)])
    pick_reliability = (reliability.subset_reliability(
        measured[:, chosen_rows], seed=config.seed).mean
        if chosen_rows.size > 1 else float("nan"))
    record = {
        "draw": draw, "seed": config.seed + draw, "fit_masks": masks,
        "fit_losses": losses, "unique_masks": unique, "unique_returns": measured,
        "picks": {name: {"masks": rows, "index": index[i],
                         "returns": per_replicate[name].mean(0),
                         "standard_errors": per_replicate[name].std(0, ddof=1)
                         / np.sqrt(replicates)}
                  for i, (name, rows) in enumerate(picks.items())},
        "predicted_returns": {name: np.asarray(v) for name, v in predicted.items()},
        "best_sampled_fitting_returns": fit_returns.max(0),
        "mean_return": {name: float(per_replicate[name].mean())
                        for name in picks},
        "paired_difference_standard_error": {
            name: float(d.std(ddof=1) / np.sqrt(replicates))
            for name, d in differences.items()},
        "pick_reliability": float(pick_reliability),
        "kernel_surrogate": {"gamma": fits.gamma, "ridge": fits.ridge},
        "kappa": kappas, "trust_radius": fits.trust_radius,
    }
    record["mean_return"]["random subset"] = float(fit_returns.mean())
    record["seconds"] = time.perf_counter() - start
    return record


def summarize(draws: list[dict]) -> dict:
    """Intervals over draws of each chooser's mean target return, its paired
    difference to the linear chooser and the relative gain, and the noise."""
    interval = _selection.mean_interval
    names = list(draws[0]["mean_return"])
    value = {name: np.array([d["mean_return"][name] for d in draws])
             for name in names}
    versus = {}
    for name in CHOOSERS[1:]:
        per_case = np.concatenate([d["picks"][name]["returns"]
                                   - d["picks"]["linear"]["returns"] for d in draws])
        same = np.concatenate([d["picks"][name]["index"]
                               == d["picks"]["linear"]["index"] for d in draws])
        versus[name] = {
            "difference": interval(value[name] - value["linear"]),
            "relative_gain": interval(_selection.relative_gain(
                value[name], value["linear"], lower_is_better=False)),
            "better_same_pick_worse": [int(np.sum(per_case[~same] > 0)),
                                       int(same.sum()),
                                       int(np.sum(per_case[~same] < 0))],
            "replicate_standard_error": float(np.mean(
                [d["paired_difference_standard_error"][name] for d in draws])),
        }
    standard_errors = np.concatenate([d["picks"][n]["standard_errors"]
                                      for d in draws for n in CHOOSERS])
    return {
        "mean_return": {name: interval(v) for name, v in value.items()},
        "predicted_return": {name: interval([d["predicted_returns"][name].mean()
                                             for d in draws]) for name in CHOOSERS},
        "best_sampled_fitting_return": interval(
            [d["best_sampled_fitting_returns"].mean() for d in draws]),
        "versus_linear": versus,
        "pick_standard_error": float(standard_errors.mean()),
        "pick_reliability": float(np.nanmean([d["pick_reliability"]
                                              for d in draws])),
    }


def percent(summary: dict) -> dict:
    """A :func:`_selection.mean_interval` summary in percent."""
    return {**summary, **{k: 100 * summary[k] for k in ("mean", "low", "high")}}


def print_selection(workload, draws, summary, ceiling, replicates: int) -> None:
    """Step 5's tables: choosers, per target, against linear, and the noise."""
    fmt = _selection.format_interval
    n = len(draws)
    print(f"\nSelection over {n} draws: mean over the {workload.num_targets} "
          "targets of the target return after fine-tuning on each target's pick "
          f"(re-measured: {replicates} replicates of its own); mean and 95% "
          "interval over draws")
    expected = {name: fmt(v, 2) for name, v in summary["predicted_return"].items()}
    expected["best sampled"] = (f"{fmt(summary['best_sampled_fitting_return'], 2)}"
                                " (its fitting score)")
    rows = [{"subsets": name, "target return": fmt(v, 2),
             "predicted": expected.get(name)}
            for name, v in summary["mean_return"].items()]
    print(format_table(rows, ["subsets", "target return", "predicted"]))
    print("\nPer target, means over draws (target return)")
    per_target = []
    for t, target in enumerate(workload.targets):
        row = {"target": workload.task_names[target]}
        row.update({name: float(np.mean([d["picks"][name]["returns"][t]
                                         for d in draws]))
                    for name in (*CHOOSERS, *BASELINES)})
        per_target.append(row)
    print(format_table(per_target, ["target", *CHOOSERS, *BASELINES]))
    print("\nAgainst the linear chooser: paired difference of the draws' mean "
          "target return; relative gain; (draw, target) cases where the pick is "
          "better / the same subset / worse; replicate s.e.: standard error of "
          f"one draw's paired difference from its replicates.\n"
          f"{_selection.RELATIVE_GAIN_FORMULA}.")
    rows = [{"chooser": name, "return difference": fmt(v["difference"], 2),
             "relative gain": fmt(percent(v["relative_gain"]), 2) + " %",
             "better / same / worse": " / ".join(map(str,
                                                     v["better_same_pick_worse"])),
             "replicate s.e.": f"{v['replicate_standard_error']:.2f}"}
            for name, v in summary["versus_linear"].items()]
    print(format_table(rows, ["chooser", "return difference", "relative gain",
                              "better / same / worse", "replicate s.e."]))
    print(f"\nMeasurement noise: standard error of one pick's target return "
          f"{summary['pick_standard_error']:.2f} ({replicates} replicates); "
          f"split-half reliability of the returns of the distinct picks "
          f"(Spearman-Brown, per target, mean over draws) "
          f"{summary['pick_reliability']:.3f}. Ground "
          f"truth ceiling: LOO per target {ceiling['loo_spearman_per_target']:.3f}"
          f", mean target {ceiling['loo_spearman_mean_target']:.3f}, held-out "
          f"{ceiling['heldout_spearman']:.3f}.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_quick(ap, "the 'tiny' preset, 2 replicates (1 to fit), 2 draws",
              "bench_rl_selection")
    add_workload_args(ap, "RLConfig")
    ap.add_argument("--num-fit", type=int, default=None,
                    help="subsets to fit on (default: the pipeline's)")
    ap.add_argument("--num-heldout", type=int, default=None)
    ap.add_argument("--drop", type=int, default=None,
                    help="variants each random subset drops (default: subsets of "
                         "any size but empty, full and leave-one-out)")
    ap.add_argument("--replicates", type=int, default=None,
                    help="paired replicates of the ground truth: the LOO sets, "
                         "the random subsets and every pick's re-measurement "
                         "(8; quick 2)")
    ap.add_argument("--fit-replicates", type=int, default=None,
                    help="replicates averaged into each draw's fitting scores "
                         "(at most --replicates; 4; quick 1)")
    ap.add_argument("--draws", type=int, default=None,
                    help="independent selection draws (0: attribution only; 10; "
                    "quick 2)")
    ap.add_argument("--proj-dim", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None,
                    help="store the pipeline's stages here (a rerun resumes)")
    args = fill_defaults(
        ap.parse_args(),
        {"preset": "cpu", "replicates": 8, "fit_replicates": 4, "draws": 10},
        {"preset": "tiny", "replicates": 2, "fit_replicates": 1, "draws": 2},
        name="bench_rl_selection")
    if not 1 <= args.fit_replicates <= args.replicates:
        ap.error("--fit-replicates must be between 1 and --replicates")

    start = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"preset {args.preset}")
    overrides = args.overrides
    w = rl_workload(args.preset, **overrides)
    config = pipeline.check_config(pipeline.PipelineConfig(
        workload="rl", preset=args.preset, seed=args.seed, replicates=args.replicates,
        num_subsets=args.num_fit, num_heldout=args.num_heldout, drop=args.drop,
        proj_dim=args.proj_dim, overrides=tuple(overrides.items())), w)
    run, results, trained, untrained = attribution(w, config, args.out_dir)
    payload = {
        "args": vars(args), "environment": environment(),
        "config": w.store_config(), "pipeline_config": config.to_json(),
        "seconds": run.seconds, "theta_star_returns": trained,
        "untrained_returns": untrained, "estimation": results["estimation"],
        "ceiling": results["ceiling"], "methods": results["methods"],
        "true_effects": pipeline.loo_effects(run.loo_scores), "masks": run.masks,
        "exact": np.asarray(run.exact), "estimated": run.estimated,
        "relative_gain_formula": _selection.RELATIVE_GAIN_FORMULA, "draws": [],
    }
    evaluate = jax.jit(jax.vmap(w.evaluate, in_axes=(0, None)))
    for draw in range(args.draws):
        record = one_draw(w, evaluate, config, run, draw, args.fit_replicates)
        payload["draws"].append(record)
        print(f"draw {draw}: " + ", ".join(
            f"{name} {value:.1f}" for name, value in record["mean_return"].items())
            + f" ({record['seconds']:.0f} s)", flush=True)
        write_json(args.out, payload)  # every finished draw is kept
    if args.draws:
        payload["summary"] = summarize(payload["draws"])
        print_selection(w, payload["draws"], payload["summary"], results["ceiling"],
                        config.replicates)
    payload["total_seconds"] = time.perf_counter() - start
    path = write_json(args.out, payload)
    print(f"\nwrote {path} ({payload['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
