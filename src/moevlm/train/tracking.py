"""MLflow experiment tracking behind a small interface, so the trainer never imports mlflow.

Everything goes through an ``MlflowClient`` with explicit run ids rather than mlflow's global
"active run": two trackers in one process (tests, an eval inside a training job) then never
write into each other's runs.

Without a tracking URI the store is embedded in the output folder (a SQLite database plus an
artifact folder), so a run folder is self-contained and can be copied or deleted as a whole.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from moevlm.errors import MoevlmError
from moevlm.extras import available, require

log = logging.getLogger(__name__)

_STATUSES = ("FINISHED", "FAILED", "KILLED")
# A remote server that does not answer within this many seconds counts as unreachable.
_PROBE_TIMEOUT_S = 10.0


def _flatten(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _probe(uri: str) -> None:
    """Fail fast on an unreachable server: mlflow itself retries for minutes before giving up."""
    # Lazy: only a tracking server needs it.
    import requests

    try:
        # Any HTTP answer, even 401 or 404, proves the server is there; auth errors surface later.
        requests.get(uri, timeout=_PROBE_TIMEOUT_S)
    except requests.RequestException as err:
        raise MoevlmError(f"cannot reach MLflow tracking at {uri}: {err}") from err


class Tracker:
    """One MLflow run: params, metrics and artifacts of a training or evaluation job.

    With ``enabled=False`` every method is a no-op and mlflow is never imported, so runs
    without tracking pay neither its import time nor its files.
    """

    def __init__(self, out_dir: Path, tracking_uri: str | None, enabled: bool = True,
                 experiment: str = "moevlm", run_name: str | None = None,
                 run_id: str | None = None):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._finished = False
        # MLflow refuses to change a param's value within a run, so remember what was sent.
        self._logged_params: dict[str, str] = {}
        if not enabled:
            return
        if tracking_uri is None and not available("mlflow"):
            # Tracking into the run folder is a default, not something asked for: the run goes on without it.
            log.warning("MLflow is not installed, so this run is not tracked "
                        "(pip install 'moevlm[track]', or --no-tracking to hide this)")
            self.enabled = False
            return
        require("mlflow", "--tracking-uri (MLflow tracking)")

        # Lazy: only tracking needs mlflow, which takes seconds to import.
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        # MLflow logs store creation and schema migrations at INFO on every new database.
        # Set after the import: importing mlflow configures its logger's level itself.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        artifact_location: str | None = None
        if tracking_uri is None:
            out_dir = Path(out_dir).resolve()
            out_dir.mkdir(parents=True, exist_ok=True)
            self.tracking_uri = f"sqlite:///{out_dir / 'mlflow.db'}"
            artifact_location = (out_dir / "mlartifacts").as_uri()
        elif tracking_uri.startswith(("http://", "https://")):
            _probe(tracking_uri)

        try:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            if run_id is None:
                self.run_id = self._create_run(experiment, artifact_location, run_name)
            else:
                self._resume_run(run_id)
        except MlflowException as err:
            reason = str(err).partition("\n")[0]
            raise MoevlmError(
                f"cannot reach MLflow tracking at {self.tracking_uri}: {reason}") from err

    def _create_run(self, experiment: str, artifact_location: str | None,
                    run_name: str | None) -> str:
        found = self._client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = self._client.create_experiment(experiment,
                                                           artifact_location=artifact_location)
        elif found.lifecycle_stage != "active":
            raise MoevlmError(f"MLflow experiment {experiment!r} is deleted in "
                              f"{self.tracking_uri}: restore it or choose another name")
        else:
            experiment_id = found.experiment_id
        return self._client.create_run(experiment_id, run_name=run_name).info.run_id

    def _resume_run(self, run_id: str) -> None:
        # Lazy: only tracking needs mlflow, which takes seconds to import.
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as err:
            raise MoevlmError(f"cannot resume MLflow run {run_id}: not found in "
                              f"{self.tracking_uri}") from err
        self._logged_params = dict(run.data.params)
        self._client.update_run(run_id, status="RUNNING")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (possibly nested) params as ``a.b.c`` keys, stringified and length-capped."""
        if not self.enabled:
            return
        # Lazy: only tracking needs mlflow, which takes seconds to import.
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        batch = []
        for key, value in _flatten(params):
            text = str(value)[:MAX_PARAM_VAL_LENGTH]
            if key in self._logged_params:
                if self._logged_params[key] != text:
                    log.warning("param %s is already %r on this run; keeping it, not %r",
                                key, self._logged_params[key], text)
                continue
            self._logged_params[key] = text
            batch.append(Param(key, text))
        for chunk in _chunks(batch, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite metrics at ``step`` in one request; NaN/inf values are skipped."""
        if not self.enabled:
            return
        # Lazy: only tracking needs mlflow, which takes seconds to import.
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                batch.append(Metric(key, value, now, step))
            else:
                log.warning("metric %s is %s at step %d; not logged", key, value, step)
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's contents, into the run's artifacts."""
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.enabled:
            return
        self._client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run; later calls do nothing, so a `finally` and a handler may both call it."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, not {status!r}")
        if not self.enabled or self._finished:
            return
        self._client.set_terminated(self.run_id, status=status)
        self._finished = True

    def ui_command(self) -> str:
        """The shell command that shows this run in the MLflow UI ("" when tracking is off)."""
        if not self.enabled:
            return ""
        if self.tracking_uri.startswith(("http://", "https://")):
            # A tracking server already serves its UI; the user only needs to open it.
            return f"python -m webbrowser {shlex.quote(self.tracking_uri)}"
        return f"mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}"
