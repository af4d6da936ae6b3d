"""The pipeline's expensive stages, stored under the run's folder and reused
by a rerun: ``θ*``, the ground truths, the estimates and the baselines
(:func:`collect`)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import numpy as np

from tasksurrogate_jax import __version__
from tasksurrogate_jax.core.subsets import (
    bernoulli_masks,
    fixed_size_masks,
    leave_one_out_masks,
    size_range_masks,
)
from tasksurrogate_jax.downstream import attribution, interactions
from tasksurrogate_jax.pipeline.config import (
    BASELINE_SETTINGS,
    PipelineConfig,
    check_config,
    configured_workload,
    make_workload,
    run_protocol,
)
from tasksurrogate_jax.truth.store import ChunkStore, StoreMismatchError, config_hash
from tasksurrogate_jax.workloads.base import (
    FixedSizeWorkload,
    LeaveOneOutWorkload,
    Workload,
)


def fit_truth_key(keys: dict):
    """The training key of the ``subsets`` stage's ground truth:
    ``fold_in(keys["subsets"], 3)``, independent of the ``loo`` stage's
    ``keys["base"]`` (which also trains ``θ*``)."""
    return jax.random.fold_in(keys["subsets"], 3)


def stage_keys(seed: int) -> dict:
    """The PRNG keys of a run's stages: ``{"base", "subsets", "estimated",
    "baselines"}`` (the ``"fixed_size"`` protocol draws its prompts from
    ``"subsets"`` and a sampled truth from ``fold_in(subsets, 1)``)."""
    names = ("base", "subsets", "estimated", "baselines")
    return dict(zip(names, jax.random.split(jax.random.key(seed), 4), strict=True))


# The configuration fields each stage's result depends on. A run folder holds
# one workload identity, the workload's fingerprint included (its data, target
# and programs: refused otherwise, naming what differs); within it, each stage
# is stored under a hash of its own fields, so changing, say, the influence
# damping recomputes the baselines only, and earlier settings stay reusable.
IDENTITY_FIELDS = ("workload", "preset", "seed", "overrides", "fingerprint",
                   "version")
STAGE_FIELDS = {
    "base": (),
    "loo": ("regime", "replicates", "chunk_size"),
    "subsets": ("regime", "replicates", "num_subsets", "num_heldout", "design",
                "drop", "keep", "chunk_size"),
    "estimated": ("num_subsets", "num_heldout", "design", "drop", "keep",
                  "estimation_settings"),
    "baselines": ("baselines", "influence_damping", "influence_hessian",
                  "trak_proj_dim"),
}
FIXED_SIZE_STAGE_FIELDS = {
    "prompts": ("shots", "num_subsets", "num_heldout"),
    "truth": ("shots", "truth_prompts", "replicates"),
    "estimated": ("shots", "num_subsets", "num_heldout"),
}
PAIRS_STAGE_FIELDS = {**STAGE_FIELDS,
                      "pairs": ("regime", "replicates", "chunk_size", "max_pairs")}
PROTOCOL_STAGES = {"loo": STAGE_FIELDS, "fixed_size": FIXED_SIZE_STAGE_FIELDS,
                   "pairs": PAIRS_STAGE_FIELDS}


class _Stages:
    """Stage outputs stored under ``out/stages`` (one npz per finished stage)."""

    def __init__(self, out_dir: Path | None, config: dict, log: Callable,
                 stage_fields: dict):
        self.out_dir, self.config, self.log = out_dir, config, log
        self.stage_fields = stage_fields
        identity = {k: config[k] for k in IDENTITY_FIELDS}
        if out_dir is not None:  # refuses a folder of another workload identity
            try:
                ChunkStore(out_dir / "stages", identity)
            except StoreMismatchError as err:
                raise StoreMismatchError(
                    f"out_dir {str(out_dir)!r} holds a run of another workload, "
                    f"data or program: {err}") from err
        self.seconds: dict[str, float] = {}

    def fields(self, name: str) -> dict:
        """The configuration fields stage ``name`` depends on."""
        return {k: self.config[k] for k in IDENTITY_FIELDS + self.stage_fields[name]}

    def folder(self, parent: str, name: str) -> Path | None:
        """``out/<parent>/<name>-<hash of the stage's fields>``, or ``None``."""
        if self.out_dir is None:
            return None
        return self.out_dir / parent / f"{name}-{config_hash(self.fields(name))[:12]}"

    def run(self, name: str, compute: Callable[[], dict]) -> dict:
        folder = self.folder("stages", name)
        store = None if folder is None else ChunkStore(folder, self.fields(name))
        if store is not None and store.has_chunk(0):
            arrays = store.load_chunk(0)
            self.seconds[name] = float(arrays.pop("_seconds"))
            self.log(f"[{name}] reused from {store.chunk_path(0)}")
            return arrays
        self.log(f"[{name}] ...")
        start = time.perf_counter()
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        self.seconds[name] = time.perf_counter() - start
        self.log(f"[{name}] done in {self.seconds[name]:.1f} s")
        if store is not None:
            store.save_chunk(0, {**arrays, "_seconds": self.seconds[name]})
        return arrays


def record_time(seconds: dict, name: str, compute: Callable):
    """``compute()``, its wall time recorded in ``seconds[name]``."""
    start = time.perf_counter()
    out = compute()
    seconds[name] = time.perf_counter() - start
    return out


def _params_arrays(params) -> dict:
    return {f"leaf_{i:04d}": leaf for i, leaf in enumerate(jax.tree.leaves(params))}


def _params_from_arrays(arrays: dict, like):
    leaves = [arrays[f"leaf_{i:04d}"] for i in range(len(jax.tree.leaves(like)))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


class RunScores(NamedTuple):
    """Everything a ``"loo"`` run computes before the surrogates (see
    :func:`collect`).

    Attributes:
      workload: the workload object.
      theta: ``θ*``.
      loo_scores: ``[R, K + 1, T]`` ground truth of the full set then each LOO
        set, per replicate.
      masks: ``[num_subsets + num_heldout, K]`` random subsets (fitting rows
        first).
      exact: ``[R, num_subsets + num_heldout, T]`` their ground truth, per
        replicate.
      estimated: ``[num_subsets + num_heldout, T]`` their first-order estimates.
      baselines: ``{name: [K, T]}`` baseline LOO-effect predictions.
      seconds: ``{stage: seconds}`` (stored stages report their first run).
      baseline_settings: ``{name: settings}``, what each baseline used
        (damping, its rule, projection dimension, conjugate-gradient
        residual: ``baselines.InfluenceInfo`` / ``TrakInfo`` as dicts).
      pairs: ``[P, 2]`` the pairs of the ``"pairs"`` protocol, else ``None``.
      pair_scores: ``[R, P, T]`` the ground truth of the full set without
        each pair, per replicate (``"pairs"`` protocol), else ``None``.
    """

    workload: Any
    theta: Any
    loo_scores: np.ndarray
    masks: np.ndarray
    exact: np.ndarray
    estimated: np.ndarray
    baselines: dict
    seconds: dict
    baseline_settings: dict = MappingProxyType({})
    pairs: np.ndarray | None = None
    pair_scores: np.ndarray | None = None


class PromptRunScores(NamedTuple):
    """Everything a ``"fixed_size"`` run computes before the surrogates.

    Attributes:
      workload: the workload object.
      masks: ``[num_subsets + num_heldout, K]`` random ``shots``-prompts
        (fitting rows first).
      exact: ``[num_subsets + num_heldout, T]`` their exact scores.
      estimated: ``[num_subsets + num_heldout, T]`` their first-order estimates.
      truth_effects: ``[G, K, T]`` the true fixed-size effects (one group when
        every prompt was scored, else ``replicates`` groups of random prompts);
        the truth is their mean.
      num_truth_prompts: prompts the truth scored.
      truth_exhaustive: whether they were every ``shots``-prompt.
      seconds: ``{stage: seconds}`` (stored stages report their first run).
    """

    workload: Any
    masks: np.ndarray
    exact: np.ndarray
    estimated: np.ndarray
    truth_effects: np.ndarray
    num_truth_prompts: int
    truth_exhaustive: bool
    seconds: dict


def loo_protocol_masks(key, config: PipelineConfig, num_tasks: int) -> np.ndarray:
    """The ``"loo"`` protocol's random subsets ``[num_subsets + num_heldout, K]``,
    distinct, of the config's ``design`` (see :class:`PipelineConfig`)."""
    count = config.num_subsets + config.num_heldout
    if config.design == "uniform":
        masks = size_range_masks(key, count, num_tasks, min_size=1,
                                 max_size=num_tasks - 2, unique=True)
    elif config.design == "bernoulli":
        # Distinct rows hold at most one empty set: draw one more, drop it.
        masks = np.asarray(bernoulli_masks(key, count + 1, num_tasks, p=config.keep,
                                           unique=True))
        nonempty = masks[masks.sum(1) > 0]
        masks = nonempty[:count]
    else:
        masks = fixed_size_masks(key, count, num_tasks,
                                 subset_size=num_tasks - config.drop, unique=True)
    return np.asarray(masks)


def all_fixed_size_masks(num_tasks: int, size: int) -> np.ndarray:
    """Every subset of ``size`` of ``num_tasks`` tasks, ``[C(K, size), K]``, in
    lexicographic order of their tasks."""
    rows = np.array(list(itertools.combinations(range(num_tasks), size)), np.int64)
    masks = np.zeros((len(rows), num_tasks), np.float32)
    np.put_along_axis(masks, rows, 1.0, axis=1)
    return masks


def fixed_size_truth(workload, *, shots: int, max_prompts: int, groups: int,
                     key) -> dict:
    """The ``"fixed_size"`` protocol's ground truth from exact scores.

    Returns:
      ``{"effects": [G, K, T], "num_prompts", "exhaustive"}``: over every
      ``shots``-prompt when there are at most ``max_prompts`` (``G = 1``), else
      over ``max_prompts`` distinct random ones split into ``groups`` equal
      groups (the remainder dropped).
    """
    num_tasks = workload.num_tasks
    exhaustive = math.comb(num_tasks, shots) <= max_prompts
    if exhaustive:
        masks, groups = all_fixed_size_masks(num_tasks, shots), 1
    else:
        masks = np.asarray(fixed_size_masks(key, max_prompts, num_tasks,
                                            subset_size=shots, unique=True))
    scores = np.asarray(workload.exact_scores(masks))
    size = masks.shape[0] // groups
    effects = np.stack([attribution.fixed_size_effects_from_scores(
        masks[g * size:(g + 1) * size], scores[g * size:(g + 1) * size])
        for g in range(groups)])
    return {"effects": effects, "num_prompts": groups * size,
            "exhaustive": exhaustive}


def collect(config: PipelineConfig, *, workload: Workload | None = None,
            out_dir=None, log: Callable = print, progress: bool = True):
    """Runs the expensive stages (stored under ``out_dir``, reused on rerun).

    Args:
      config: the :class:`PipelineConfig`.
      workload: any workload that implements a contract of
        :mod:`tasksurrogate_jax.workloads.base` (your own, or a bundled one
        already built); ``None`` builds the bundled ``config.workload``
        (:func:`make_workload`).
      out_dir: folder for stored stages and retraining chunks (resume); ``None``
        keeps nothing on disk. A folder of another configuration is refused.
      log: called with one line per stage.
      progress: progress bars on the retraining stages.

    Returns:
      :class:`RunScores` (``"loo"`` protocol) or :class:`PromptRunScores`
      (``"fixed_size"``).
    """
    out_dir = None if out_dir is None else Path(out_dir)
    seconds: dict[str, float] = {}
    if workload is None:
        workload = record_time(seconds, "workload", lambda: make_workload(config))
    config = check_config(config, workload)
    workload = configured_workload(config, workload)
    # Besides the config: what the workload computes, its estimation settings
    # with their defaults filled in, and the library's version.
    identity = {**config.to_json(), "fingerprint": workload.fingerprint(),
                "version": __version__,
                "estimation_settings": None if workload.estimation is None
                else dataclasses.asdict(workload.estimation)}
    protocol = run_protocol(config, workload)
    stages = _Stages(out_dir, identity, log, PROTOCOL_STAGES[protocol])
    stages.seconds.update(seconds)
    keys = stage_keys(config.seed)
    if protocol == "fixed_size":
        return _collect_fixed_size(config, workload, stages, keys)
    return _collect_loo(config, workload, stages, keys, progress,
                        with_pairs=protocol == "pairs")


def _collect_loo(config: PipelineConfig, workload: LeaveOneOutWorkload,
                 stages: _Stages, keys: dict, progress: bool, *,
                 with_pairs: bool) -> RunScores:
    num_tasks = workload.num_tasks

    def ground_truth(name, masks, key=keys["base"]):
        return {"scores": workload.replicate_scores(
            masks, key=key, regime=config.regime,
            replicates=config.replicates, base_params=theta,
            store_dir=stages.folder("retraining", name),
            chunk_size=config.chunk_size, progress=progress)}

    # Drawn before any training.
    masks = loo_protocol_masks(keys["subsets"], config, num_tasks)
    like = workload.params_like(key=keys["base"])  # structure only
    theta = _params_from_arrays(stages.run(
        "base", lambda: _params_arrays(workload.base_params(key=keys["base"]))), like)
    loo_masks = leave_one_out_masks(num_tasks)
    loo = stages.run("loo", lambda: ground_truth("loo", loo_masks))["scores"]
    exact = stages.run("subsets", lambda: ground_truth(
        "subsets", masks, key=fit_truth_key(keys)))["scores"]
    estimated = stages.run("estimated", lambda: {
        "scores": workload.estimated_scores(masks, key=keys["estimated"],
                                            base_params=theta)})["scores"]

    def compute_baselines():
        if not config.baselines:
            return {}
        out, used = workload.baseline_scores(
            theta, names=config.baselines, key=keys["baselines"],
            settings=config.baseline_settings())
        # Plain arrays only in a stage: the settings as a JSON string.
        return {**out, BASELINE_SETTINGS: np.asarray(json.dumps(used))}

    baseline_effects = stages.run("baselines", compute_baselines)
    used = json.loads(str(baseline_effects.pop(BASELINE_SETTINGS, "{}")))
    pairs = pair_scores = None
    if with_pairs:
        pairs = truth_pairs(keys["subsets"], num_tasks, config.max_pairs)
        rows = np.asarray(interactions.pair_removal_masks(num_tasks, pairs))
        pair_scores = stages.run("pairs", lambda: ground_truth(
            "pairs", rows[1 + num_tasks:]))["scores"]
    return RunScores(workload, theta, loo, masks, exact, estimated, baseline_effects,
                     stages.seconds, used, pairs, pair_scores)


def truth_pairs(key, num_tasks: int, max_pairs: int) -> np.ndarray:
    """The ``"pairs"`` protocol's pairs ``[P, 2]``: all of them when there are at
    most ``max_pairs``, else ``max_pairs`` drawn with ``fold_in(key, 2)``."""
    if num_tasks * (num_tasks - 1) // 2 <= max_pairs:
        return interactions.all_pairs(num_tasks)
    return interactions.sample_pairs(jax.random.fold_in(key, 2), num_tasks,
                                     max_pairs)


def _collect_fixed_size(config: PipelineConfig, workload: FixedSizeWorkload,
                        stages: _Stages, keys: dict) -> PromptRunScores:
    masks = np.asarray(workload.sample_prompts(
        keys["subsets"], config.num_subsets + config.num_heldout, shots=config.shots))
    exact = stages.run("prompts", lambda: {
        "scores": workload.exact_scores(masks)})["scores"]
    truth = stages.run("truth", lambda: fixed_size_truth(
        workload, shots=config.shots, max_prompts=config.truth_prompts,
        groups=config.replicates, key=jax.random.fold_in(keys["subsets"], 1)))
    estimated = stages.run("estimated", lambda: {
        "scores": workload.estimated_scores(masks, key=keys["estimated"])})["scores"]
    return PromptRunScores(workload, masks, exact, estimated, truth["effects"],
                           int(truth["num_prompts"]), bool(truth["exhaustive"]),
                           stages.seconds)


