"""``moevlm export`` from the command line: refusals (one line naming every blocker), the output
folder rule, MLflow registration in the run's own store, and the Hub upload call."""

from __future__ import annotations

import json

import pytest
from export_helpers import pretrained_checkpoint

from moevlm.cli import main
from moevlm.config import load_config
from moevlm.export.blockers import export_blockers


@pytest.fixture(scope="module")
def exportable(pretrained_parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exportable") / "ckpt"
    return pretrained_checkpoint(folder, pretrained_parts["siglip"], pretrained_parts["llama"], layers=[1])


def test_the_export_command_writes_a_folder_and_says_what_it_is(exportable, tmp_path, capsys):
    assert main(["export", "--model", str(exportable), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    said = capsys.readouterr().out
    assert "qwen2_moe text model" in said and "active per token" in said
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text")
    assert "Qwen2MoeForCausalLM" in card and "active per token" in card
    assert not list(tmp_path.glob(".hf.partial-*"))


def test_an_existing_folder_is_never_written_into(exportable, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert main(["export", "--model", str(exportable), "--out", str(tmp_path / "hf")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]


def test_a_scratch_model_of_the_seed_architecture_is_refused_naming_each_blocker(tmp_path, capsys):
    config = load_config("tiny", overrides=["decoder.vocab_size=23", "vision.arch=vit", "decoder.arch=gpt",
                                            "moe.activation=gelu", "vision.patch_size=8", "vision.image_tokens=pooled",
                                            "projector.kind=linear", "vision.channels=1"])
    blockers = export_blockers(config)
    assert len(blockers) == 4 and "vision.arch vit" in blockers[0] and "decoder.arch gpt" in blockers[3]


def test_gelu_tanh_experts_from_an_upcycled_gpt2_are_refused(pretrained_parts, tmp_path, capsys):
    checkpoint = pretrained_checkpoint(tmp_path / "ckpt", pretrained_parts["siglip"], pretrained_parts["gpt2"],
                                       layers="all")
    assert main(["export", "--model", str(checkpoint), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot export exactly: GELU-tanh experts" in err
    assert not (tmp_path / "hf").exists()


def test_register_logs_the_folder_and_makes_a_model_version(exportable, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):
        out = tmp_path / f"hf{_}"
        assert main(["export", "--model", str(exportable), "--out", str(out), "--register", "digits-vlm",
                     "--tracking-uri", uri]) == 0
    assert "registered in MLflow as digits-vlm version 2" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version("digits-vlm", "2")
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "hf_export")}
    assert {"hf_export/config.json", "hf_export/model.safetensors"} <= artifacts


def test_push_to_hub_uploads_the_folder_with_the_environment_token(exportable, tmp_path, monkeypatch, capsys):
    """No network here: huggingface_hub's HfApi is replaced by a stand-in that records the calls."""
    import huggingface_hub

    calls = []

    class StandIn:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **options):
            calls.append(("create_repo", repo_id, options["exist_ok"]))

        def upload_folder(self, repo_id, folder_path, **options):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path)
                                                           .iterdir())))
            return type("Commit", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", StandIn)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert main(["export", "--model", str(exportable), "--out", str(tmp_path / "hf"), "--push-to-hub",
                 "me/tiny-vlm"]) == 0
    assert calls[0] == ("token", "hf_secret") and calls[1] == ("create_repo", "me/tiny-vlm", True)
    assert calls[2][0] == "upload_folder" and "model.safetensors" in calls[2][2]
    assert "pushed to the Hub: https://hub.example/me/tiny-vlm/commit/1" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava"
