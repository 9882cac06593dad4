"""The package as users install it: one version everywhere, lean core dependencies with extras, a
one-line error naming the extra a feature needs, and the licence."""

import json
import logging
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import moevlm
from moevlm.cli import main
from moevlm.extras import MissingExtraError, require
from moevlm.train.tracking import Tracker

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on; these checks need not run on 3.10 as well
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVE_STACK = ("fastapi", "uvicorn", "starlette", "pydantic")


def requirement_names(requirements):
    return {req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
            for req in requirements}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from shapes import train_tiny

    return train_tiny(tmp_path_factory.mktemp("packaging"), "train.max_steps=2", "train.checkpoint_every=1")


def without(monkeypatch, *modules):
    """Imports of ``modules`` fail as if they were not installed; moevlm modules re-import."""
    for name in list(sys.modules):
        if name.partition(".")[0] in modules or name.startswith("moevlm.serve"):
            monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_version_is_the_package_metadata_and_pyproject_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"moevlm {version('moevlm')}\n"
    assert moevlm.__version__ == version("moevlm") == PYPROJECT["project"]["version"]


def test_every_checkpoint_records_the_version_and_still_loads(trained, capsys):
    configs = sorted(trained.rglob("config.json"))
    assert len(configs) >= 3  # the run and its snapshots at steps 1 and 2
    for path in configs:
        assert json.loads(path.read_text())["moevlm_version"] == moevlm.__version__
    image = trained.parent / "dot.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    assert main(["caption", "--model", str(trained), str(image)]) == 0
    assert capsys.readouterr().out.startswith(str(image))


def test_serve_without_its_extra_says_which_to_install(trained, monkeypatch, capsys):
    without(monkeypatch, *SERVE_STACK)
    assert main(["serve", "--model", str(trained)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "moevlm: error: moevlm serve needs the serve extra: pip install 'moevlm[serve]'\n"


def test_parquet_data_without_the_hf_extra_says_which_to_install(monkeypatch, tmp_path, capsys):
    without(monkeypatch, "pyarrow", "datasets")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    assert main(["train", "--data", str(tmp_path / "rows.parquet"), "--preset", "tiny", "--no-tracking",
                 "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"moevlm: error: Hugging Face data ({tmp_path / 'rows.parquet'}) needs the hf "
                                       "extra: pip install 'moevlm[hf]'\n")


def test_require_names_the_feature_and_the_extra(monkeypatch):
    without(monkeypatch, "transformers")
    with pytest.raises(MissingExtraError) as err:
        require("transformers", "model.lm=hf:ID")
    assert str(err.value) == "model.lm=hf:ID needs the hf extra: pip install 'moevlm[hf]'"
    require("numpy", "anything")  # an installed library passes


def test_a_broken_install_is_not_reported_as_a_missing_extra(monkeypatch, tmp_path):
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "__init__.py").write_text("import a_dependency_it_lacks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    without(monkeypatch)
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    with pytest.raises(ModuleNotFoundError, match="a_dependency_it_lacks"):
        require("mlflow", "tracking")


def test_default_tracking_without_mlflow_goes_on_untracked_with_one_warning(monkeypatch, tmp_path, caplog):
    without(monkeypatch, "mlflow")
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(tmp_path, None)
    assert not tracker.enabled and tracker.ui_command() == ""
    assert [r.getMessage() for r in caplog.records] == ["MLflow is not installed, so this run is not tracked "
                                                        "(pip install 'moevlm[track]', or --no-tracking to hide this)"]
    tracker.log_metrics({"train/loss": 1.0}, step=1)  # a no-op, as with --no-tracking
    assert not (tmp_path / "mlflow.db").exists()


def test_a_chosen_tracking_uri_without_mlflow_is_refused(monkeypatch, tmp_path):
    without(monkeypatch, "mlflow")
    with pytest.raises(MissingExtraError, match=r"^--tracking-uri \(MLflow tracking\) needs the track extra: "
                                                r"pip install 'moevlm\[track\]'$"):
        Tracker(tmp_path, "http://127.0.0.1:1")


def test_core_dependencies_are_lean_and_torch_is_not_capped():
    project = PYPROJECT["project"]
    core = requirement_names(project["dependencies"])
    assert not core & {"transformers", "peft", "datasets", "pyarrow", "mlflow", "fastapi", "uvicorn", "scikit-learn"}
    torch = [req for req in project["dependencies"] if req.startswith("torch")]
    assert torch == ["torch>=2.6"]
    extras = project["optional-dependencies"]
    assert {"hf", "serve", "track", "demo", "nf4", "all", "test"} <= set(extras)
    assert {"transformers", "peft", "datasets"} <= requirement_names(extras["hf"])
    assert {"fastapi", "uvicorn"} <= requirement_names(extras["serve"])
    assert extras["all"] == ["moevlm[hf,serve,track,demo]"] and "moevlm[all]" in extras["test"]
    assert [req for req in extras["test"] if req.startswith("ruff")][0].startswith("ruff==")


def test_the_licence_is_apache_2():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text
