"""Why projected linearized fine-tuning misses Adam fine-tuning (modular `cpu`).

The linearized program runs the workload's optimizer on the projected update
``w`` (``θ = θ* + P w``). Adam normalises per coordinate, and the coordinates of
``w`` are random mixtures of θ's, so the projection changes the program. On
the same θ* and random subsets (each drops 3 of 25 tasks), against real
fine-tuning (replicate 0; replicate 1 gives the noise ceiling):

- ``full space``: the linearized model with Adam on θ itself
  (``EstimationSettings(proj_dim=None)``): is the linearization the limit?
- ``projected d``: the library's default program at each ``--proj-dims``;
- ``preconditioned d``: Adam replaced by its fixed-second-moment version,
  momentum descent (Adam's β1 and learning rate) on ``w`` with features
  ``J D^{1/2} P``, ``D = 1 / sqrt(v)``, ``v`` the second moment of mini-batch
  gradients at θ* (mean² + variance / batch size, from per-example
  gradients): Adam's preconditioner moved into the features.

Each row: mean relative error of the mean-target score (plain and in the
difference form), Spearman across subsets of the mean-target score and per
target (mean). Not part of the library; a study.

    python benchmarks/estimation_adam_study.py --num-subsets 64
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import REPO_ROOT, environment, format_table, write_json

from tasksurrogate_jax import estimation, metrics, retraining
from tasksurrogate_jax.estimation import EstimationSettings
from tasksurrogate_jax.linearize import per_example_grads
from tasksurrogate_jax.projection import make_projection, num_parameters
from tasksurrogate_jax.subsets import fixed_size_masks
from tasksurrogate_jax.workloads.modular import modular_workload


def row(label, estimated, truth, seconds=None) -> dict:
    """Errors of ``estimated`` ``[1 + m, T]`` (row 0: all tasks)."""
    anchored = estimated - estimated[0] + truth[0]
    est, true = estimated[1:].mean(1), truth[1:].mean(1)
    relative = np.abs(est - true) / np.abs(true)
    relative_anchored = np.abs(anchored[1:].mean(1) - true) / np.abs(true)
    return {"estimator": label, "seconds": seconds,
            "relative_error": float(relative.mean()),
            "relative_error_difference_form": float(relative_anchored.mean()),
            "spearman_mean_target": float(metrics.spearman(true, est)),
            "spearman_per_target": float(metrics.mean_spearman(truth[1:],
                                                               estimated[1:]))}


def preconditioned(workload, theta, masks, key, proj_dim) -> np.ndarray:
    """Fixed-second-moment Adam as momentum descent on ``J D^{1/2} P``."""
    spec = workload.finetune_spec
    config = workload.config

    def example_loss(p, x, y):
        return workload.loss_fn(workload.apply_fn(p, x[None]), y[None])[0]

    grads = per_example_grads(example_loss, theta, workload.data.inputs,
                              workload.data.labels, batch_size=256)
    second_moment = jax.tree.map(
        lambda g: g.mean(0) ** 2 + g.var(0) / spec.batch_size, grads)
    scale = jax.tree.map(lambda v: (jnp.sqrt(v) + 1e-8) ** -0.5, second_moment)

    def scaled_apply(u, inputs):
        return workload.apply_fn(
            jax.tree.map(lambda t, s, x: t + s * x, theta, scale, u), inputs)

    zero = jax.tree.map(jnp.zeros_like, theta)
    projection = make_projection(jax.random.fold_in(key, 1), proj_dim,
                                 num_params=num_parameters(theta))
    data, target = workload.data, workload.target
    both = estimation.linearized_examples(
        scaled_apply, zero, jnp.concatenate([data.inputs, target.inputs]),
        jnp.concatenate([data.labels, target.labels]), projection=projection,
        output_mode="logits", batch_size=256)
    stacked = jnp.concatenate([both.outputs[..., None], both.features], axis=-1)
    n = data.num_examples
    momentum = optax.chain(optax.ema(config.b1, debias=True),
                           optax.scale(-workload._finetune_learning_rate()))
    linear_spec = dataclasses.replace(spec, apply_fn=estimation.linear_model,
                                      optimizer=momentum, accuracy_fn=None)
    result = retraining.retrain(
        masks, data=dataclasses.replace(data, inputs=stacked[:n]),
        target=dataclasses.replace(target, inputs=stacked[n:]), spec=linear_spec,
        key=key, init_params=jnp.zeros(proj_dim, stacked.dtype), replicates=1,
        chunk_size=64, progress=False)
    return np.asarray(result.losses[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-subsets", type=int, default=64)
    ap.add_argument("--proj-dims", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO_ROOT /
                                         "results/estimation_adam_study.json"))
    args = ap.parse_args()
    workload = modular_workload("cpu")
    key = jax.random.key(args.seed)
    subsets = fixed_size_masks(jax.random.fold_in(key, 7), args.num_subsets,
                               workload.num_tasks, subset_size=workload.num_tasks - 3)
    masks = jnp.concatenate([jnp.ones((1, workload.num_tasks), subsets.dtype),
                             subsets])
    theta = workload.base_params(key=key)
    replicates = np.asarray(workload.replicate_scores(
        masks, key=key, regime="finetune", replicates=2, base_params=theta,
        progress=False))
    truth = replicates[0]  # the batch order every estimator below also draws
    rows = [row("replicate 1 (the ceiling)", replicates[1], truth)]

    def timed_row(label, compute):
        start = time.perf_counter()
        values = np.asarray(compute())
        rows.append(row(label, values, truth, time.perf_counter() - start))
        print(f"  {label}: {rows[-1]['seconds']:.0f} s", flush=True)

    timed_row("full space", lambda: workload.estimated_scores(
        masks, key=key, base_params=theta, settings=EstimationSettings(
            proj_dim=None)))
    for d in args.proj_dims:
        timed_row(f"projected d={d}", lambda d=d: workload.estimated_scores(
            masks, key=key, base_params=theta,
            settings=EstimationSettings(proj_dim=d)))
        timed_row(f"preconditioned d={d}",
                  lambda d=d: preconditioned(workload, theta, masks, key, d))
    print()
    print(format_table(rows, ["estimator", "seconds", "relative_error",
                              "relative_error_difference_form",
                              "spearman_mean_target", "spearman_per_target"]))
    path = write_json(args.out, {"benchmark": "estimation_adam_study",
                                 "environment": environment(), "config": vars(args),
                                 "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
