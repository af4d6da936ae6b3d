"""The pipeline's cheap part: surrogates on the collected scores,
attribution, and every metric with its interval beside the ground truth's
ceiling (:func:`evaluate`)."""

from __future__ import annotations

import jax
import numpy as np

from tasksurrogate_jax.core import metrics, nystrom, surrogates
from tasksurrogate_jax.downstream import attribution, interactions
from tasksurrogate_jax.pipeline.collect import PromptRunScores, RunScores, record_time
from tasksurrogate_jax.pipeline.config import PipelineConfig, check_config
from tasksurrogate_jax.truth import reliability


def loo_effects(loo_scores) -> np.ndarray:
    """The true leave-one-out effects ``[K, T]``: ``F(1 − e_i) − F(1)`` averaged
    over the replicates of ``loo_scores`` ``[R, K + 1, T]`` (full set first)."""
    loo = np.asarray(loo_scores)
    return (loo[:, 1:] - loo[:, :1]).mean(0)


def fit_surrogates(fit_masks, fit_scores, *, cv_method: str = "loo",
                   cv_criterion: str = "mse", seed: int = 0) -> dict:
    """The pipeline's two surrogates of ``(masks, scores)``.

    Above ``surrogates.AUTO_EXACT_MAX_SUBSETS`` subsets the kernel surrogate is
    the Nyström one, its hyperparameters chosen on a held-out fifth
    (``cv_method="loo"``) or by k-fold on the approximate model.

    Returns:
      ``{"linear": LinearSurrogate (least squares), "kernel": KernelSurrogate
      (RBF, (gamma, ridge) cross-validated with ``cv_method`` on
      ``cv_criterion``), "search": HyperparameterSearch}``.
    """
    linear = surrogates.fit_linear_surrogate(fit_masks, fit_scores)
    # The default ridge grids (ridges=None) leave out ridges below the rounding
    # error of the kernel's eigenvalues in the dtype the fit computes in.
    key = jax.random.key(seed)
    if fit_masks.shape[0] > surrogates.AUTO_EXACT_MAX_SUBSETS:
        search = nystrom.select_nystrom_hyperparameters(
            fit_masks, fit_scores, key=key, criterion=cv_criterion,
            method="holdout" if cv_method == "loo" else "kfold")
    else:
        search = surrogates.select_kernel_hyperparameters(
            fit_masks, fit_scores, method=cv_method, criterion=cv_criterion,
            key=key)
    kernel = surrogates.fit_kernel_surrogate(
        fit_masks, fit_scores, gamma=float(search.gamma), ridge=float(search.ridge),
        solver="auto")
    return {"linear": linear, "kernel": kernel, "search": search}


def _effect_metrics(effects, true_effects, config: PipelineConfig,
                    prefix: str) -> dict:
    """Agreement of ``[K, T]`` task effects with the true ones (``prefix``
    ``"loo"`` or ``"effect"``), each Spearman with its interval."""
    pair = {"true_effects": true_effects, "predicted_effects": effects}
    spear = metrics.loo_correlation(**pair, method="spearman")
    pear = metrics.loo_correlation(**pair, method="pearson")
    interval = _interval_settings(config)
    return {f"{prefix}_spearman": float(spear.mean),
            f"{prefix}_spearman_interval": reliability.interval_over_targets(
                np.asarray(spear.per_target), **interval),
            f"{prefix}_spearman_mean_target": float(spear.mean_target),
            f"{prefix}_spearman_mean_target_interval":
                reliability.loo_spearman_interval(effects, true_effects, **interval),
            f"{prefix}_pearson": float(pear.mean),
            f"{prefix}_pearson_mean_target": float(pear.mean_target)}


def _kernel_minus_linear(fits: dict, masks, true_scores,
                         config: PipelineConfig) -> dict:
    """``{"exact" | "estimated": the kernel surrogate's pooled normalized error
    minus the linear one's on ``masks``, with a paired bootstrap interval over
    the subsets}`` (:func:`~tasksurrogate_jax.downstream.interactions.
    normalized_error_difference`; < 0: the kernel is better)."""
    return {name: interactions.normalized_error_difference(
        true_scores, np.asarray(fitted["kernel"].predict(masks)),
        np.asarray(fitted["linear"].predict(masks)), **_interval_settings(config))
        for name, fitted in fits.items()}


def _heldout_metrics(surrogate, masks, true_scores, config: PipelineConfig) -> dict:
    predicted = np.asarray(surrogate.predict(masks))
    per_target = np.asarray(metrics.spearman(true_scores, predicted))
    return {"heldout_spearman": float(np.nanmean(per_target)),
            "heldout_spearman_interval": reliability.interval_over_targets(
                per_target, **_interval_settings(config)),
            "heldout_spearman_mean_target": float(metrics.spearman(
                true_scores.mean(1), predicted.mean(1))),
            "normalized_error": float(metrics.pooled_normalized_error(
                true=true_scores, predicted=predicted)),
            "_heldout_predicted_mean": predicted.mean(1)}


def _interval_settings(config: PipelineConfig) -> dict:
    return {"level": config.confidence_level,
            "num_resamples": config.bootstrap_resamples, "seed": config.seed}


def _attainable(values: dict) -> dict:
    """``sqrt`` of each ceiling: the most a noise-free method can expect
    against one ground truth (correction for attenuation)."""
    return {k: float(np.sqrt(max(v, 0.0))) for k, v in values.items()}


def ceiling(loo_scores, heldout_scores, *, seed: int = 0) -> dict:
    """The ground truth's reliability: what any method's agreement with it is
    measured against (:mod:`tasksurrogate_jax.truth.reliability`).

    Args:
      loo_scores: ``[R, K + 1, T]`` full set then LOO sets, per replicate.
      heldout_scores: ``[R, h, T]`` held-out subsets, per replicate.
      seed: of the random splits of the replicates.

    Returns:
      ``{"loo_spearman_per_target", "loo_spearman_mean_target",
      "heldout_spearman", "num_replicates", "attainable"}``: the expected
      agreement of two independent ground truths of ``R`` replicates each, and
      under ``attainable`` the most a noise-free method can expect against one
      (``sqrt`` of it: correction for attenuation).
    """
    loo = reliability.loo_reliability(loo_scores, seed=seed)
    held = reliability.subset_reliability(heldout_scores, seed=seed)
    values = {"loo_spearman_per_target": loo.mean,
              "loo_spearman_mean_target": loo.mean_target,
              "heldout_spearman": held.mean}
    return {**values, "num_replicates": loo.num_replicates,
            "attainable": _attainable(values)}


def fixed_size_ceiling(truth_effects, *, exhaustive: bool, seed: int = 0) -> dict:
    """The ``"fixed_size"`` truth's reliability.

    Args:
      truth_effects: ``[G, K, T]`` the truth's effects per group of prompts.
      exhaustive: whether the truth scored every prompt (``G = 1``).
      seed: of the random splits of the groups.

    Returns:
      ``{"effect_spearman_per_target", "effect_spearman_mean_target",
      "heldout_spearman", "num_replicates", "deterministic", "attainable"}``.
      Exact scores are forward passes, so a truth over every prompt and the
      held-out prompts' scores are deterministic: ceiling 1. A truth over
      sampled prompts has the split-half reliability of its ``G`` groups
      (:func:`~tasksurrogate_jax.truth.reliability.subset_reliability` across tasks).
    """
    effects = np.asarray(truth_effects)
    if exhaustive:
        values = {"effect_spearman_per_target": 1.0,
                  "effect_spearman_mean_target": 1.0}
    else:
        reliable = reliability.subset_reliability(effects, seed=seed)
        values = {"effect_spearman_per_target": reliable.mean,
                  "effect_spearman_mean_target": reliable.mean_target}
    values["heldout_spearman"] = 1.0
    return {**values, "num_replicates": int(effects.shape[0]),
            "deterministic": bool(exhaustive), "attainable": _attainable(values)}


def _fit_exact_and_estimated(config, masks, exact, estimated, timed) -> dict:
    """:func:`fit_surrogates` on the exact and on the estimated scores of the
    fitting rows: ``{"exact": ..., "estimated": ...}``."""
    m = config.num_subsets
    cv = {"cv_method": config.cv_method, "cv_criterion": config.cv_criterion,
          "seed": config.seed}
    return timed("surrogates", lambda: {
        "exact": fit_surrogates(masks[:m], exact[:m], **cv),
        "estimated": fit_surrogates(masks[:m], estimated[:m], **cv)})


def _estimation_errors(true_scores, estimated, truth: str) -> dict:
    """The estimates' errors against the ground truth of the same subsets."""
    return {
        "truth": truth,
        # Median, NaNs left out: a target the model fits perfectly has F = 0
        # in float32 (and F̂ = 0 gives 0 / 0).
        "median_relative_error": float(np.nanmedian(
            metrics.relative_error(true=true_scores, predicted=estimated))),
        "mean_target_relative_error": float(np.mean(metrics.relative_error(
            true=true_scores.mean(1), predicted=estimated.mean(1)))),
        "spearman_across_subsets": float(metrics.mean_spearman(true_scores,
                                                               estimated)),
        "spearman_mean_target": float(metrics.spearman(true_scores.mean(1),
                                                       estimated.mean(1))),
    }


def _hyperparameters(fits: dict) -> dict:
    return {scores_name: {"gamma": float(f["search"].gamma),
                          "ridge": float(f["search"].ridge)}
            for scores_name, f in fits.items()}


def evaluate(config: PipelineConfig, run) -> dict:
    """Surrogates, attribution and metrics from collected scores (cheap).

    Args:
      config: the run's :class:`PipelineConfig`.
      run: what :func:`collect` returned (or your own :class:`RunScores` /
        :class:`PromptRunScores`, e.g. with more methods in ``baselines``).

    Returns:
      A dict with ``config``, ``protocol``, ``task_names``,
      ``target_description``, ``ceiling`` (:func:`ceiling` or
      :func:`fixed_size_ceiling`), ``methods`` (per method: ``effects`` ``[K]``
      on the mean target, their Spearman/Pearson with the true effects per
      target and on the mean target, and held-out Spearman and normalized error
      for surrogates; each Spearman with its bootstrap ``*_interval``; keys
      ``loo_*`` for the ``"loo"`` protocol, ``effect_*`` for
      ``"fixed_size"``), ``true_effects`` ``[K]``, ``interaction_matrix``
      ``[K, K]`` (kernel surrogate on exact scores, mean target), with the
      ``"pairs"`` protocol ``interactions`` (:func:`pair_interaction_results`),
      ``heldout`` (true and
      predicted mean-target scores), ``estimation`` (errors of the estimates
      against the ground truth), ``surrogate_hyperparameters`` and ``seconds``
      per stage; ``"loo"`` runs add ``regime`` and ``full_set_loss``,
      ``"fixed_size"`` runs ``shots``, ``truth`` and ``mean_prompt_loss``.
    """
    config = check_config(config, run.workload)
    if run.workload.protocol == "fixed_size":
        return _evaluate_fixed_size(config, run)
    seconds = dict(run.seconds)

    def timed(name, compute):
        return record_time(seconds, name, compute)

    m = config.num_subsets
    loo = np.asarray(run.loo_scores)
    true_effects = loo_effects(loo)  # [K, T]
    exact = np.asarray(run.exact).mean(0)
    estimated = np.asarray(run.estimated)
    heldout_masks = run.masks[m:]
    fits = _fit_exact_and_estimated(config, run.masks, exact, estimated, timed)

    heldout_true = exact[m:]
    methods, heldout_predicted = {}, {}
    for scores_name, fitted in fits.items():
        for kind in ("linear", "kernel"):
            surrogate = fitted[kind]
            name = f"{kind} surrogate ({scores_name})"
            effects = np.asarray(attribution.loo_scores(surrogate))
            held = _heldout_metrics(surrogate, heldout_masks, heldout_true, config)
            heldout_predicted[name] = held.pop("_heldout_predicted_mean")
            methods[name] = {"effects": effects.mean(1),
                             **_effect_metrics(effects, true_effects, config, "loo"),
                             **held}
    for name, effects in run.baselines.items():
        methods[name] = {"effects": effects.mean(1),
                         **_effect_metrics(effects, true_effects, config, "loo")}

    kernel_exact = fits["exact"]["kernel"]
    matrix = timed("attribution", lambda: np.asarray(
        attribution.interaction_matrix(kernel_exact)).mean(-1))
    if config.value_samples:
        banzhaf = timed("attribution_values", lambda: np.asarray(
            attribution.banzhaf_values(
                kernel_exact, key=jax.random.fold_in(jax.random.key(config.seed), 9),
                num_samples=config.value_samples)))
        methods["kernel surrogate (exact), Banzhaf"] = {
            "effects": banzhaf.mean(1),
            **_effect_metrics(banzhaf, true_effects, config, "loo")}
    reliable = timed("ceiling", lambda: ceiling(loo, np.asarray(run.exact)[:, m:],
                                                seed=config.seed))
    workload = run.workload
    settings = workload.estimation_record(run.theta)
    return {
        "config": config.to_json(),
        "protocol": workload.protocol,
        "registered": config.preset in workload.presets,
        "regime": config.regime,
        "task_names": list(workload.task_names),
        "target_description": workload.target_description,
        "num_targets": int(workload.num_targets),
        "full_set_loss": float(loo[:, 0].mean()),
        "ceiling": reliable,
        "true_effects": true_effects.mean(1),
        "methods": methods,
        "interaction_matrix": matrix,
        **({} if run.pairs is None else {"interactions": timed(
            "interactions", lambda: pair_interaction_results(config, run, fits))}),
        "heldout": {"true": heldout_true.mean(1), "predicted": heldout_predicted,
                    "kernel_minus_linear_error": _kernel_minus_linear(
                        fits, heldout_masks, heldout_true, config)},
        "estimation": {**_estimation_errors(exact[:m], estimated[:m],
                                            f"{config.regime} ground truth"),
                       "settings": settings,
                       "proj_dim": settings.get("proj_dim")},
        "surrogate_hyperparameters": _hyperparameters(fits),
        "baseline_settings": dict(run.baseline_settings),
        "seconds": seconds,
    }


def pair_interaction_results(config: PipelineConfig, run: RunScores,
                             fits: dict) -> dict:
    """The surrogates' pair interactions against the pair-removal truth.

    Args:
      config: the run's (concrete) :class:`PipelineConfig`.
      run: a ``"pairs"`` run's :class:`RunScores`.
      fits: ``{"exact" | "estimated": fit_surrogates(...)}``.

    Returns:
      ``{"pairs" [P, 2], "true" [P] (mean target), "ceiling" (split-half
      reliability of the mean-target interactions over pairs),
      "ceiling_per_target", "attainable" (``sqrt`` of the ceilings),
      "num_replicates", "spearman" {method: Spearman of the mean-target
      interactions}, "spearman_per_target" {method: mean per-target
      Spearman}, "comparison" (:func:`~tasksurrogate_jax.downstream.interactions.
      compare_interactions`: Pearson too, with intervals), "pair_removal_error"
      {method: pooled normalized error of the predicted pair-removal losses},
      "kernel_minus_linear_pair_removal_error" {"exact" | "estimated": the
      kernel's error minus the linear surrogate's on the same scores, with a
      paired bootstrap interval over the pairs (:func:`~tasksurrogate_jax.
      interactions.normalized_error_difference`; < 0: the kernel is better)},
      "planted_signs_correct" {method: [correct, total]} where the workload
      plants interactions}``. Methods: each kernel surrogate's second
      difference at the full set and, with ``value_samples``, the kernel's
      Banzhaf interactions (exact scores). A linear surrogate's interactions
      are 0 by construction (no correlation, no sign): it appears only in
      ``pair_removal_error``, where it is the additive baseline.
    """
    workload, num_tasks, pairs = run.workload, run.workload.num_tasks, run.pairs
    scores = np.concatenate([np.asarray(run.loo_scores),
                             np.asarray(run.pair_scores)], axis=1)
    truth = interactions.pair_interactions(scores, pairs=pairs, num_tasks=num_tasks)
    reliable = interactions.interaction_ceiling(truth, seed=config.seed)
    # A linear surrogate's interactions are 0 by construction: no correlation.
    predicted = {f"kernel surrogate ({name})": np.asarray(
        interactions.surrogate_pair_interactions(fitted["kernel"], pairs))
        for name, fitted in fits.items()}
    if config.value_samples:
        predicted["kernel surrogate (exact), Banzhaf"] = np.asarray(
            interactions.banzhaf_interactions(
                fits["exact"]["kernel"], pairs=pairs,
                key=jax.random.fold_in(jax.random.key(config.seed), 11),
                num_samples=config.value_samples))
    comparison = interactions.compare_interactions(
        truth.mean, predicted, **_interval_settings(config))
    pair_masks = interactions.pair_removal_masks(num_tasks, pairs)[1 + num_tasks:]
    pair_truth = scores.mean(0)[1 + num_tasks:]
    pair_predicted = {(kind, name): np.asarray(fitted[kind].predict(pair_masks))
                      for name, fitted in fits.items()
                      for kind in ("linear", "kernel")}
    errors = interactions.pair_removal_errors(pair_truth, {
        f"{kind} surrogate ({name})": values
        for (kind, name), values in pair_predicted.items()})
    gain = _kernel_minus_linear(fits, pair_masks, pair_truth, config)
    out = {"pairs": pairs, "true": truth.mean.mean(1),
           "ceiling": reliable.mean_target, "ceiling_per_target": reliable.mean,
           "attainable": _attainable({"mean_target": reliable.mean_target,
                                      "per_target": reliable.mean}),
           "num_replicates": reliable.num_replicates,
           "spearman": {k: v["spearman_mean_target"] for k, v in comparison.items()},
           "spearman_per_target": {k: v["spearman"] for k, v in comparison.items()},
           "comparison": comparison, "pair_removal_error": errors,
           "kernel_minus_linear_pair_removal_error": gain}
    if workload.planted_interactions:
        out["planted_signs_correct"] = {
            name: interactions.planted_signs_correct(
                values, workload.planted_interactions, pairs=pairs)
            for name, values in predicted.items()}
    return out


def _evaluate_fixed_size(config: PipelineConfig, run: PromptRunScores) -> dict:
    seconds = dict(run.seconds)

    def timed(name, compute):
        return record_time(seconds, name, compute)

    m, shots = config.num_subsets, config.shots
    exact, estimated = np.asarray(run.exact), np.asarray(run.estimated)
    true_effects = np.asarray(run.truth_effects).mean(0)  # [K, T]
    heldout_masks, heldout_true = run.masks[m:], exact[m:]
    fits = _fit_exact_and_estimated(config, run.masks, exact, estimated, timed)
    key = jax.random.key(config.seed)
    methods, heldout_predicted = {}, {}

    def read_effects():
        for scores_name, fitted in fits.items():
            for kind in ("linear", "kernel"):
                surrogate = fitted[kind]
                name = f"{kind} surrogate ({scores_name})"
                effects = np.asarray(attribution.fixed_size_effects(
                    surrogate, key=jax.random.fold_in(key, 9), size=shots,
                    num_samples=config.value_samples))
                held = _heldout_metrics(surrogate, heldout_masks, heldout_true,
                                        config)
                heldout_predicted[name] = held.pop("_heldout_predicted_mean")
                methods[name] = {
                    "effects": effects.mean(1),
                    **_effect_metrics(effects, true_effects, config, "effect"),
                    **held}

    timed("attribution_values", read_effects)
    matrix = timed("attribution", lambda: np.asarray(
        attribution.fixed_size_interactions(
            fits["exact"]["kernel"], key=jax.random.fold_in(key, 10),
            size=shots)).mean(-1))
    reliable = timed("ceiling", lambda: fixed_size_ceiling(
        run.truth_effects, exhaustive=run.truth_exhaustive, seed=config.seed))
    truth = (f"forward passes of all {run.num_truth_prompts} {shots}-prompts"
             if run.truth_exhaustive else
             f"forward passes of {run.num_truth_prompts} random {shots}-prompts in "
             f"{config.replicates} groups")
    workload = run.workload
    return {
        "config": config.to_json(),
        "protocol": "fixed_size",
        "registered": config.preset in workload.presets,
        "shots": shots,
        "truth": truth,
        "task_names": list(workload.task_names),
        "target_description": workload.target_description,
        "num_targets": int(workload.num_targets),
        "mean_prompt_loss": float(exact.mean()),
        "ceiling": reliable,
        "true_effects": true_effects.mean(1),
        "methods": methods,
        "interaction_matrix": matrix,
        "heldout": {"true": heldout_true.mean(1), "predicted": heldout_predicted},
        "estimation": _estimation_errors(exact[:m], estimated[:m], "forward passes"),
        "surrogate_hyperparameters": _hyperparameters(fits),
        "seconds": seconds,
    }


