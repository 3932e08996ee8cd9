"""The ``autobatch`` command.

The CLI is a thin layer over the library: every command parses its arguments, makes one library
call and prints what came back. Nothing here measures, searches or decides; what a command
reports, the library computed, so a script calling the library gets the same answers.

Adding a command takes two functions in the style of ``probe``: ``_add_NAME_parser(sub)``,
which declares its arguments and sets ``func=_cmd_NAME``, and ``_cmd_NAME(args) -> int``,
which makes the call and prints; then list the builder in ``_COMMANDS``.

Bad input (an :class:`InvalidInputError`, :class:`BatchSizeOneDoesNotFit` or a usage error)
ends with one line ``autobatch: error: ...`` on stderr and exit code 2; Ctrl-C with exit code
130. Errors raised by the user's own code while it trains keep their traceback: it is where the
bug is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from autobatch.errors import AutobatchError, BatchSizeOneDoesNotFit, InvalidInputError
from autobatch.units import format_bytes, parse_bytes

log = logging.getLogger(__name__)

PROG = "autobatch"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: A reader that closed the pipe (128 + SIGPIPE, as a shell reports a command it killed).
EXIT_BROKEN_PIPE = 141


class UsageError(Exception):
    """A command line argparse rejected; reported on one line instead of usage plus error."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


# -- shared arguments ---------------------------------------------------------------------


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log progress to stderr (-v: info, -vv: debug, with tracebacks of errors)",
    )
    return common


def _add_target_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="TARGET",
        help="a built-in example (see 'autobatch examples'), package.module:function or "
        "path/to/file.py:function; the function takes no arguments and returns an "
        "autobatch.Task",
    )


def _load(args: argparse.Namespace) -> Any:
    """The task TARGET names, moved to --device where one was given."""
    from autobatch.target import load_task
    from autobatch.task import Task

    task = load_task(args.target)
    if getattr(args, "device", None):
        if not isinstance(task, Task):
            raise InvalidInputError(
                f"--device moves an autobatch.Task; {args.target!r} is a "
                f"{type(task).__name__}: choose its device where it is built, and drop --device"
            )
        # replace() runs Task.__post_init__ again, so a bad device name is reported there.
        task = dataclasses.replace(task, device=args.device)
    return task


# -- probe --------------------------------------------------------------------------------


def _add_memory_options(parser: argparse.ArgumentParser) -> None:
    """Where to run and how much memory to fit in: shared by probe and tune."""
    from autobatch.probing import DEFAULT_HEADROOM

    parser.add_argument(
        "--device",
        help="device to run on: cuda, cuda:1, mps, xpu or cpu (default: the task's device)",
    )
    parser.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="memory to fit in, e.g. 2GiB or 512MB; on cpu a simulated accelerator of that "
        "size (required by probe), a cap elsewhere",
    )
    parser.add_argument(
        "--headroom",
        type=float,
        default=DEFAULT_HEADROOM,
        metavar="FRACTION",
        help=f"fraction of memory the probe keeps free (default: {DEFAULT_HEADROOM})",
    )
    parser.add_argument(
        "--max-batch-size", type=int, metavar="N", help="never try more than N samples"
    )


def _memory_budget(args: argparse.Namespace) -> int | None:
    if args.memory_budget is None:
        return None
    return parse_bytes(args.memory_budget, name="--memory-budget")


def _add_probe_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:

    parser = sub.add_parser(
        "probe",
        parents=[common],
        help="find the largest batch size whose training step fits in memory",
        description="Run the task's real training step at growing batch sizes and report the "
        "largest that fits in accelerator memory. Every size reported has run.",
    )
    _add_target_argument(parser)
    _add_memory_options(parser)
    parser.add_argument(
        "--multiple-of",
        type=int,
        default=1,
        metavar="N",
        help="only try multiples of N, e.g. 8 (default: 1)",
    )
    parser.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="probe again even if an earlier result for the same setup is cached",
    )
    parser.add_argument(
        "--plan-for",
        metavar="SIZE",
        help="predict for a card of SIZE you do not have, e.g. 80GiB: the same steps on fake "
        "tensors, no memory used, seconds (not with --memory-budget)",
    )
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.set_defaults(func=_cmd_probe)


def _cmd_probe(args: argparse.Namespace) -> int:
    from autobatch.probing import probe

    budget = _memory_budget(args)
    if args.plan_for is not None and budget is not None:
        raise InvalidInputError(
            "give --plan-for SIZE (predict for a card you do not have) or --memory-budget SIZE "
            "(run under that budget), not both"
        )
    plan = None if args.plan_for is None else parse_bytes(args.plan_for, name="--plan-for")
    task = _load(args)
    log.info("probing %s on %s", task.name, task.device)
    result = probe(
        task,
        memory_budget=budget,
        headroom=args.headroom,
        max_batch_size=args.max_batch_size,
        multiple_of=args.multiple_of,
        cache=args.cache,
        plan_for=plan,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(_probe_report(result, task.train_size))
    return EXIT_OK


def _probe_report(result: Any, train_size: int) -> str:
    fits = "would fit" if result.planned else "fits"
    rows = [
        (
            str(a.batch_size),
            fits if a.fitted else ("OOM" if a.oom else "over budget"),
            format_bytes(a.peak_bytes),
            f"{a.seconds:.3f}",
            a.phase,
        )
        for a in result.attempts
    ]
    lines = _table(("batch size", "result", "peak memory", "seconds", "phase"), rows, "<<>><")
    lines.append("")
    note = ""
    if result.upper_bound is not None and result.batch_size >= result.upper_bound:
        limit = "the training set" if result.upper_bound >= train_size else "--max-batch-size"
        note = f"  (the upper bound, set by {limit}: memory allows at least this)"
    model = result.memory_model
    summary = [
        ("batch size", f"{result.batch_size}{note}"),
        (
            "eval batch size",
            "-"
            if result.eval_batch_size is None
            else f"{result.eval_batch_size} (validation forward pass, no gradients)",
        ),
        *([("samples", result.extra["samples"])] if "samples" in result.extra else []),
        ("device", result.device),
        ("capacity", format_bytes(result.capacity_bytes)),
        (
            "budget",
            f"{format_bytes(result.budget_bytes)} (headroom {result.headroom:.0%} of the memory "
            "free above what the step needs whatever the batch)",
        ),
        (
            "memory model",
            "- (no peak readings: found by search)"
            if model is None
            else f"{format_bytes(model.fixed_bytes)} fixed + "
            f"{format_bytes(model.bytes_per_sample)} per sample",
        ),
        (
            "step time",
            "-"
            if result.step_time is None
            else f"{result.step_time.fixed * 1e3:.3g} ms + "
            f"{result.step_time.per_sample * 1e3:.3g} ms per sample (warm steps"
            + (
                "; the simulated accelerator's bookkeeping included)"
                if "tracked" in result.device
                else ")"
            ),
        ),
        ("steps", f"{result.steps} training steps, {result.ooms} out of memory"),
        ("seconds", f"{result.seconds:.2f}"),
        ("cached", "yes (--no-cache to probe again)" if result.cached else "no"),
    ]
    if result.planned:
        planned = {
            "batch size": f"{result.batch_size}{note} (predicted, not run on a card)",
            "steps": f"{result.steps} simulated training steps on fake tensors",
        }
        summary = [(key, planned.get(key, value)) for key, value in summary]
        card = result.extra.get("cuda_card_batch_size")
        summary.insert(1, ("on a CUDA card", _card_note(card, result)))
    width = max(len(key) for key, _ in summary)
    lines += [f"{key:<{width}}  {value}" for key, value in summary]
    return "\n".join(lines)


def _card_note(card: int | None, result: Any) -> str:
    reserve = format_bytes(result.extra.get("cuda_reserve_bytes"))
    unseen = result.extra.get("unseen_fraction", 0)
    kept = f"{reserve} for the CUDA context and workspaces, {unseen:.0%} for the unseen"
    if card is None:
        return f"- (too small once {kept} are kept)"
    return f"about {card} (keeping {kept}; see docs/planning.md)"


# -- tune ---------------------------------------------------------------------------------


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of batch sizes; write them like 16,32,64"
        ) from None
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one batch size, e.g. 16,32,64")
    return sizes


def _multiplier_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a range of multipliers; write it like 0.25,4 (low,high)"
        ) from None
    return low, high


def _add_tune_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from autobatch.tuning.scoring import MIN_TRIALS
    from autobatch.validation import TUNE

    parser = sub.add_parser(
        "tune",
        parents=[common],
        help="recommend batch size, epochs and learning rate from Optuna trials",
        description="Probe the memory ceiling, then run trials over batch sizes up to it and "
        "learning rates around the rule-scaled rate; recommend the configuration that reaches "
        "the target validation loss in the least training time. Trials are stored in --storage "
        "(resumable: run the same command again to continue) and logged to MLflow.",
    )
    _add_target_argument(parser)
    parser.add_argument(
        "--n-trials",
        type=int,
        default=20,
        metavar="N",
        help="the most trials in the study, counting those of earlier runs (default: 20)",
    )
    parser.add_argument(
        "--min-trials",
        type=int,
        metavar="N",
        default=MIN_TRIALS,
        help="end the study before --n-trials once it has N trials and its last 5 moved "
        f"neither the best loss nor the fastest time to the target (default: {MIN_TRIALS}; "
        "as many as --n-trials runs them all)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop starting new trials after this many seconds",
    )
    parser.add_argument(
        "--max-epochs",
        type=float,
        default=10,
        metavar="N",
        help="training budget of each trial, in epochs (default: 10)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        metavar="LIST",
        help="candidate batch sizes, e.g. 16,32,64 (default: powers of two from 8, or the "
        "task's batch size when smaller, up to the ceiling, and the ceiling)",
    )
    parser.add_argument(
        "--objective",
        choices=TUNE["objective"].options,
        default="time",
        help="time: seconds to the target loss (default); loss: best validation "
        "loss; pareto: both (no pruning)",
    )
    parser.add_argument(
        "--lr-rule",
        choices=TUNE["lr_rule"].options,
        default="auto",
        help="how the learning rate scales with batch size (default: auto: saturating-sqrt "
        "for Adam-style optimizers, saturating-linear for SGD and the rest, plain sqrt/linear "
        "until the baseline trial has measured the noise scale; none for Rprop and L-BFGS)",
    )
    parser.add_argument(
        "--lr-multiplier-range",
        type=_multiplier_range,
        default=(0.25, 4.0),
        metavar="LOW,HIGH",
        help="learning-rate multipliers the trials draw from, around the rule-scaled rate "
        "(default: 0.25,4; narrower than 4x pins the rate)",
    )
    parser.add_argument(
        "--scale-adamw",
        action="store_true",
        help="also scale AdamW's beta2 (beta2^(B/B0)) and weight decay (keeping "
        "B / (lr x wd x N) constant) with the batch size",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="measure the memory ceiling and the step times again, even if this machine has "
        "them cached for the same setup (a rerun with the same --seed then may differ)",
    )
    parser.add_argument(
        "--no-lr-range-test",
        action="store_true",
        help="centre the learning-rate multipliers on the task's own rate, not where a "
        "100-step learning-rate range test finds a sound one",
    )
    parser.add_argument(
        "--target-loss",
        type=float,
        metavar="LOSS",
        help="validation loss to reach (default: the best any trial reaches)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        metavar="FRACTION",
        help="a trial reaches the target within this fraction above it (default: 0.01 for a "
        "new study; a stored study keeps its own)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    parser.add_argument(
        "--storage",
        default="sqlite:///autobatch.db",
        metavar="URL",
        help="Optuna storage URL (default: sqlite:///autobatch.db)",
    )
    parser.add_argument(
        "--study-name", metavar="NAME", help="study name (default: autobatch-<task name>)"
    )
    _add_memory_options(parser)
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: sqlite:///mlflow.db here)",
    )
    parser.add_argument(
        "--experiment", metavar="NAME", help="MLflow experiment (default: the study name)"
    )
    parser.add_argument(
        "--no-mlflow", dest="mlflow", action="store_false", help="do not log to MLflow"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="run the trials in N worker processes on this machine, sharing the study "
        "(default: 1, in this process; with --devices: one per device)",
    )
    parser.add_argument(
        "--devices",
        type=_devices,
        metavar="LIST",
        help="the workers' devices in turn, e.g. cuda:0,cuda:1 (default: every visible GPU "
        "for a CUDA task, else the task's device)",
    )
    _add_threads_option(parser)
    _add_heartbeat_options(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_cmd_tune)


def _devices(text: str) -> list[str]:
    """The devices, each checked here: a worker started on a bad one would fail alone while
    the others ran the study without it."""
    import torch

    devices = [part.strip() for part in text.split(",") if part.strip()]
    if not devices:
        raise argparse.ArgumentTypeError("give at least one device, e.g. cuda:0,cuda:1")
    for name in devices:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise argparse.ArgumentTypeError(
                f"{name!r} is not a torch device; use e.g. cpu, cuda:0, mps or xpu:1"
            ) from None
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return devices


def _set_threads(threads: int) -> None:
    from autobatch import validation

    validation.check(validation.TUNE, {"threads": threads})
    import torch

    torch.set_num_threads(threads)


def _add_heartbeat_options(parser: argparse.ArgumentParser) -> None:
    from autobatch.tuning.storage import GRACE_PERIOD, HEARTBEAT_INTERVAL

    parser.add_argument(
        "--heartbeat-interval",
        type=int,
        metavar="SECONDS",
        help="how often a running trial reports it is alive: the study's, the same in every "
        f"worker (default: {HEARTBEAT_INTERVAL} for a new study)",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        metavar="SECONDS",
        help="after how long without a heartbeat a trial's worker counts as dead, and the "
        f"trial runs again: the study's (default: {GRACE_PERIOD} for a new study; at least "
        "twice --heartbeat-interval)",
    )


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads per worker (default: 1 for CPU workers started by --workers, "
        "else torch's default)",
    )


def _cmd_tune(args: argparse.Namespace) -> int:
    if args.mlflow:  # MLflow's import (seconds) overlaps torch's and the task's loading
        from autobatch.tracking.background import prestart

        prestart()
    from autobatch.tuning import tune

    budget = _memory_budget(args)
    task = _load(args)
    tracking_uri = None
    if args.mlflow:
        from autobatch.tracking import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(args.tracking_uri)
    workers = args.workers
    if workers is None:
        workers = len(args.devices) if args.devices else 1
    if args.threads is not None and workers == 1:
        _set_threads(args.threads)
    result = tune(
        task,
        workers=workers,
        target=args.target,
        devices=args.devices,
        threads=args.threads,
        verbose=args.verbose,
        n_trials=args.n_trials,
        min_trials=args.min_trials,
        timeout=args.timeout,
        max_epochs=args.max_epochs,
        candidates=args.batch_sizes,
        objective=args.objective,
        lr_rule=args.lr_rule,
        lr_multiplier_range=args.lr_multiplier_range,
        scale_adamw=args.scale_adamw,
        lr_range_test=not args.no_lr_range_test,
        cache=not args.no_cache,
        target_loss=args.target_loss,
        tolerance=args.tolerance,
        seed=args.seed,
        storage=args.storage,
        study_name=args.study_name,
        memory_budget=budget,
        headroom=args.headroom,
        max_batch_size=args.max_batch_size,
        mlflow=args.mlflow,
        tracking_uri=tracking_uri,
        experiment=args.experiment,
        progress=not args.json,
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return EXIT_OK
    print(_result_text(result, tracking_uri))
    return EXIT_OK


def _why_text(result: Any) -> str:
    """The "why this batch size" table: the prior's prediction against the trials."""
    from autobatch.tracking.report import format_why
    from autobatch.tuning import prior

    settings = result.settings
    explanation = prior.explain(result.trials, settings.candidates, prior.step_clock(settings))
    return format_why(explanation, result.batch_size)


def _unused_because(found: dict[str, Any]) -> str:
    """Why the range test's suggestion did not move the multipliers, if it did not."""
    if found["centre"] != 1:
        return ""
    if not found.get("descended", True):
        return " (unused: the loss fell by less than a tenth, which says nothing about rates)"
    return " (unused: within the multiplier range's reach)"


def _result_text(result: Any, tracking_uri: str | None, rerun: str = "the same command") -> str:
    """The trial table, the study's whereabouts and, last, the recommendation; ``rerun``: the
    command that adds trials."""
    from autobatch.tracking.report import Report, format_report
    from autobatch.tuning import prior, scoring

    report = Report(
        recommendation=result.recommendation(),
        trials=tuple(result.table()),
        source="mlflow" if result.mlflow_run_id else "optuna",
        study_name=result.settings.study_name,
        parent_run_id=result.mlflow_run_id,
        warnings=result.warnings,
    )
    text = format_report(report).splitlines()
    recommendation = [line for line in text if line.startswith(("Recommendation", "Warning"))]
    lines = [line for line in text if line not in recommendation]
    lines += [*_why_text(result).splitlines(), ""]
    settings = result.settings
    if result.target_loss is not None:
        lines.append(f"Target: {result.target()}")
    if (found := settings.lr_range_test) is not None:
        blew_up = found["diverged_lr"]
        lines.append(
            f"Learning rates: multipliers centred on x{found['centre']:.3g}; a "
            f"{found['steps']}-step range test at batch size {found['batch_size']} had its "
            f"lowest loss at rate {found['lr_at_minimum']:.3g}"
            + (f" and diverged at {blew_up:.3g}" if blew_up else "")
            + f", suggesting x{found['suggested']:.3g} of the task's {found['task_lr']:.4g}"
            + _unused_because(found)
        )
    if (timed := settings.step_clock) is not None:
        steps = prior.format_step_times(timed["seconds"])
        how = "this machine's, from the cache" if timed.get("cached") else "timed before trial 0"
        lines.append(f"Clock: ms per training step by batch size ({how}): {steps}")
    settled = scoring.settled(result.trials, settings)
    short = settings.n_trials is not None and len(result.trials) < settings.n_trials
    go_on = (
        f"it stopped short (--timeout, or an interruption): {rerun} goes on"
        if short and not settled
        else f"to add trials, run {rerun} with a larger "
        + ("--min-trials" if settled else "--n-trials")
    )
    lines.append(
        f"Study: {settings.study_name} in {settings.storage}, {len(result.trials)} trials finished "
        f"({f'{settled}; ' if settled else ''}n_trials {settings.n_trials}); {go_on}"
    )
    if result.mlflow_run_id and tracking_uri is not None:
        from autobatch.tracking import mlflow_ui_command
        from autobatch.tracking.uri import study_run_url
        from autobatch.tuning.storage import MLFLOW

        known = (result.study.user_attrs.get(MLFLOW) if result.study else None) or {}
        where = f"study run {result.mlflow_run_id}"
        if known.get("experiment_id"):
            where = study_run_url(tracking_uri, known["experiment_id"], result.mlflow_run_id)
        lines.append(f"MLflow: {where}; review with: {mlflow_ui_command(tracking_uri)}")
    lines += recommendation
    return "\n".join(lines)


# -- worker -------------------------------------------------------------------------------


def _add_worker_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from autobatch.tuning.storage import GRACE_PERIOD

    parser = sub.add_parser(
        "worker",
        parents=[common],
        help="run trials of a study started by 'autobatch tune', from any machine",
        description="Join a study that 'autobatch tune' prepared (same TARGET, --storage and "
        "--study-name) and run its trials until it has its n_trials. Start one per GPU, on as "
        "many machines as you like: they share the study through the storage (a PostgreSQL "
        f"server across machines). A worker that dies is noticed within {GRACE_PERIOD} s and "
        "its trial runs again.",
    )
    _add_target_argument(parser)
    parser.add_argument(
        "--storage", required=True, metavar="URL", help="the study's Optuna storage URL"
    )
    parser.add_argument(
        "--study-name", metavar="NAME", help="study name (default: autobatch-<task name>)"
    )
    parser.add_argument(
        "--device", help="device to run on: cuda, cuda:1, mps, xpu or cpu (default: the task's)"
    )
    _add_threads_option(parser)
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="stop starting new trials after this"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for the study to be prepared (default: 600)",
    )
    parser.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow tracking URI (default: the study's)"
    )
    parser.add_argument(
        "--no-mlflow", dest="mlflow", action="store_false", help="do not log to MLflow"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--quiet", action="store_true", help="print nothing when done (errors still go to stderr)"
    )
    _add_heartbeat_options(parser)
    parser.set_defaults(func=_cmd_worker)


def _cmd_worker(args: argparse.Namespace) -> int:
    if args.threads is not None:
        _set_threads(args.threads)
    from autobatch.tuning import join_study
    from autobatch.tuning.launch import follow_parent

    follow_parent()

    task = _load(args)
    result = join_study(
        task,
        storage=args.storage,
        study_name=args.study_name,
        timeout=args.timeout,
        wait=args.wait,
        mlflow=args.mlflow,
        tracking_uri=args.tracking_uri,
        progress=not (args.json or args.quiet),
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    elif not args.quiet:
        print(_result_text(result, None, "autobatch tune (same TARGET, --storage, --study-name)"))
    return EXIT_OK


# -- report -------------------------------------------------------------------------------


def _add_report_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "report",
        parents=[common],
        help="print a study's trial table and recommendation from MLflow or Optuna storage",
        description="Rebuild the trial table and the recommendation of a study run elsewhere: "
        "from MLflow (--run-id or --experiment) or, without MLflow, from the Optuna storage "
        "(--storage with --study-name).",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: sqlite:///mlflow.db here)",
    )
    parser.add_argument("--run-id", metavar="ID", help="the study's parent run in MLflow")
    parser.add_argument("--experiment", metavar="NAME", help="the study's MLflow experiment")
    parser.add_argument("--storage", metavar="URL", help="Optuna storage URL of the study")
    parser.add_argument("--study-name", metavar="NAME", help="the study name in that storage")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from autobatch.tracking.report import format_report, load_report

    report = load_report(
        tracking_uri=args.tracking_uri,
        run_id=args.run_id,
        experiment=args.experiment,
        storage=args.storage,
        study_name=args.study_name,
    )
    print(
        json.dumps(report.to_dict(), indent=2, default=str) if args.json else format_report(report)
    )
    return EXIT_OK


# -- examples -----------------------------------------------------------------------------


def _add_examples_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "examples",
        parents=[common],
        help="list the built-in example tasks",
        description="List the built-in tasks, usable as TARGET. They need no download.",
    )
    parser.set_defaults(func=_cmd_examples)


def _cmd_examples(args: argparse.Namespace) -> int:
    from autobatch.examples import EXAMPLES

    rows = [(name, _first_line(factory.__doc__)) for name, factory in EXAMPLES.items()]
    print("\n".join(_table(("example", "description"), rows, "<<")))
    return EXIT_OK


# -- plumbing -----------------------------------------------------------------------------

_COMMANDS: tuple[Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None], ...] = (
    _add_probe_parser,
    _add_tune_parser,
    _add_worker_parser,
    _add_report_parser,
    _add_examples_parser,
)


def build_parser() -> argparse.ArgumentParser:
    from autobatch import __version__

    parser = _Parser(
        prog=PROG,
        description="Find the largest batch size that fits in accelerator memory, then the "
        "batch size, epochs and learning rate that train fastest.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()
    for add in _COMMANDS:
        add(sub, common)
    return parser


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0] if doc and doc.strip() else ""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Plain text columns; ``align`` holds '<' or '>' per column."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        text = "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(cells, align, widths, strict=True))
        return text.rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("autobatch").setLevel(level)
    # Optuna announces every study and trial at INFO; our own progress bar says as much.
    import optuna

    optuna.logging.set_verbosity(logging.WARNING if verbosity <= 1 else logging.DEBUG)


def _fail(message: object) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _fail(f"{exc} (see '{exc.prog} --help')")
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if args.command is None:
        _fail(f"choose a command: {', '.join(_command_names(parser))} (see '{PROG} --help')")
        return EXIT_USAGE
    _configure_logging(args.verbose)
    # SIGTERM (a scheduler's stop, `kill`, `timeout`) stops a study as Ctrl-C does: the running
    # trial is queued again, workers are stopped, and the same command resumes.
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread: leave signals to the caller
        previous = None
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (``| head``): nothing left to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit's flush
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as exc:  # StudyInterrupted too: its message says what was kept
        detail = _one_line(exc)
        print(f"{PROG}: interrupted" + (f": {detail}" if detail else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (InvalidInputError, BatchSizeOneDoesNotFit) as exc:
        log.debug("details", exc_info=True)
        _fail(exc)
        return EXIT_USAGE
    except AutobatchError as exc:
        log.debug("details", exc_info=True)
        _fail(exc)
        return EXIT_FAILED
    except Exception as exc:
        if not _is_storage_failure(exc):
            raise  # the user's own code: its traceback shows where the bug is
        log.debug("details", exc_info=True)
        from autobatch.tuning.storage import connection_lost

        if connection_lost(exc):
            _fail(
                f"lost the study storage's database server ({type(exc).__name__}: "
                f"{_one_line(exc)[:200]}); the study is kept there: once the server is back, run "
                "the same command again to go on"
            )
            return EXIT_FAILED
        _fail(
            f"the study storage failed ({type(exc).__name__}: {_one_line(exc)[:200]}); the "
            "database may be damaged: restore it from a copy, or give a new --storage (the "
            "trials logged to MLflow are kept there)"
        )
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _is_storage_failure(exc: BaseException) -> bool:
    """Optuna's storage errors and the database errors under them."""
    kinds = {f"{type(e).__module__}.{type(e).__name__}" for e in (exc, exc.__cause__) if e}
    return any(
        kind.startswith(("optuna.exceptions.Storage", "sqlalchemy.exc.", "sqlite3."))
        for kind in kinds
    )


def _command_names(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


if __name__ == "__main__":
    raise SystemExit(main())
