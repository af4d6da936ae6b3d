"""Vmapped subset retraining versus a Python loop over one jitted training.

The same subsets (each drops 3 of the 25 tasks, the paper's protocol) are
trained twice from the same initialisation and batch keys:

- ``vmap``: ``retrain_chunk``, all subsets in one compiled, vmapped call;
- ``loop``: a Python loop over ``retrain_one`` (one compiled single-subset
  program, called once per subset).

Both are compiled ahead of time (not timed), then timed with
``jax.block_until_ready``. The two programs round differently (batched versus
single matmuls); short runs agree to float32 precision, long runs drift
apart because training amplifies rounding differences (reported: per-target
and mean-loss differences). Prints a
table and writes JSON (jax version, device kind, dtype, sizes, XLA memory
analysis of each compiled program, peak process RSS).

    python benchmarks/bench_retraining.py --preset cpu --num-subsets 32 \
        --out results/bench_retraining.json
    python benchmarks/bench_retraining.py --quick     # CI smoke: 'tiny' preset
"""

from __future__ import annotations

import argparse
import platform

import jax
import numpy as np
from _common import (
    add_quick,
    add_workload_args,
    compile_timed,
    environment,
    fill_defaults,
    memory_analysis,
    peak_rss_mib,
    time_call,
    write_json,
)

from tasksurrogate_jax.core.subsets import fixed_size_masks
from tasksurrogate_jax.truth.retraining import retrain_chunk, retrain_one
from tasksurrogate_jax.workloads.modular import modular_workload


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_quick(ap, "the 'tiny' preset and 4 subsets", "bench_retraining")
    add_workload_args(ap, "ModularConfig")
    ap.add_argument("--num-subsets", type=int, default=None,
                    help="subsets, each dropping 3 tasks (32; quick 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="timed calls of each")
    args = fill_defaults(ap.parse_args(), {"preset": "cpu", "num_subsets": 32},
                         {"preset": "tiny", "num_subsets": 4},
                         name="bench_retraining")
    if args.num_subsets < 1 or args.repeats < 1:
        ap.error("--num-subsets and --repeats must be positive")

    w = modular_workload(args.preset, **args.overrides)
    K, m = w.num_tasks, args.num_subsets
    masks = fixed_size_masks(jax.random.key(args.seed + 1), m, K, subset_size=K - 3)
    init_key, batch_key = jax.random.split(jax.random.key(args.seed))
    params = jax.jit(w.init_fn)(init_key)
    data, target, spec = w.data, w.target, w.train_spec

    vm, compile_vmap = compile_timed(retrain_chunk, masks, params, batch_key, data,
                                     target, spec=spec)
    one, compile_loop = compile_timed(retrain_one, masks[0], params, batch_key, data,
                                      target, spec=spec)
    # [m, T] losses and accuracy of one call of each; the loop one subset a call.
    timing_vmap = time_call(lambda: vm(masks, params, batch_key, data, target),
                            repeats=args.repeats, warmup=False)
    timing_loop = time_call(lambda: [one(masks[j], params, batch_key, data, target)
                                     for j in range(m)],
                            repeats=args.repeats, warmup=False)
    out_v, out_l = timing_vmap["result"], timing_loop["result"]
    t_vmap, t_loop = timing_vmap["times"], timing_loop["times"]

    lv = np.asarray(out_v[0], np.float64)
    ll = np.stack([np.asarray(o[0], np.float64) for o in out_l])
    av = np.asarray(out_v[1])
    al = np.stack([np.asarray(o[1]) for o in out_l])
    max_abs = float(np.abs(lv - ll).max())
    max_rel = float((np.abs(lv - ll) / np.maximum(np.abs(ll), 1e-6)).max())
    close = bool(np.allclose(lv, ll, rtol=1e-3, atol=1e-5))
    # Per-subset mean target loss (the target-task score): how far apart?
    mean_v, mean_l = lv.mean(1), ll.mean(1)
    max_rel_mean = float((np.abs(mean_v - mean_l) / np.abs(mean_l)).max())
    acc_agree = float((av == al).mean())

    tv, tl = min(t_vmap), min(t_loop)
    result = {
        "benchmark": "retraining",
        "jax": jax.__version__,
        "device_kind": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "dtype": str(jax.tree.leaves(params)[0].dtype),
        "preset": args.preset,
        "config": w.fingerprint(),
        "num_subsets": m,
        "num_tasks": K,
        "num_train": w.data.num_examples,
        "num_targets": w.num_targets,
        "num_steps": spec.num_steps,
        "batch_size": spec.batch_size,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "seconds_compile_vmap": compile_vmap,
        "seconds_compile_loop": compile_loop,
        "seconds_vmap": t_vmap,
        "seconds_loop": t_loop,
        "speedup_loop_over_vmap": tl / tv,
        "max_abs_loss_diff": max_abs,
        "max_rel_loss_diff": max_rel,
        "losses_allclose_rtol1e-3": close,
        "max_rel_mean_loss_diff": max_rel_mean,
        "mean_loss_spread_over_subsets": float(mean_l.std()),
        "accuracy_agreement": acc_agree,
        "memory_vmap_program": memory_analysis(vm),
        "memory_loop_program": memory_analysis(one),
        "peak_rss_bytes": int(peak_rss_mib() * 2**20),
    }
    rows = [
        ("vmap (1 call)", tv, tv / m, result["memory_vmap_program"]),
        (f"loop ({m} calls)", tl, tl / m, result["memory_loop_program"]),
    ]
    print(f"{m} subsets, preset {args.preset}, {spec.num_steps} steps, batch "
          f"{spec.batch_size}, {result['num_params']} params, {result['dtype']}, "
          f"{result['device_kind']}, jax {jax.__version__}")
    print(f"{'program':16s} {'seconds':>9s} {'s/subset':>9s} {'XLA MiB':>9s}")
    for name, t, per, mem in rows:
        mib = mem.get("total_bytes", float("nan")) / 2**20
        print(f"{name:16s} {t:9.2f} {per:9.3f} {mib:9.1f}")
    print(f"speed-up (loop / vmap): {result['speedup_loop_over_vmap']:.2f}x; "
          f"max |loss diff| {max_abs:.2e} (rel {max_rel:.2e}), allclose: {close}, "
          f"accuracy agreement {acc_agree:.4f}; max rel. diff of the mean target "
          f"loss {max_rel_mean:.2e} (spread over subsets "
          f"{result['mean_loss_spread_over_subsets']:.3g}); peak RSS "
          f"{result['peak_rss_bytes'] / 2**20:.0f} MiB")
    print("wrote", write_json(args.out, {**result, "environment": environment()}))


if __name__ == "__main__":
    main()
