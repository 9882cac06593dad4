import logging
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from mlflow import MlflowClient

from moevlm.errors import MoevlmError
from moevlm.train.tracking import Tracker

# MLflow's own SQLAlchemy models trip this; nothing moevlm can change.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One embedded store for the module: creating a SQLite store costs seconds of migrations."""
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def client(store):
    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def test_run_is_written_to_the_embedded_store(store, tmp_path, capfd):
    assert not (store / "mlflow.db").exists()
    tracker = Tracker(store, None, run_name="first")
    assert capfd.readouterr() == ("", "")  # no migration chatter on a fresh store
    assert tracker.tracking_uri == f"sqlite:///{store / 'mlflow.db'}"
    assert (store / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=tracker.tracking_uri)

    tracker.log_params({"model": {"decoder": {"width": 256}, "experts": 8},
                        "lr": 3e-4, "note": "x" * 10_000})
    tracker.log_metrics({"train/loss": 2.5, "train/aux": float("nan"),
                         "train/acc": float("inf")}, step=1)
    tracker.log_metrics({"train/loss": 2.0}, step=2)
    (tmp_path / "config.yaml").write_text("lr: 0.0003\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    tracker.log_artifact(tmp_path / "config.yaml", artifact_path="configs")
    tracker.log_text("step 2 done", "logs/train.txt")
    tracker.finish()

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first"
    params = run.data.params
    assert params["model.decoder.width"] == "256"
    assert params["model.experts"] == "8"
    assert params["lr"] == "0.0003"
    assert params["note"] == "x" * 6000
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 2.0)]
    assert set(run.data.metrics) == {"train/loss"}
    listed = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "configs", "logs"} <= listed
    text = client.download_artifacts(tracker.run_id, "logs/train.txt", str(tmp_path))
    assert open(text).read() == "step 2 done"
    # Artifacts live inside the output folder, not in the working directory.
    artifact_uri = run.info.artifact_uri
    assert artifact_uri.startswith((store / "mlartifacts").as_uri())
    assert tracker.ui_command() == f"mlflow ui --backend-store-uri sqlite:///{store}/mlflow.db"


def test_resume_appends_to_the_same_run(store, client, caplog):
    first = Tracker(store, None)
    first.log_params({"lr": 0.1, "seed": 1})
    first.log_metrics({"val/loss": 3.0}, step=10)
    first.finish("KILLED")

    resumed = Tracker(store, None, run_id=first.run_id)
    assert resumed.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    # The same params again are fine; a changed one keeps the original value.
    with caplog.at_level(logging.WARNING, logger="moevlm.train.tracking"):
        resumed.log_params({"lr": 0.1, "seed": 2, "resumed": True})
    assert "param seed is already '1'" in caplog.text
    resumed.log_metrics({"val/loss": 2.0}, step=20)
    resumed.finish()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "seed": "1", "resumed": "True"}
    history = client.get_metric_history(first.run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(10, 3.0), (20, 2.0)]


def test_two_trackers_do_not_share_a_run(store, client):
    a, b = Tracker(store, None), Tracker(store, None)
    a.log_metrics({"x": 1.0}, step=0)
    b.log_metrics({"x": 2.0}, step=0)
    assert a.run_id != b.run_id
    assert client.get_run(a.run_id).data.metrics == {"x": 1.0}
    assert client.get_run(b.run_id).data.metrics == {"x": 2.0}
    a.finish("FAILED")
    b.finish()
    assert client.get_run(a.run_id).info.status == "FAILED"


def test_finish_is_idempotent(store, client):
    tracker = Tracker(store, None)
    tracker.finish("FAILED")
    end_time = client.get_run(tracker.run_id).info.end_time
    tracker.finish()
    run = client.get_run(tracker.run_id)
    assert (run.info.status, run.info.end_time) == ("FAILED", end_time)
    with pytest.raises(ValueError):
        tracker.finish("DONE")


def test_resume_of_unknown_run_is_a_user_error(store):
    with pytest.raises(MoevlmError, match="cannot resume MLflow run"):
        Tracker(store, None, run_id="0" * 32)


def test_disabled_tracker_creates_nothing(tmp_path):
    out = tmp_path / "out"
    tracker = Tracker(out, None, enabled=False)
    tracker.log_params({"a": {"b": 1}})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.log_text("x", "x.txt")
    tracker.finish()
    assert tracker.run_id is None
    assert tracker.ui_command() == ""
    assert list(tmp_path.iterdir()) == []


def test_disabled_tracker_does_not_import_mlflow(tmp_path):
    code = ("import sys; from moevlm.train.tracking import Tracker; "
            f"Tracker({str(tmp_path)!r}, None, enabled=False).finish(); "
            "assert 'mlflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unreachable_server_fails_at_construction(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(MoevlmError, match=f"cannot reach MLflow tracking at {uri}: "):
        Tracker(tmp_path, uri)
    assert list(tmp_path.iterdir()) == []


class NotFound(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_server_that_is_not_mlflow_fails_at_construction(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(MoevlmError, match=f"cannot reach MLflow tracking at {uri}: .*404"):
            Tracker(tmp_path, uri)
    finally:
        server.shutdown()
        server.server_close()
