"""MLflow tracking for studies: the observer that logs them, the charts, and reports.

Names load on first use, so ``import autobatch.tracking`` (or ``redact_url`` alone) does not
pay for importing MLflow and matplotlib until a tracker or report is actually made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autobatch.lazy import lazy_names

if TYPE_CHECKING:
    from autobatch.tracking.background import BackgroundTracker
    from autobatch.tracking.mlflow_tracker import MlflowTracker
    from autobatch.tracking.redact import redact_url
    from autobatch.tracking.report import Report, format_report, load_report
    from autobatch.tracking.uri import mlflow_ui_command, resolve_tracking_uri

_HOMES = {
    "BackgroundTracker": "background",
    "MlflowTracker": "mlflow_tracker",
    "mlflow_ui_command": "uri",
    "resolve_tracking_uri": "uri",
    "redact_url": "redact",
    "Report": "report",
    "format_report": "report",
    "load_report": "report",
}

__all__ = [
    "BackgroundTracker",
    "MlflowTracker",
    "Report",
    "format_report",
    "load_report",
    "mlflow_ui_command",
    "redact_url",
    "resolve_tracking_uri",
]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)
