"""Factored (LoGra) projected Jacobians against the dense projection, 1.1M params.

Model: ``DigitsMLP`` 64-1024-1024-10 (GELU; 1,085,450 parameters) on the real
digits data (``DigitsDataConfig(hidden=1024, depth=2)``: 1,257 training and
540 target images), float32, ``θ*`` from ``--train-steps`` full-batch Adam
steps. The one-time features of linearized fine-tuning are computed for every
training and target example (``n = 1,797``, ``C = 10`` outputs), as
``features.linearize_data`` does:

- ``dense``: ``features.linearized_examples`` with a Rademacher
  ``projection.make_projection`` (``d = 512``, the library's default, and
  without ``--quick`` also ``d`` equal to the first factored ``k``'s d),
  chunks of ``--dense-batch-size`` (16) examples. Its cost is per example, so
  it is timed on ``--dense-examples`` examples (8 with ``--quick``, else 64)
  and scaled linearly to n (column ``scaled``): all n take minutes here.
- ``factored``: :func:`tasksurrogate_jax.estimate.factored.factored_jacobians` with
  every side projected to ``k`` (sides of width <= k kept whole) for each
  ``--ks``; ``d = Σ_layers d_in d_out``. Timed on all n (chunks of 256).
- ``factored-alloc``: the same with ``factored.allocate_dims`` at d = 512 and
  at each uniform row's d (dimensions per layer and side chosen to minimise
  the predicted kernel error, fitted on ``--alloc-sample`` other training
  examples).

Both compiled ahead of time (compile seconds apart), then run (factored: best
of ``--repeats``). Accuracy: on ``--sample`` training examples (8 with
``--quick``, else 48), the relative Frobenius error
``||Φ Φ^T − J J^T||_F / ||J J^T||_F`` of the ``[S C, S C]`` kernel against
the exact ``J J^T`` (``jax.jacrev`` on the raveled parameters), mean and sd
over ``--seeds`` projection keys (dense: ``--dense-seeds``), beside the
predicted error of the Gaussian error model (``predicted_kernel_error``), and
the error on the cross-example entries only (``cross``: pairs of different
examples, through which one example's training moves another's outputs).
Also checked: the exact kernel from the factors (``exact_kernels``) against
jacrev's, and each layer's share ``||K_l|| / ||K||``.

``--estimate`` adds the end-to-end check (:func:`estimate_section`):
linearized fine-tuning of the ``digits`` workload's fine-tuning program on
factored features (``allocate_dims`` at ``--estimate-dims``) against real
fine-tuning on the all-tasks, LOO and random drop-4 subsets: seconds, mean
relative error of the mean-target score, Spearman across subsets and of the
LOO effects (``--estimate-full`` adds the full-space linearization).

Writes ``results/bench_factored.json`` (``bench_factored_quick.json`` with
``--quick``), prints a table.

    python benchmarks/bench_factored.py --quick     # under a minute on 2 cores
    python benchmarks/bench_factored.py
    python benchmarks/bench_factored.py --estimate --estimate-full
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import REPO_ROOT, environment, format_table, write_json
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax.estimate import factored
from tasksurrogate_jax.estimate.features import linearized_examples
from tasksurrogate_jax.estimate.projection import make_projection, num_parameters
from tasksurrogate_jax.losses import softmax_cross_entropy
from tasksurrogate_jax.workloads.digits_data import (
    DigitsDataConfig,
    DigitsMLP,
    digits_data,
)
from tasksurrogate_jax.workloads.supervised import nnx_model_functions


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sample, fewer ks and seeds (under a minute)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--ks", type=int, nargs="+", default=None,
                        help="factored side dimensions")
    parser.add_argument("--dense-dims", type=int, nargs="+", default=None,
                        help="dense projection dimensions (default 512 and the "
                             "first k's d)")
    parser.add_argument("--dense-examples", type=int, default=None,
                        help="examples the dense projection is timed on")
    parser.add_argument("--sample", type=int, default=None,
                        help="training examples of the kernel check")
    parser.add_argument("--alloc-sample", type=int, default=None,
                        help="other training examples allocate_dims is fitted on")
    parser.add_argument("--seeds", type=int, default=None,
                        help="projection keys of the factored kernel check")
    parser.add_argument("--dense-seeds", type=int, default=None,
                        help="projection keys of the dense kernel check")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256,
                        help="examples per chunk, factored")
    parser.add_argument("--dense-batch-size", type=int, default=16,
                        help="examples per chunk, dense")
    parser.add_argument("--estimate", action="store_true",
                        help="also run linearized fine-tuning on factored features "
                             "against real fine-tuning (digits workload; minutes)")
    parser.add_argument("--estimate-full", action="store_true",
                        help="with --estimate: also the full-space linearized "
                             "fine-tuning (no projection error)")
    parser.add_argument("--estimate-dims", type=int, nargs="+",
                        default=[672, 2368, 8832],
                        help="with --estimate: allocated feature dimensions")
    parser.add_argument("--estimate-subsets", type=int, default=21,
                        help="with --estimate: random drop-4 subsets besides "
                             "all-tasks and the K LOO sets")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"train_steps": 20 if quick else 200,
                "ks": [16, 64] if quick else [16, 32, 64, 128],
                "sample": 8 if quick else 48,
                "alloc_sample": 32 if quick else 64,
                "seeds": 2 if quick else 3,
                "dense_seeds": 1 if quick else 2,
                "dense_examples": 8 if quick else 64,
                "repeats": 1 if quick else 2}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = str(REPO_ROOT / "results" / (
            "bench_factored_quick.json" if quick else "bench_factored.json"))
    return args


def compile_and_time(fn, args, repeats):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return result, compile_s, min(times), compiled


def train_theta(apply_fn, params, inputs, labels, steps):
    optimizer = optax.adam(1e-3)

    def loss(p):
        return softmax_cross_entropy(apply_fn(p, inputs), labels).mean()

    @jax.jit
    def run(p):
        def step(carry, _):
            p, state = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, state = optimizer.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), value

        (p, _), values = jax.lax.scan(step, (p, optimizer.init(p)), None,
                                      length=steps)
        return p, values

    return run(params)


def exact_kernel(apply_fn, params, inputs, chunk=8):
    """``J J^T`` ``[S C, S C]`` from jacrev rows, ``chunk`` examples at a time."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def rows(x):
        return jax.vmap(lambda xi: jax.jacrev(
            lambda f: apply_fn(unravel(f), xi[None])[0])(flat))(x)

    jac = jnp.concatenate([rows(inputs[i:i + chunk]).reshape(-1, flat.size)
                           for i in range(0, inputs.shape[0], chunk)])
    return jac @ jac.T


def kernel_errors(features, kernel, num_outputs):
    phi = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
    approx = phi @ phi.T
    diff = approx - kernel
    examples = jnp.arange(kernel.shape[0]) // num_outputs
    cross = examples[:, None] != examples[None, :]
    rel = jnp.linalg.norm(diff) / jnp.linalg.norm(kernel)
    rel_cross = (jnp.linalg.norm(jnp.where(cross, diff, 0))
                 / jnp.linalg.norm(jnp.where(cross, kernel, 0)))
    return float(rel), float(rel_cross)


def mean_sd(values):
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def estimate_section(args):
    """Linearized fine-tuning on factored features against real fine-tuning.

    The ``digits`` workload (``cpu`` preset, ``hidden``/``depth`` overridden):
    ``θ*`` from its training program, then on the all-tasks set, the K LOO
    sets and ``--estimate-subsets`` random drop-4 sets: real fine-tuning
    (one replicate), and linearized fine-tuning of the same program (same
    batches) on factored features, written out as
    ``finetune.linearized_finetune_scores`` would run it with
    ``_linearize_data`` replaced by ``factored_linearized_examples`` and
    ``_update_norms`` by ``factored_update_norms``.
    """
    import dataclasses

    from scipy.stats import spearmanr

    from tasksurrogate_jax.estimate.estimation import EstimationSettings
    from tasksurrogate_jax.estimate.features import linear_model
    from tasksurrogate_jax.truth import retraining
    from tasksurrogate_jax.workloads.digits import digits_workload

    workload = digits_workload("cpu", hidden=args.hidden, depth=args.depth)
    key = jax.random.key(0)
    params = workload.base_params(key=key)
    tasks = workload.num_tasks
    rng = np.random.default_rng(0)
    drops = [np.isin(np.arange(tasks), rng.choice(tasks, 4, replace=False))
             for _ in range(args.estimate_subsets)]
    masks = np.concatenate([np.ones((1, tasks)), 1 - np.eye(tasks),
                            1 - np.stack(drops)]).astype(np.float32)
    start = time.perf_counter()
    real = np.asarray(workload.exact_scores(masks, key=key, regime="finetune",
                                            progress=False))
    runs = [{"method": "fine-tuning", "seconds": time.perf_counter() - start}]

    def add_metrics(row, scores):
        est, ref = scores.mean(1), real.mean(1)
        row.update({
            "rel_error": float(np.mean(np.abs(est - ref) / ref)),
            "spearman_subsets": float(spearmanr(est, ref)[0]),
            "loo_spearman": float(spearmanr(est[1:tasks + 1] - est[0],
                                            ref[1:tasks + 1] - ref[0])[0])})

    add_metrics(runs[0], real)
    if args.estimate_full:
        start = time.perf_counter()
        full = np.asarray(workload.estimate(
            masks, key=key, settings=EstimationSettings(proj_dim="full")).scores)
        runs.append({"method": "linearized, full space",
                     "seconds": time.perf_counter() - start})
        add_metrics(runs[-1], full)

    data, target, spec = workload.data, workload.target, workload.finetune_spec
    structure = factored.find_dense_layers(workload.apply_fn, params, data.inputs)
    _, sample = factored.layer_factors(workload.apply_fn, params, data.inputs[:64],
                                       structure=structure)
    for d in args.estimate_dims:
        start = time.perf_counter()
        projection = factored.make_factored_projection(
            jax.random.fold_in(key, 1), structure=structure,
            dims=factored.allocate_dims(structure, sample, d))
        train, tgt = (factored.factored_linearized_examples(
            workload.apply_fn, params, part.inputs, part.labels,
            projection=projection, batch_size=256) for part in (data, target))
        jax.block_until_ready((train, tgt))
        features_s = time.perf_counter() - start

        def stacked(examples):
            return jnp.concatenate([examples.outputs[..., None], examples.features],
                                   axis=-1)

        result = retraining.retrain(
            masks, data=dataclasses.replace(data, inputs=stacked(train)),
            target=dataclasses.replace(target, inputs=stacked(tgt)),
            spec=dataclasses.replace(spec, apply_fn=linear_model, accuracy_fn=None),
            key=key, init_params=jnp.zeros(projection.proj_dim, train.features.dtype),
            replicates=1, return_params=True, progress=False)
        norms = factored.factored_update_norms(projection, result.params[0])
        runs.append({"method": f"linearized, factored d={projection.proj_dim}",
                     "seconds": time.perf_counter() - start,
                     "features_s": features_s,
                     "mean_delta_norm": float(jnp.mean(norms))})
        add_metrics(runs[-1], np.asarray(result.losses.mean(0)))
        print(format_table(runs[-1:], ["method", "seconds", "features_s",
                                       "rel_error", "loo_spearman"]), flush=True)
    return {"num_subsets": int(masks.shape[0]), "theta_target_accuracy":
            float(workload.accuracy(params)), "runs": runs}


def main(argv=None):
    args = parse_args(argv)
    wall = time.perf_counter()
    config = DigitsDataConfig(hidden=args.hidden, depth=args.depth)
    data, target = digits_data(config)
    apply_fn, init_fn = nnx_model_functions(lambda rngs: DigitsMLP(config, rngs=rngs))
    params = init_fn(jax.random.key(0))
    p = num_parameters(params)
    train_x, train_y = jnp.asarray(data.inputs), jnp.asarray(data.labels)
    inputs = jnp.concatenate([train_x, jnp.asarray(target.inputs)])
    labels = jnp.concatenate([train_y, jnp.asarray(target.labels)])
    n = inputs.shape[0]
    start = time.perf_counter()
    params, losses = train_theta(apply_fn, params, train_x, train_y, args.train_steps)
    train_s = time.perf_counter() - start
    accuracy = float(jnp.mean(jnp.argmax(apply_fn(params, target.inputs), -1)
                              == jnp.asarray(target.labels)))
    print(f"model {args.hidden}x{args.depth}: p = {p:,}; n = {n} examples, C = 10; "
          f"θ*: {args.train_steps} Adam steps ({train_s:.1f} s), train loss "
          f"{float(losses[-1]):.3f}, target accuracy {accuracy:.3f}", flush=True)

    structure = factored.find_dense_layers(apply_fn, params, inputs)
    order = np.random.default_rng(0).permutation(train_x.shape[0])
    sample_idx = np.sort(order[:args.sample])
    alloc_idx = np.sort(order[args.sample:args.sample + args.alloc_sample])
    sample_x, sample_y = train_x[sample_idx], train_y[sample_idx]
    start = time.perf_counter()
    kernel = jax.block_until_ready(exact_kernel(apply_fn, params, sample_x))
    kernel_s = time.perf_counter() - start
    _, sample_factors = factored.layer_factors(apply_fn, params, sample_x,
                                               structure=structure)
    layer_kernels = factored.exact_kernels(sample_factors)
    kernel_norm = float(jnp.linalg.norm(kernel))
    consistency = float(jnp.linalg.norm(sum(layer_kernels) - kernel)) / kernel_norm
    shares = {layer.kernel_path: float(jnp.linalg.norm(k)) / kernel_norm
              for layer, k in zip(structure.layers, layer_kernels, strict=True)}
    print(f"exact J J^T on {args.sample} examples: {kernel_s:.1f} s; factored "
          f"exact kernel against it: rel. diff {consistency:.1e}; per-layer "
          f"||K_l||/||K||: " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()),
          flush=True)
    _, alloc_factors = factored.layer_factors(apply_fn, params, train_x[alloc_idx],
                                              structure=structure)

    rows = []

    def factored_row(method, k, dims):
        projection = factored.make_factored_projection(
            jax.random.key(1), structure=structure, dims=dims)
        d = projection.proj_dim

        def fn(p, x):
            return factored.factored_jacobians(apply_fn, p, x, projection=projection,
                                               batch_size=min(args.batch_size, n))

        (_, feats), compile_s, run_s, _ = compile_and_time(fn, (params, inputs),
                                                           args.repeats)
        del feats
        errors, cross = [], []
        for seed in range(args.seeds):
            proj = factored.make_factored_projection(
                jax.random.key(100 + seed), structure=structure, dims=dims)
            _, phi = factored.factored_jacobians(apply_fn, params, sample_x,
                                                 projection=proj)
            e, c = kernel_errors(phi, kernel, 10)
            errors.append(e)
            cross.append(c)
        err, err_sd = mean_sd(errors)
        crs, crs_sd = mean_sd(cross)
        rows.append({"method": method, "k": k, "d": d,
                     "dims": [list(pair) for pair in projection.dims],
                     "examples_timed": n, "compile_s": compile_s, "run_s": run_s,
                     "seconds_all_n": run_s, "scaled": False,
                     "features_MB": n * 10 * d * 4 / 2 ** 20,
                     "rel_fro": err, "rel_fro_sd": err_sd,
                     "rel_fro_cross": crs, "rel_fro_cross_sd": crs_sd,
                     "predicted_rel_fro": factored.predicted_kernel_error(
                         structure, sample_factors, projection.dims)})
        print(format_table(rows[-1:], ["method", "k", "d", "dims", "compile_s",
                                       "run_s", "rel_fro", "predicted_rel_fro"]),
              flush=True)
        return d

    uniform_ds = [factored_row("factored", k, k) for k in args.ks]
    for d in sorted({512, *uniform_ds}):
        factored_row("factored-alloc", None,
                     factored.allocate_dims(structure, alloc_factors, d))

    dense_dims = args.dense_dims or ([512] if args.quick else [512, uniform_ds[0]])
    timed = args.dense_examples or (args.sample if args.quick else n)
    timed_x, timed_y = (sample_x, sample_y) if timed == args.sample else (
        inputs[:timed], labels[:timed])
    for d in dense_dims:
        def dense_fn(p, x, y, projection):
            return linearized_examples(
                apply_fn, p, x, y, projection=projection, output_mode="logits",
                batch_size=min(args.dense_batch_size, x.shape[0])).features

        projection = make_projection(jax.random.key(1), d, num_params=p)
        feats, compile_s, run_s, compiled = compile_and_time(
            dense_fn, (params, timed_x, timed_y, projection), 1)
        del feats
        errors, cross = [], []
        dense_on_sample = compiled if timed == args.sample else jax.jit(dense_fn)
        for seed in range(args.dense_seeds):
            proj = make_projection(jax.random.key(100 + seed), d, num_params=p)
            e, c = kernel_errors(dense_on_sample(params, sample_x, sample_y, proj),
                                 kernel, 10)
            errors.append(e)
            cross.append(c)
        err, err_sd = mean_sd(errors)
        crs, crs_sd = mean_sd(cross)
        rows.append({"method": "dense", "k": None, "d": d, "examples_timed": timed,
                     "compile_s": compile_s, "run_s": run_s,
                     "seconds_all_n": run_s * n / timed, "scaled": timed < n,
                     "features_MB": n * 10 * d * 4 / 2 ** 20,
                     "rel_fro": err, "rel_fro_sd": err_sd,
                     "rel_fro_cross": crs, "rel_fro_cross_sd": crs_sd})
        print(format_table(rows[-1:], ["method", "d", "examples_timed", "run_s",
                                       "seconds_all_n", "rel_fro", "rel_fro_cross"]),
              flush=True)

    dense512 = next((r for r in rows if r["method"] == "dense" and r["d"] == 512),
                    None)
    for row in rows:
        row["speedup_vs_dense512"] = (dense512["seconds_all_n"] / row["seconds_all_n"]
                                      if dense512 else None)
    columns = ["method", "k", "d", "examples_timed", "compile_s", "seconds_all_n",
               "scaled", "speedup_vs_dense512", "features_MB", "rel_fro",
               "rel_fro_sd", "predicted_rel_fro", "rel_fro_cross"]
    table = format_table(rows, columns)
    payload = {
        "command": "python benchmarks/bench_factored.py" + (" --quick" if args.quick
                                                             else ""),
        "args": vars(args),
        "model": {"hidden": args.hidden, "depth": args.depth, "num_params": p,
                  "layers": [{"kernel": layer.kernel_path, "fan_in": layer.fan_in,
                              "fan_out": layer.fan_out, "bias": layer.bias_path}
                             for layer in structure.layers],
                  "train_steps": args.train_steps,
                  "train_loss": float(losses[-1]), "target_accuracy": accuracy},
        "num_examples": n, "num_outputs": 10, "sample": args.sample,
        "exact_kernel_s": kernel_s,
        "factored_exact_kernel_rel_diff": consistency,
        "layer_kernel_share": shares,
        "rows": rows,
        "environment": environment(),
    }
    if args.estimate:
        payload["estimation"] = estimate_section(args)
    payload["wall_s"] = time.perf_counter() - wall
    path = write_json(args.out, payload)
    print()
    print(table)
    if args.estimate:
        print()
        print(format_table(payload["estimation"]["runs"],
                           ["method", "seconds", "features_s", "rel_error",
                            "spearman_subsets", "loo_spearman"]))
    print(f"\nseconds_all_n: feature time for all {n} examples (dense: scaled from "
          "examples_timed when 'scaled'); rel_fro: ||ΦΦᵀ − JJᵀ||_F / ||JJᵀ||_F on "
          f"{args.sample} training examples x 10 outputs, mean (sd) over "
          f"{args.seeds} projection keys (dense: "
          f"{args.dense_seeds}); predicted: the Gaussian error model's; wall "
          f"{payload['wall_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
