"""Projected per-example gradients versus a loop of ``jax.grad`` and a dense P.

On the modular workload (``cpu`` preset, parameters from ``init_fn``, float32),
the cross-entropy gradients ``∇ℓ_n(θ)^T P`` of n training examples are computed
twice, for each ``proj_dim`` d:

- ``ours``: ``linearize.per_example_grads(..., projection=P, batch_size=...)``,
  one jitted program (vmapped chunks, P regenerated block by block, never
  stored);
- ``loop``: a Python loop over examples of one jitted per-example program,
  ``ravel_pytree(jax.grad(loss)(θ, x, y)) @ P``, with P ``[p, d]`` materialised
  once (``unproject`` of the identity: the same matrix as ours). The loop is
  timed on the first ``--loop-examples`` examples and its throughput
  extrapolated to n.

Both are compiled ahead of time (compile time reported apart). Reported: max
absolute and relative difference of the two ``[n, d]`` results, examples/s
of each and their ratio, XLA's compiled memory analysis (temp + argument +
output bytes; the loop's arguments include the dense P) and the process peak
RSS after each phase (cumulative, ours first). Prints a table, writes JSON.

    python benchmarks/bench_gradients.py --num-examples 1024 --proj-dims 512 2048 \
        --batch-sizes 128 1024
    python benchmarks/bench_gradients.py --quick     # CI smoke: 'tiny' preset
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    add_quick,
    add_workload_args,
    compile_timed,
    environment,
    fill_defaults,
    format_table,
    memory_analysis,
    peak_rss_mib,
    strip_results,
    time_call,
    timed,
    write_json,
)
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax.estimate.linearize import per_example_grads
from tasksurrogate_jax.estimate.projection import (
    make_projection,
    num_parameters,
    unproject,
)
from tasksurrogate_jax.losses import softmax_cross_entropy
from tasksurrogate_jax.workloads.modular import modular_workload


def dense_projection(projection, params) -> jax.Array:
    """P ``[p, d]`` with rows in ``ravel_pytree`` order (columns ``P e_j``)."""
    columns = unproject(projection, jnp.eye(projection.proj_dim), params)
    d = projection.proj_dim
    flat = jnp.concatenate(
        [leaf.reshape(d, -1) for leaf in jax.tree_util.tree_leaves(columns)], axis=1)
    return jax.block_until_ready(flat.T)


def run(apply_fn, params, inputs, labels, proj_dim, args) -> dict:
    key = jax.random.key(args.seed + 1)
    projection = make_projection(key, proj_dim, num_params=num_parameters(params))
    n, n_loop = inputs.shape[0], min(args.loop_examples, inputs.shape[0])

    def loss_fn(p, x, y):
        return softmax_cross_entropy(apply_fn(p, x[None]), y[None])[0]

    # Ours: one program over all n examples, for each chunk size.
    ours = {}
    for batch_size in args.batch_sizes:
        def fn(p, proj, xs, ys, batch_size=batch_size):
            return per_example_grads(loss_fn, p, xs, ys, projection=proj,
                                     batch_size=batch_size)

        compiled, compile_s = compile_timed(fn, params, projection, inputs, labels)
        timing = time_call(lambda c=compiled: c(params, projection, inputs, labels),
                           repeats=args.repeats)
        ours[batch_size] = {"compile_s": compile_s, **strip_results(timing),
                            "examples_per_s": n / timing["best"],
                            "memory": memory_analysis(compiled),
                            "result": np.asarray(timing["result"])}

    rss_ours = peak_rss_mib()

    # Reference: dense P once, then a Python loop of a per-example program.
    dense, build_p = timed(lambda: dense_projection(projection, params))

    def one(p, P, x, y):
        return ravel_pytree(jax.grad(loss_fn)(p, x, y))[0] @ P

    one_c, loop_compile = compile_timed(one, params, dense, inputs[0], labels[0])

    def loop():
        return jnp.stack([one_c(params, dense, inputs[i], labels[i])
                          for i in range(n_loop)])

    loop_t = time_call(loop, repeats=args.repeats)
    loop_out = np.asarray(loop_t["result"])

    loop_rate = n_loop / loop_t["best"]
    for record in ours.values():
        out = record.pop("result")[:n_loop]
        diff, scale = np.abs(out - loop_out), np.abs(loop_out).max()
        record.update({
            "throughput_ratio_ours_over_loop": record["examples_per_s"] / loop_rate,
            "max_abs_diff": float(diff.max()),
            "max_rel_diff": float(diff.max() / scale),
            "agree_max_rel_diff_lt_1e-4": bool(diff.max() < 1e-4 * scale),
        })
    return {
        "proj_dim": proj_dim,
        "num_examples": n,
        "loop_examples": n_loop,
        "dense_p_bytes": int(dense.nbytes),
        "seconds_build_dense_p": build_p,
        "ours_by_batch_size": ours,
        "peak_rss_mib_after_ours": rss_ours,
        "loop": {"compile_s": loop_compile, **strip_results(loop_t),
                 "examples_per_s": loop_rate,
                 "extrapolated_seconds_all": n / loop_rate,
                 "memory_per_example_program": memory_analysis(one_c),
                 "peak_rss_mib_after": peak_rss_mib()},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_quick(ap, "the 'tiny' preset, 64 examples (16 looped), d = 32, one repeat",
              "bench_gradients")
    add_workload_args(ap, "ModularConfig")
    ap.add_argument("--num-examples", type=int, default=None,
                    help="training examples (1024; quick 64)")
    ap.add_argument("--loop-examples", type=int, default=None,
                    help="examples the reference loop is timed on (256; quick 16)")
    ap.add_argument("--proj-dims", type=int, nargs="+", default=None,
                    help="projection dimensions d (512 2048; quick 32)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="examples per chunk in ours (>= n: one vmap, no chunks; "
                    "128 1024; quick 16 64)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls (3; quick 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = fill_defaults(
        ap.parse_args(),
        {"preset": "cpu", "num_examples": 1024, "loop_examples": 256,
         "proj_dims": [512, 2048], "batch_sizes": [128, 1024], "repeats": 3},
        {"preset": "tiny", "num_examples": 64, "loop_examples": 16,
         "proj_dims": [32], "batch_sizes": [16, 64], "repeats": 1},
        name="bench_gradients")

    w = modular_workload(args.preset, **args.overrides)
    params = jax.jit(w.init_fn)(jax.random.key(args.seed))
    real = np.flatnonzero(np.asarray(w.data.task_ids) >= 0)[:args.num_examples]
    inputs, labels = w.data.inputs[real], w.data.labels[real]
    dtype = str(jnp.result_type(*jax.tree_util.tree_leaves(params)))
    p = num_parameters(params)

    results = [run(w.apply_fn, params, inputs, labels, d, args)
               for d in args.proj_dims]

    rows = []
    for r in results:
        ml = r["loop"]["memory_per_example_program"]
        for batch_size, o in r["ours_by_batch_size"].items():
            rows.append({
                "d": r["proj_dim"], "batch": batch_size,
                "ours ex/s": o["examples_per_s"],
                f"loop ex/s ({r['loop_examples']} ex.)": r["loop"]["examples_per_s"],
                "ratio": o["throughput_ratio_ours_over_loop"],
                "ours compile s": o["compile_s"],
                "loop compile s": r["loop"]["compile_s"],
                "ours XLA MiB": o["memory"].get("total_bytes", np.nan) / 2**20,
                "loop XLA MiB": ml.get("total_bytes", np.nan) / 2**20,
                "dense P MiB": r["dense_p_bytes"] / 2**20,
                "max abs diff": o["max_abs_diff"],
                "max rel diff": o["max_rel_diff"],
            })
    print(f"modular {args.preset}: {len(real)} examples, {p} params, {dtype}, "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}; init params")
    print(format_table(rows, list(rows[0])))
    print("batch = ours' examples per chunk; ratio = ours / loop examples/s, loop "
          "timed on its first examples and extrapolated. XLA MiB = temp + argument "
          "+ output (ours: all n examples in one program; loop: one example, dense "
          "P among its arguments); max rel diff = max |diff| / max |loop| over the "
          "loop's examples. Peak "
          "RSS (cumulative, MiB): " + ", ".join(
              f"d={r['proj_dim']}: after ours {r['peak_rss_mib_after_ours']:.0f}, "
              f"after loop {r['loop']['peak_rss_mib_after']:.0f}" for r in results))
    payload = {"benchmark": "gradients", "preset": args.preset,
               "config": w.fingerprint(), "num_params": p, "dtype": dtype,
               "params": "init_fn",
               "results": results, "environment": environment()}
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
