"""One end-to-end attribution run on a workload, resumable from its folder.

The pipeline takes any workload that implements one of the contracts of
:mod:`tasksurrogate_jax.workloads.base` and runs the protocol it names
(``workload.protocol``, a key of :data:`PROTOCOL_STAGES`); it knows no
workload by name (the bundled ones are built by
:mod:`tasksurrogate_jax.workloads.registry`).

``"loo"`` (:class:`~tasksurrogate_jax.workloads.base.LeaveOneOutWorkload`:
digits, modular, rl, your own supervised model): the ground truth is
leave-one-out from the full set. Stages (each timed; the expensive ones stored
as they finish and reused by a rerun with the same configuration):

1. ``base``: ``θ*``, the model trained on all tasks.
2. ``loo``: the ground truth of the full set and of every leave-one-out set,
   ``[R, K + 1, T]``: ``R`` paired replicates in the configured regime
   (``"finetune"`` from ``θ*`` or ``"scratch"``); the effects are
   ``F(1 − e_i) − F(1)`` averaged over replicates.
3. ``subsets``: ``num_subsets + num_heldout`` distinct random subsets of the
   config's ``design`` (``"fixed"``: each drops ``drop`` tasks; ``"uniform"``,
   the RL workload's default: uniform over the subsets neither empty, full nor
   leave-one-out; ``"bernoulli"``: each task kept with probability ``keep``);
   their ground truth ``[R, m, T]`` in the same regime, from training streams
   independent of the ``loo`` stage's (the surrogates never see the LOO
   truth's noise, so they are bounded by its ceiling like any method).
4. ``estimated``: first-order estimates of the same subsets' scores from
   ``θ*`` (no retraining).
5. ``baselines``: influence functions, TracIn and TRAK at ``θ*`` (supervised
   workloads).
6. surrogates (linear, kernel with cross-validated ``(γ, λ)``) on the exact
   and on the estimated scores of the fitting subsets; attribution; metrics,
   each with a bootstrap interval, beside the ground truth's own ``ceiling``
   (its split-half reliability across the replicates, Spearman-Brown
   corrected: :mod:`tasksurrogate_jax.truth.reliability`).

``"fixed_size"`` (icl): every subset holds exactly ``shots`` tasks (a prompt of
``shots`` demonstrations), so there is no full set to leave one out of. Stages:

1. ``prompts``: ``num_subsets + num_heldout`` distinct random ``shots``-prompts
   and their exact scores (forward passes: deterministic).
2. ``truth``: the effect of including each demonstration in a prompt,
   :func:`~tasksurrogate_jax.downstream.attribution.fixed_size_effects_from_scores`: the
   mean loss of the prompts without it minus the mean loss of those with it
   (scaled by ``(K − k)/(K − k + 1)``), over every ``shots``-prompt when there
   are at most ``truth_prompts`` of them: exact and deterministic, ceiling 1.
   Otherwise over ``truth_prompts`` random prompts in ``replicates`` equal
   groups: the truth is the mean of the groups' effects and the ceiling their
   split-half reliability.
3. ``estimated``: first-order estimates of the prompts' scores.
4. surrogates as above; each method's effects are read with
   :func:`~tasksurrogate_jax.downstream.attribution.fixed_size_effects` (the same
   quantity, from ``value_samples`` random contexts of the surrogate) and the
   interactions with ``fixed_size_interactions``; metrics with intervals
   beside the ceiling (held-out prompts: 1, their scores being exact).

All randomness derives from ``jax.random.key(config.seed)``
(:func:`stage_keys`). The results are a plain dict (see :func:`run_pipeline`),
written by :mod:`report`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasksurrogate_jax.pipeline.collect import (
    FIXED_SIZE_STAGE_FIELDS,
    PAIRS_STAGE_FIELDS,
    PROTOCOL_STAGES,
    STAGE_FIELDS,
    PromptRunScores,
    RunScores,
    all_fixed_size_masks,
    collect,
    fit_truth_key,
    fixed_size_truth,
    loo_protocol_masks,
    stage_keys,
    truth_pairs,
)
from tasksurrogate_jax.pipeline.compilation import enable_compilation_cache
from tasksurrogate_jax.pipeline.config import (
    BASELINES,
    CV_CRITERIA,
    CV_METHODS,
    DESIGNS,
    ESTIMATION_FIELDS,
    PROTOCOLS,
    PipelineConfig,
    check_applies,
    check_config,
    configured_workload,
    make_workload,
    run_protocol,
)
from tasksurrogate_jax.pipeline.evaluate import (
    ceiling,
    evaluate,
    fit_surrogates,
    fixed_size_ceiling,
    loo_effects,
    pair_interaction_results,
)
from tasksurrogate_jax.pipeline.report import write_json
from tasksurrogate_jax.workloads.base import Workload


def run_pipeline(config: PipelineConfig, *, workload: Workload | None = None,
                 out_dir=None,
                 log: Callable = print, progress: bool = True) -> dict:
    """:func:`collect` then :func:`evaluate`: the results dict of a whole run.

    Pass ``workload`` to run on your own workload (any implementation of a
    contract of :mod:`tasksurrogate_jax.workloads.base`; ``config.workload``
    then only names it); ``None`` builds the bundled ``config.workload``.
    Compiled programs are kept on disk for the next run
    (:func:`~tasksurrogate_jax.pipeline.compilation.enable_compilation_cache`; opt out
    with ``TASKSURROGATE_COMPILATION_CACHE=0``). With ``out_dir``, the results
    are also written to ``out_dir/results.json``
    (:func:`~tasksurrogate_jax.pipeline.report.write_json`; the plots are
    :func:`~tasksurrogate_jax.pipeline.report.write_report`'s).
    """
    enable_compilation_cache()
    results = evaluate(config, collect(config, workload=workload, out_dir=out_dir,
                                       log=log, progress=progress))
    if out_dir is not None:
        write_json(results, Path(out_dir) / "results.json")
    return results


__all__ = [
    "BASELINES", "CV_CRITERIA", "CV_METHODS", "DESIGNS", "ESTIMATION_FIELDS",
    "FIXED_SIZE_STAGE_FIELDS", "PAIRS_STAGE_FIELDS", "PROTOCOLS", "PROTOCOL_STAGES",
    "STAGE_FIELDS", "PipelineConfig", "PromptRunScores", "RunScores",
    "all_fixed_size_masks", "ceiling", "check_applies", "check_config", "collect",
    "configured_workload", "evaluate", "fit_surrogates", "fit_truth_key",
    "fixed_size_ceiling", "fixed_size_truth", "loo_effects", "loo_protocol_masks",
    "make_workload", "pair_interaction_results", "run_pipeline", "run_protocol",
    "stage_keys", "truth_pairs",
]
