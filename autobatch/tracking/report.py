"""Rebuild a study's trial table and recommendation after the fact, from MLflow or Optuna.

MLflow holds what the tracker logged (the parent run and its ``trial-N`` child runs); the
Optuna storage holds the same facts as the tuner's user attributes, so a study tuned with
``--no-mlflow``, or whose tracking server was down, can still be reported.

Example::

    report = load_report(experiment="autobatch-digits")            # sqlite:///mlflow.db
    report = load_report(storage="sqlite:///autobatch.db", study_name="autobatch-digits")
    print(format_report(report))
"""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from autobatch.errors import InvalidInputError
from autobatch.records import TrialRecord
from autobatch.tracking.redact import redact_url

log = logging.getLogger(__name__)

RECOMMENDATION_KEYS = (
    "batch_size",
    "epochs",
    "steps",
    "lr",
    "lr_multiplier",
    "best_trial",
    "beta2",  # with scale_adamw
    "weight_decay",
)


def recommendation_tag(key: str) -> str:
    """The study run's tag for a key of ``TuneResult.recommendation()``: written by the
    tracker, read back here."""
    return key if key == "best_trial" else f"recommended_{key}"


_COLUMNS = tuple(f.name for f in fields(TrialRecord) if f.name != "curve")
# The Python type of each column, read from TrialRecord's annotations ("float | None" -> float).
_TYPES = {
    f.name: {"int": int, "float": float}.get(str(f.type).split("|")[0].strip(), str)
    for f in fields(TrialRecord)
    if f.name != "curve"
}


@dataclass(frozen=True)
class Report:
    """A study's recommendation and one row per trial (``TrialRecord.summary()`` fields)."""

    recommendation: dict[str, Any]
    trials: tuple[dict[str, Any], ...]
    source: str  # "mlflow" or "optuna"
    study_name: str | None = None
    parent_run_id: str | None = None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_report(
    *,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    experiment: str | None = None,
    storage: str | None = None,
    study_name: str | None = None,
) -> Report:
    """The report of one study.

    From MLflow: the parent run ``run_id``, or the latest study run in ``experiment`` (by
    default the experiment named after ``study_name``), at ``tracking_uri`` (by default
    ``sqlite:///mlflow.db`` in the current directory). From Optuna: ``storage`` alone, or
    as the fallback when MLflow has no such study or cannot be reached.
    """
    wants_mlflow = tracking_uri is not None or run_id is not None or experiment is not None
    if storage is not None and not wants_mlflow:
        return _from_optuna(storage, study_name)
    if run_id is None and experiment is None and study_name is None:
        raise InvalidInputError(
            "say which study to report: give --run-id or --experiment (MLflow), or "
            "--storage with --study-name (Optuna)"
        )
    try:
        return _from_mlflow(tracking_uri, run_id, experiment or study_name, study_name)
    except InvalidInputError as exc:
        if storage is None:
            raise
        log.warning("%s; reading the Optuna storage %s instead", exc, redact_url(storage))
        return _from_optuna(storage, study_name)


def _coerce(column: str, value: Any) -> Any:
    if value is None or value == "" or value == "None":
        return None
    kind = _TYPES.get(column, str)
    try:
        if kind is int:
            return int(float(value))
        if kind is float:
            return float(value)
    except (TypeError, ValueError):
        return value
    return str(value)


def _row(values: dict[str, Any]) -> dict[str, Any]:
    return {column: _coerce(column, values.get(column)) for column in _COLUMNS}


# -- MLflow -----------------------------------------------------------------------------------


def _from_mlflow(
    tracking_uri: str | None, run_id: str | None, experiment: str | None, study: str | None
) -> Report:
    """The report of study run ``run_id``, or of the latest study run in ``experiment`` (the
    latest of ``study``'s where it is given: an experiment can hold several studies)."""
    from mlflow.exceptions import MlflowException

    from autobatch.tracking.mlflow_tracker import (
        PARENT_TAG,
        ROLE_TAG,
        STUDY_TAG,
        SUMMARY,
        SUMMARY_METRICS,
        TRIAL_TAG,
        http_limits,
        open_client,
    )
    from autobatch.tracking.uri import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = open_client(uri, create=False)
    shown = redact_url(uri)
    with http_limits(retries=1, timeout=30):
        if run_id is not None:
            try:
                parent = client.get_run(run_id)
                if TRIAL_TAG in parent.data.tags and PARENT_TAG in parent.data.tags:
                    # A trial's run: the report is its study's.
                    log.info(
                        "run %s is trial %s; reporting its study run %s",
                        run_id,
                        parent.data.tags[TRIAL_TAG],
                        parent.data.tags[PARENT_TAG],
                    )
                    parent = client.get_run(parent.data.tags[PARENT_TAG])
            except MlflowException:
                raise InvalidInputError(f"no MLflow run {run_id!r} at {shown}") from None
        else:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise InvalidInputError(
                    f"no MLflow experiment {experiment!r} at {shown}; give --experiment or "
                    "--run-id as shown by `mlflow ui`"
                )
            wanted = f"tags.{ROLE_TAG} = 'study'"
            if study is not None:
                wanted += f" and tags.{STUDY_TAG} = '{study}'"
            runs = client.search_runs(
                [found.experiment_id],
                filter_string=wanted,
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if not runs:
                which = "autobatch study run" if study is None else f"run of study {study!r}"
                raise InvalidInputError(f"experiment {experiment!r} at {shown} has no {which}")
            parent = runs[0]
        parent_id = parent.info.run_id
        children = _search_all(
            client, parent.info.experiment_id, f"tags.`{PARENT_TAG}` = '{parent_id}'"
        )
        rows = {}
        for child in children:
            tags, data = child.data.tags, child.data
            # An interrupted trial is run again from the start and not counted, and an
            # abandoned one (its worker died) is run again: the study's trials are the others.
            if TRIAL_TAG not in tags or tags.get("state") in ("interrupted", "abandoned"):
                continue
            if tags.get("reason") == "interrupted":
                continue
            # NaN: a value the study's final target took away (a time to target it no
            # longer reaches).
            metrics = {
                field: data.metrics[SUMMARY + name]
                for field, name in SUMMARY_METRICS.items()
                if not math.isnan(data.metrics.get(SUMMARY + name, math.nan))
            }
            values: dict[str, Any] = {**data.params, **metrics}
            values.update(
                number=tags[TRIAL_TAG],
                state=tags.get("state", "running"),
                reason=tags.get("reason"),
                mlflow_run_id=child.info.run_id,
            )
            row = _row(values)
            rows[row["number"]] = row
        # Trials whose runs were not logged (a worker with --no-mlflow, a store that was
        # down) are in the table the study logged at its end (trials.csv), which has them all.
        for row in _logged_table(client, parent_id):
            rows.setdefault(row["number"], row)
    # Tags since one run serves a study however often it is extended; parameters before.
    params = {**parent.data.params, **parent.data.tags}
    names = {key: recommendation_tag(key) for key in RECOMMENDATION_KEYS}
    recommendation = {
        key: _coerce(key, params.get(name)) for key, name in names.items() if name in params
    }
    recommendation = _typed_recommendation(recommendation)
    warnings = [w for w in parent.data.tags.get("warnings", "").splitlines() if w]
    if not recommendation:
        warnings.append(
            parent.data.tags.get("failed")
            or f"the study run ended {parent.info.status} without a recommendation "
            "(interrupted or still running)"
        )
    return Report(
        recommendation=recommendation,
        trials=tuple(rows[n] for n in sorted(rows)),
        source="mlflow",
        study_name=parent.data.tags.get("autobatch_study") or parent.info.run_name,
        parent_run_id=parent_id,
        warnings=tuple(warnings),
    )


def _search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _logged_table(client: Any, run_id: str) -> list[dict[str, Any]]:
    from mlflow.exceptions import MlflowException

    names = {a.path for a in client.list_artifacts(run_id)}
    if "trials.csv" not in names:
        return []
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "trials.csv", folder)
        except MlflowException:
            return []
        with Path(path).open(newline="") as handle:
            return [_row(line) for line in csv.DictReader(handle)]


def _typed_recommendation(values: dict[str, Any]) -> dict[str, Any]:
    kinds = {"batch_size": int, "epochs": int, "steps": int, "best_trial": int, "lr": float}
    kinds.update(lr_multiplier=float, beta2=float, weight_decay=float)
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        try:
            out[key] = kinds[key](float(value)) if kinds[key] is int else kinds[key](value)
        except (TypeError, ValueError):
            out[key] = value
    return out


# -- Optuna -----------------------------------------------------------------------------------


def _from_optuna(storage: str, study_name: str | None) -> Report:
    from autobatch.errors import AutobatchError
    from autobatch.tuning.recommendation import load_study, recommend

    study = load_study(storage, study_name)
    warnings: tuple[str, ...] = ()
    try:
        result = recommend(study)
        recommendation, trials = result.recommendation(), result.table()
        warnings = result.warnings
    except AutobatchError as exc:
        from autobatch.tuning.storage import records

        recommendation, trials = {}, [r.summary() for r in records(study.get_trials())]
        warnings = (str(exc),)
    mlflow = study.user_attrs.get("autobatch_mlflow") or {}
    return Report(
        recommendation=recommendation,
        trials=tuple(_row(t) for t in trials),
        source="optuna",
        study_name=study.study_name,
        parent_run_id=mlflow.get("parent_run_id"),
        warnings=tuple(warnings),
    )


# -- text ---------------------------------------------------------------------------------------


def _number(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _outcome(row: dict[str, Any], best_trial: Any) -> str:
    """How the trial ended, as the MLflow run names say it: best, reached, missed, pruned..."""
    if row.get("number") == best_trial:
        return "best"
    if row.get("reason") == "interrupted":
        return "interrupted"
    if row.get("state") == "complete":
        return "reached" if row.get("time_to_target") is not None else "missed"
    return str(row.get("state") or "-")


def format_report(report: Report, why_width: int = 60) -> str:
    """The trial table and the recommendation as plain text."""
    header = (
        "trial",
        "outcome",
        "batch size",
        "lr",
        "lr x",
        "iters/epoch",
        "time-to-target (s)",
        "best loss",
        "rec. epochs",
        "why",
    )
    best_trial = report.recommendation.get("best_trial")
    rows = []
    for r in report.trials:
        why = " ".join(str(r.get("reason") or "").split())
        rows.append(
            (
                _number(r.get("number"), "d"),
                _outcome(r, best_trial),
                _number(r.get("batch_size"), "d"),
                _number(r.get("lr"), ".3g"),
                _number(r.get("lr_multiplier"), ".3g"),
                _number(r.get("iterations_per_epoch"), "d"),
                _number(r.get("time_to_target"), ".2f"),
                _number(r.get("best_val_loss"), ".4f"),
                _number(r.get("recommended_epochs"), "g"),
                why if len(why) <= why_width else why[: why_width - 3] + "...",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = {1, len(header) - 1}  # words read better left-aligned

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    source = (
        f"MLflow run {report.parent_run_id}" if report.source == "mlflow" else "the Optuna storage"
    )
    out = [f"Study {report.study_name or '?'} ({len(rows)} trials, from {source})", ""]
    out += [line(header), line(tuple("-" * w for w in widths))]
    out += [line(row) for row in rows]
    out.append("")
    rec = report.recommendation
    if rec:
        out.append(
            f"Recommendation: batch size {rec.get('batch_size', '?')}, "
            f"{rec.get('epochs', '?')} epochs"
            + (f" ({rec['steps']} steps)" if rec.get("steps") is not None else "")
            + f", learning rate {_number(rec.get('lr'), '.4g')} "
            f"(x{_number(rec.get('lr_multiplier'), '.3g')} of the rule-scaled rate), "
            + (
                f"AdamW beta2 {rec['beta2']:.5g} and weight decay {rec['weight_decay']:.3g}, "
                if rec.get("beta2") is not None
                else ""
            )
            + f"from trial {rec.get('best_trial', '?')}"
        )
    else:
        out.append("Recommendation: none (why below)")
    out += [f"Warning: {w}" for w in report.warnings]
    return "\n".join(out)


def format_why(explanation: Any, chosen: int) -> str:
    """Predicted against measured seconds to target per batch size (``prior.explain``), the
    chosen size marked: what the batch-size physics expected, and what the trials found."""
    noise, timing = explanation.noise, explanation.timing
    if noise is None:
        basis = "no prediction: the reference trial measured no gradient noise scale"
    elif timing is None and not explanation.predictions:
        basis = "no prediction: fewer than two batch sizes were timed"
    elif timing is None:  # one size timed: its step time
        basis = f"predicted from the gradient noise scale, {noise:.0f} samples, and the step time"
    else:
        basis = (
            f"predicted from the gradient noise scale, {noise:.0f} samples, and the step time, "
            f"{timing.fixed * 1e3:.3g} ms + {timing.per_sample * 1e3:.3g} ms per sample"
        )
    lines = [
        f"Why batch size {chosen} ({basis}):",
        "batch size  predicted (s)  measured (s)  trials",
    ]
    for row in explanation.rows:
        mark = "  <- chosen" if row.batch_size == chosen else ""
        if row.out_of_memory:
            mark = "  out of memory"
        lines.append(
            f"{row.batch_size:>10}  {_number(row.predicted_seconds, '.3g'):>13}  "
            f"{_number(row.measured_seconds, '.3g'):>12}  {row.trials:>6}{mark}"
        )
    return "\n".join(lines)
