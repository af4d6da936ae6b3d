"""The ``tasksurrogate`` command.

    tasksurrogate list
    tasksurrogate run digits --preset cpu [--out DIR] [--seed 0] [...]
    tasksurrogate run digits --preset interactions --protocol pairs
    tasksurrogate run rl --preset tiny [--replicates 4] [--proj-dim 128] ...
    tasksurrogate run icl --preset tiny [--shots 4] [--truth-prompts 20000] ...

``list`` shows each workload's presets and protocol (``loo``: leave-one-out
from the full set; ``fixed_size``: prompts of ``--shots`` demonstrations; see
:mod:`tasksurrogate_jax.pipeline`). ``run``'s options are generated from the
fields of :class:`~tasksurrogate_jax.pipeline.PipelineConfig` (``--num-subsets``
for ``num_subsets``; ``--set FIELD=VALUE`` for ``overrides``), their help from
its docstring (``tasksurrogate run --help``). Options left out take the
workload's defaults; an option that does not apply to the workload is an
error.

``run`` prints the table, writes ``results.json`` and the plots to ``--out``
(default ``results/<workload>-<preset>[-<regime>][-pairs]-seed<seed>``) and
resumes from what a previous run with the same configuration left there. Bad
arguments (and an output folder of another configuration) print one line on
stderr and exit with status 2; any other error is raised with its traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import sys

import jax

from tasksurrogate_jax.estimate.baselines import HESSIANS
from tasksurrogate_jax.estimate.features import OUTPUT_MODES
from tasksurrogate_jax.pipeline import (
    BASELINES,
    CV_CRITERIA,
    CV_METHODS,
    DESIGNS,
    PROTOCOLS,
    PipelineConfig,
    check_applies,
    check_config,
    configured_workload,
    make_workload,
    run_pipeline,
)
from tasksurrogate_jax.pipeline.compilation import enable_compilation_cache
from tasksurrogate_jax.pipeline.report import summary, write_report
from tasksurrogate_jax.truth.store import StoreMismatchError
from tasksurrogate_jax.workloads.base import REGIMES
from tasksurrogate_jax.workloads.registry import (
    ESTIMATION_METHODS,
    WORKLOADS,
    registered,
)


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


# How the fields of PipelineConfig differ from a plain option of their type.
CHOICES = {"protocol": PROTOCOLS, "regime": REGIMES, "design": DESIGNS,
           "estimation_method": ESTIMATION_METHODS,
           "output_mode": OUTPUT_MODES, "cv_method": CV_METHODS,
           "cv_criterion": CV_CRITERIA, "influence_hessian": HESSIANS}
PARSERS = {"proj_dim": parse_proj_dim, "trak_proj_dim": parse_proj_dim,
           "estimation_ridge": parse_ridge, "influence_damping": parse_ridge}
TYPES = {"int": int, "float": float, "str": str}


def field_help() -> dict[str, str]:
    """Each :class:`PipelineConfig` field's entry of its docstring, as plain
    text (the option's help)."""
    doc = PipelineConfig.__doc__.split("Attributes:", 1)[1]
    entries = re.findall(r"^      (\w+): (.*?)(?=^      \w+: |\Z)", doc,
                         flags=re.MULTILINE | re.DOTALL)
    plain = {}
    for name, text in entries:
        text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", " ".join(text.split()))
        plain[name] = text.replace("``", "").replace("%", "%%")
    return plain


def add_config_options(run: argparse.ArgumentParser) -> None:
    """One option per :class:`PipelineConfig` field (``workload``: the
    positional argument; ``overrides``: ``--set FIELD=VALUE``), its help
    from the field's docstring entry and its default the field's."""
    helps = field_help()
    for field in dataclasses.fields(PipelineConfig):
        name, default, text = field.name, field.default, helps[field.name]
        flag = "--" + name.replace("_", "-")
        if name == "workload":
            run.add_argument("workload", help=f"one of {sorted(WORKLOADS)}")
        elif name == "overrides":
            run.add_argument("--set", dest="overrides", type=parse_override,
                             action="append", default=[], metavar="FIELD=VALUE",
                             help=text + " Repeatable.")
        elif name == "baselines":
            run.add_argument(flag, nargs="*", default=None, choices=BASELINES,
                             help=text)
        elif field.type.startswith("bool"):
            run.add_argument(flag, action="store_true", default=default, help=text)
        else:
            kind = field.type.split(" |")[0]
            run.add_argument(flag, default=default, choices=CHOICES.get(name),
                             type=PARSERS.get(name, TYPES.get(kind)), help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasksurrogate", description="Task attribution with kernel surrogates.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the workloads, their presets and protocols")
    run = sub.add_parser("run", help="run the attribution pipeline on a workload",
                         description="Options left out take the workload's "
                                     "defaults (see `tasksurrogate list`).",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_options(run)
    run.add_argument("--out", default=None,
                     help="output folder (default results/<workload>-<preset>"
                          "[-<regime>][-pairs]-seed<seed>); rerunning resumes "
                          "from it")
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
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PipelineConfig)}
    values["overrides"] = tuple(args.overrides)
    if args.baselines is not None:
        values["baselines"] = tuple(args.baselines)
    return PipelineConfig(**values)


if __name__ == "__main__":
    sys.exit(main())
