"""The ``tasksurrogate`` command.

    tasksurrogate list
    tasksurrogate run digits --preset cpu [--out DIR] [--seed 0]
        [--regime finetune|scratch] [--replicates 4]
        [--num-subsets 96] [--num-heldout 32]
        [--estimation-method finetune|solve] [--proj-dim 512]
        [--baselines influence tracin trak] [--set num_steps=300 ...]
    tasksurrogate run digits --preset interactions --protocol pairs
    tasksurrogate run rl --preset tiny [--replicates 4] [--proj-dim 128] ...
    tasksurrogate run icl --preset tiny [--shots 4] [--truth-prompts 20000] ...

``list`` shows each workload's presets and protocol (``loo``: leave-one-out
from the full set; ``fixed_size``: prompts of ``--shots`` demonstrations; see
:mod:`tasksurrogate_jax.pipeline`). Options left out take the workload's
defaults; an option that does not apply to the workload is an error.

``run`` prints the table, writes ``results.json`` and the plots to ``--out``
(default ``results/<workload>-<preset>[-<regime>][-pairs]-seed<seed>``) and resumes
from what a previous run with the same configuration left there. Bad arguments
(and an output folder of another configuration) print one line on stderr and
exit with status 2; any other error is raised with its traceback.
"""

from __future__ import annotations

import argparse
import ast
import sys

import jax

from tasksurrogate_jax.compilation import enable_compilation_cache
from tasksurrogate_jax.estimation import METHODS as ESTIMATION_METHODS
from tasksurrogate_jax.estimation import OUTPUT_MODES
from tasksurrogate_jax.workloads.rl import ESTIMATORS as RL_ESTIMATORS
from tasksurrogate_jax.pipeline import (
    BASELINES,
    CV_CRITERIA,
    CV_METHODS,
    DESIGNS,
    PipelineConfig,
    check_config,
    check_applies,
    configured_workload,
    make_workload,
    run_pipeline,
)
from tasksurrogate_jax.report import summary, write_report
from tasksurrogate_jax.store import StoreMismatchError
from tasksurrogate_jax.workloads.registry import WORKLOADS, registered
from tasksurrogate_jax.workloads.supervised import REGIMES


def parse_override(text: str) -> tuple[str, object]:
    """``"field=value"`` -> ``(field, value)``: a Python literal, else the string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return name, parsed


def parse_ridge(text: str) -> float | str:
    """``"auto"`` or a non-negative number (a ridge or a damping)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0 or 'auto', got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def parse_proj_dim(text: str) -> int | str:
    """``"auto"``, ``"full"`` or a positive int."""
    if text in ("auto", "full"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive int, 'auto' or 'full', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = PipelineConfig()
    parser = argparse.ArgumentParser(
        prog="tasksurrogate", description="Task attribution with kernel surrogates.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the workloads, their presets and protocols")
    run = sub.add_parser("run", help="run the attribution pipeline on a workload",
                         description="Options left out take the workload's "
                                     "defaults (see `tasksurrogate list`).")
    run.add_argument("workload", help=f"one of {sorted(WORKLOADS)}")
    run.add_argument("--preset", default=defaults.preset)
    run.add_argument("--out", default=None,
                     help="output folder (default results/<workload>-<preset>"
                          "[-<regime>]-seed<seed>); rerunning resumes from it")
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--protocol", default=None, choices=("pairs",),
                     help="pairs: add a pair-removal ground truth of the "
                          "interactions to the loo protocol and compare each "
                          "method's interactions with it")
    run.add_argument("--max-pairs", type=int, default=defaults.max_pairs,
                     help="the pairs protocol retrains every pair up to this many, "
                          "else this many random pairs")
    run.add_argument("--regime", default=None, choices=REGIMES,
                     help="ground truth: fine-tuning from θ* (what the estimates "
                          "approximate; the default) or training from scratch "
                          "(loo protocol)")
    run.add_argument("--replicates", type=int, default=defaults.replicates,
                     help="paired replicates of the ground truth (>= 2; their "
                          "agreement is the ceiling); fixed_size protocol: groups "
                          "of a sampled truth")
    run.add_argument("--num-subsets", type=int, default=None,
                     help="random subsets (prompts) to fit the surrogates on")
    run.add_argument("--num-heldout", type=int, default=None)
    run.add_argument("--design", default=None, choices=DESIGNS,
                     help="the random subsets (loo protocol): fixed (each drops "
                          "--drop tasks), uniform (every size) or bernoulli (each "
                          "task kept with probability --keep); default: the "
                          "workload's")
    run.add_argument("--drop", type=int, default=None,
                     help="tasks dropped from each random subset (design fixed)")
    run.add_argument("--keep", type=float, default=defaults.keep,
                     help="keep probability of each task (design bernoulli)")
    run.add_argument("--shots", type=int, default=None,
                     help="demonstrations per prompt (fixed_size protocol)")
    run.add_argument("--truth-prompts", type=int, default=None,
                     help="the most prompts the ground truth scores: all of them "
                          "when there are no more, else this many random ones "
                          "(fixed_size protocol)")
    run.add_argument("--estimation-method", default=None,
                     choices=ESTIMATION_METHODS + RL_ESTIMATORS,
                     help="supervised: linearized fine-tuning (default) or the "
                          "convex solve; rl: policy gradient (default) or "
                          "advantage-weighted regression")
    run.add_argument("--proj-dim", type=parse_proj_dim, default=None,
                     help="projection dimension of the estimation: an int, "
                          "'full' (no projection) or 'auto' (full space up to "
                          "100,000 parameters); default: the workload's")
    run.add_argument("--estimation-ridge", type=parse_ridge, default=None,
                     help="ridge of the convex solve: a number or 'auto' "
                          "(default: the workload's)")
    run.add_argument("--output-mode", default=None, choices=OUTPUT_MODES)
    run.add_argument("--estimation-difference", action="store_true", default=None,
                     help="anchor the estimates at one real fine-tuning on all "
                          "tasks")
    run.add_argument("--cv-method", default=defaults.cv_method,
                     choices=CV_METHODS)
    run.add_argument("--cv-criterion", default=defaults.cv_criterion,
                     choices=CV_CRITERIA)
    run.add_argument("--baselines", nargs="*", default=None, choices=BASELINES,
                     help="default: every baseline the workload supports")
    run.add_argument("--influence-damping", type=parse_ridge,
                     default=defaults.influence_damping,
                     help="λ of influence: a number >= 0 or 'auto' (0.05 × the "
                          "curvature's largest eigenvalue)")
    run.add_argument("--influence-hessian", default=defaults.influence_hessian,
                     choices=("gauss_newton", "exact"))
    run.add_argument("--chunk-size", type=int, default=defaults.chunk_size,
                     help="subsets per retraining chunk (each stored when done)")
    run.add_argument("--trak-proj-dim", type=parse_proj_dim,
                     default=defaults.trak_proj_dim,
                     help="an int, 'full' or 'auto' (min(p, 8 n C_h, 8192))")
    run.add_argument("--value-samples", type=int, default=defaults.value_samples,
                     help="coalitions of the Banzhaf values (loo protocol) or "
                          "contexts of the fixed-size effects")
    run.add_argument("--confidence-level", type=float,
                     default=defaults.confidence_level)
    run.add_argument("--set", dest="overrides", type=parse_override, action="append",
                     default=[], metavar="FIELD=VALUE",
                     help="change a workload configuration field (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, entry in WORKLOADS.items():
            print(f"{name}: presets {', '.join(entry.presets)} ({entry.protocol} "
                  "protocol)")
        return 0

    try:  # argument errors only: one line on stderr, exit status 2
        config = _config(args)
        check_applies(config, registered(args.workload).kind)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    log = (lambda line: None) if args.quiet else (
        lambda line: print(line, file=sys.stderr, flush=True))
    if dict(config.overrides).get("precision") == "float64":
        jax.config.update("jax_enable_x64", True)  # the workload asks for it
    enable_compilation_cache()  # before the workload compiles anything
    try:
        workload = make_workload(config)
        config = check_config(config, workload)
        workload = configured_workload(config, workload)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    regime = "" if config.regime is None else f"-{config.regime}"
    pairs = "-pairs" if config.protocol == "pairs" else ""
    out = args.out or (f"results/{args.workload}-{args.preset}{regime}{pairs}"
                       f"-seed{args.seed}")
    try:
        results = run_pipeline(config, workload=workload, out_dir=out, log=log,
                               progress=not args.quiet)
    except StoreMismatchError as err:  # raised before any training
        parser.error(str(err))
    print(summary(results))
    paths = write_report(results, out)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def _config(args) -> PipelineConfig:
    """The :class:`PipelineConfig` of the parsed ``run`` arguments."""
    return PipelineConfig(
        workload=args.workload, preset=args.preset, seed=args.seed,
        protocol=args.protocol, max_pairs=args.max_pairs,
        regime=args.regime, replicates=args.replicates,
        num_subsets=args.num_subsets, num_heldout=args.num_heldout,
        design=args.design, drop=args.drop, keep=args.keep,
        shots=args.shots, truth_prompts=args.truth_prompts,
        estimation_method=args.estimation_method, proj_dim=args.proj_dim,
        estimation_ridge=args.estimation_ridge, output_mode=args.output_mode,
        estimation_difference=args.estimation_difference, cv_method=args.cv_method,
        cv_criterion=args.cv_criterion,
        baselines=None if args.baselines is None else tuple(args.baselines),
        influence_damping=args.influence_damping,
        influence_hessian=args.influence_hessian, trak_proj_dim=args.trak_proj_dim,
        chunk_size=args.chunk_size,
        value_samples=args.value_samples, confidence_level=args.confidence_level,
        overrides=tuple(args.overrides))


if __name__ == "__main__":
    sys.exit(main())
