import json
import subprocess
import sys

import pytest
from PIL import Image

from moevlm.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from shapes import write_shapes_csv

    root = tmp_path_factory.mktemp("cli")
    data = write_shapes_csv(root / "shapes.csv")
    assert main(["train", "--data", str(data), "--preset", "tiny", "--out", str(root / "run"),
                 "--set", "train.max_steps=6", "--set", "data.val_fraction=0.25"]) == 0
    return root


def test_train_logs_to_an_mlflow_store_inside_the_run(trained):
    from mlflow import MlflowClient

    state = json.loads((trained / "run" / "trainer_state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{trained / 'run' / 'mlflow.db'}")
    run = client.get_run(state["mlflow_run_id"])
    assert run.data.params["train.max_steps"] == "6"
    assert "train/loss" in run.data.metrics and "val/exact_match" in run.data.metrics
    assert run.data.metrics["val/seconds"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "expert_load.png", "config.json", "samples.txt"} <= artifacts


def test_caption_json_prints_one_object_per_image(trained, tmp_path, capsys):
    for name in ("a.png", "b.jpg"):
        Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / name)
    code, out, _ = run_cli(capsys, "caption", "--model", trained / "run", tmp_path / "a.png", tmp_path / "b.jpg",
                           "--json", "--temperature", "0.8", "--top-k", "5", "--seed", "1", "--max-new-tokens", "5")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    assert all(isinstance(line["text"], str) and len(line["text"]) <= 5 for line in lines)


def test_eval_json_has_the_contract_keys(trained, capsys):
    code, out, _ = run_cli(capsys, "eval", "--model", trained / "run", "--data", trained / "shapes.csv", "--json")
    assert code == 0
    result = json.loads(out)
    assert {"exact_match", "bleu4", "loss", "perplexity", "num_samples", "expert_load"} <= set(result)
    assert result["num_samples"] == 12
    assert set(result["expert_load"]) == {"layer_0", "layer_1"}
    assert len(result["expert_load"]["layer_0"]["image"]) == 4


@pytest.fixture
def generations(monkeypatch):
    """(max_new_tokens, texts) of every batch ``evaluate`` captions."""
    import moevlm.evaluate

    calls, real = [], moevlm.evaluate.generate_texts

    def spy(*args, max_new_tokens, **kwargs):
        texts = real(*args, max_new_tokens=max_new_tokens, **kwargs)
        calls.append((max_new_tokens, texts))
        return texts

    monkeypatch.setattr(moevlm.evaluate, "generate_texts", spy)
    return calls


def test_eval_generates_as_far_as_the_references_need(trained, tmp_path, capsys, generations):
    # Batches of 8 rows; the tiny preset's char tokenizer writes one character per token. The
    # run is too short to have learnt <eos>: without a cap it writes decoder.max_text_len tokens.
    rows = (trained / "shapes.csv").read_text().splitlines()
    data = tmp_path / "d.csv"
    data.write_text("\n".join(rows[:1] + [row.split(",")[0] + ("," + "red" if i < 8 else ",a red bar")
                                          for i, row in enumerate(rows[1:])]) + "\n")
    code, out, _ = run_cli(capsys, "eval", "--model", trained / "run", "--data", data, "--json")
    assert code == 0 and {"exact_match", "bleu4"} <= set(json.loads(out))
    assert [limit for limit, _ in generations] == [2 * len("red") + 8, 2 * len("a red bar") + 8]
    assert max(len(text) for text in generations[0][1]) <= 14
    generations.clear()
    code, _, _ = run_cli(capsys, "eval", "--model", trained / "run", "--data", data, "--max-new-tokens", "3")
    assert code == 0 and [limit for limit, _ in generations] == [3, 3]
    assert max(len(text) for _, texts in generations for text in texts) <= 3


def test_eval_without_generating_reports_loss_and_perplexity_only(trained, capsys, generations):
    code, out, _ = run_cli(capsys, "eval", "--model", trained / "run", "--data", trained / "shapes.csv", "--json",
                           "--no-generate")
    assert code == 0 and generations == []
    result = json.loads(out)
    assert {"loss", "perplexity", "num_samples"} <= set(result) and not {"exact_match", "bleu4"} & set(result)
    code, out, _ = run_cli(capsys, "eval", "--model", trained / "run", "--data", trained / "shapes.csv",
                           "--no-generate")
    assert code == 0 and "perplexity" in out and "exact_match" not in out


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "{run}", "--data", "{data}", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["caption", "--model", "{run}", "{tmp}/missing.png"], "missing.png: no such image file"),
    (["caption", "--model", "{tmp}/nowhere", "x.png"], "nowhere: no such checkpoint folder"),
    (["eval", "--model", "{run}", "--data", "{tmp}/data.txt"], "data.txt"),
    (["train", "--data", "{data}", "--out", "{tmp}/o", "--set", "train.lr=fast"], "train.lr must be float"),
    (["train", "--data", "{data}", "--out", "{tmp}/o", "--set", "train.nope=1"], "unknown config key train.nope"),
    (["train", "--data", "{data}", "--out", "{run}"], "already holds a checkpoint"),
    (["train", "--data", "{data}", "--out", "{run}", "--resume", "--set", "train.lr=1"],
     "train.lr 0.001 (checkpoint) vs 1.0 (now)"),
    (["caption", "--model", "{run}", "{tmp}/data.txt", "--batch-size", "0"], "--batch-size must be >= 1, not 0"),
])
def test_user_mistakes_give_one_line_and_exit_2(trained, tmp_path, capsys, argv, message):
    (tmp_path / "data.txt").write_text("hello")
    argv = [a.format(run=trained / "run", tmp=tmp_path, data=trained / "shapes.csv") for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_caption_and_eval_run_on_the_device_asked_for(trained, tmp_path, capsys):
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "a.png")
    code, out, _ = run_cli(capsys, "caption", "--model", trained / "run", tmp_path / "a.png", "--device", "cpu")
    assert code == 0 and out.startswith(f"{tmp_path / 'a.png'}: ")
    code, out, _ = run_cli(capsys, "eval", "--model", trained / "run", "--data", trained / "shapes.csv", "--json",
                           "--device", "cpu")
    assert code == 0 and json.loads(out)["num_samples"] == 12


@pytest.mark.parametrize("command", ["caption", "eval"])
def test_device_auto_loads_the_model_on_cuda_then_mps(trained, tmp_path, capsys, monkeypatch, command):
    import torch

    from moevlm.errors import CheckpointError

    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "a.png")
    argv = {"caption": ["caption", "--model", trained / "run", tmp_path / "a.png"],
            "eval": ["eval", "--model", trained / "run", "--data", trained / "shapes.csv"]}[command]
    loaded_on = []

    def load_model(model_dir, device="cpu", quantize=None):
        loaded_on.append(torch.device(device))
        raise CheckpointError("stop here")  # this machine may have neither device

    from moevlm import evaluate, generate

    monkeypatch.setattr({"caption": generate, "eval": evaluate}[command], "load_model", load_model)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    for cuda, mps in ((True, True), (False, True), (False, False)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert run_cli(capsys, *argv)[0] == 2
    assert loaded_on == [torch.device("cuda"), torch.device("mps"), torch.device("cpu")]


def test_a_device_the_machine_lacks_ends_in_one_line(trained, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, "eval", "--model", trained / "run", "--data", trained / "shapes.csv",
                           "--device", "cuda")
    assert code == 2
    assert err == "moevlm: error: --device cuda: this machine has no CUDA device (auto picks what it has)\n"


def test_caption_batch_size_captions_in_batches_and_prints_the_same(trained, tmp_path, capsys, monkeypatch):
    from moevlm import generate

    paths = []
    for i, color in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200), (240, 240, 20), (0, 0, 0)]):
        Image.new("RGB", (24, 24), color).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    code, together, _ = run_cli(capsys, "caption", "--model", trained / "run", *paths)
    assert code == 0
    batch_sizes = []
    generate_texts = generate.generate_texts

    def counting_generate_texts(model, tokenizer, images, prompts, **options):
        batch_sizes.append(len(images))
        return generate_texts(model, tokenizer, images, prompts, **options)

    monkeypatch.setattr(generate, "generate_texts", counting_generate_texts)
    code, in_twos, _ = run_cli(capsys, "caption", "--model", trained / "run", *paths, "--batch-size", "2")
    assert code == 0 and batch_sizes == [2, 2, 1]
    assert in_twos == together and len(together.splitlines()) == 5


def test_train_resume_takes_the_same_command_line_for_the_first_run_and_each_restart(tmp_path, capsys, caplog):
    from shapes import write_shapes_csv

    data = write_shapes_csv(tmp_path / "shapes.csv")
    run = tmp_path / "run"
    same = ["train", "--data", data, "--preset", "tiny", "--set", "train.checkpoint_every=2", "--out", run,
            "--no-tracking", "--resume"]
    code, out, _ = run_cli(capsys, *same, "--max-steps", "2")
    assert code == 0 and "trained to step 2" in out
    assert f"{run} holds no checkpoint yet: starting a fresh run" in caplog.text
    caplog.clear()
    # A restart: the same flags again; --max-steps, and the keys that only say when to log,
    # validate or checkpoint, may change.
    code, out, _ = run_cli(capsys, *same, "--max-steps", "4", "--set", "train.checkpoint_every=1")
    assert code == 0 and "trained to step 4" in out and "no checkpoint yet" not in caplog.text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003",
                                                                      "step-00000004"]
    assert json.loads((run / "config.json").read_text())["train"]["checkpoint_every"] == 1
    # --resume alone keeps working, with the checkpoint's own config.
    code, out, _ = run_cli(capsys, "train", "--data", data, "--out", run, "--no-tracking", "--resume",
                           "--max-steps", "5")
    assert code == 0 and "trained to step 5" in out
    # A real difference is refused, naming each key with both values.
    code, _, err = run_cli(capsys, *same, "--set", "train.lr=0.01", "--set", "moe.top_k=1", "--stage", "full")
    assert code == 2 and err.count("\n") == 1
    assert ("the command line's config differs from the run in" in err
            and "model.decoder.moe.top_k 2 (checkpoint) vs 1 (now); train.lr 0.001 (checkpoint) vs 0.01 (now) "
                "(on resume only train.max_steps, " in err)


def test_train_resume_on_pretrained_parts_and_from_an_earlier_stage(tmp_path, capsys, pretrained_parts, offline):
    # Building the model fills in what the sources say (sizes, their configs, absolute paths):
    # the same command line must still match the run it started.
    from shapes import write_llava_data

    data = write_llava_data(tmp_path)
    common = ["--preset", "tiny", "--set", "decoder.max_text_len=128", "--no-tracking", "--resume"]
    pretrain = ["train", "--stage", "pretrain", "--set", f"model.vision=hf:{pretrained_parts['siglip']}",
                "--set", f"model.lm=hf:{pretrained_parts['llama']}", "--data", data["captions"],
                "--out", tmp_path / "pretrain", *common]
    instruct = ["train", "--stage", "instruct", "--from", tmp_path / "pretrain", "--data", data["conversations"],
                "--set", "decoder.lora_rank=4", "--out", tmp_path / "instruct", *common]
    for argv in (pretrain, instruct):
        for steps in (1, 2):
            code, out, err = run_cli(capsys, *argv, "--max-steps", steps)
            assert code == 0 and f"trained to step {steps}" in out, err
        code, _, err = run_cli(capsys, *argv, "--max-steps", 3, "--set", "train.lr=0.5")
        assert code == 2 and "train.lr 0.001 (checkpoint) vs 0.5 (now)" in err and "model." not in err


def test_train_help_names_the_keys_a_resume_may_change():
    from moevlm.cli import build_parser
    from moevlm.train.run import RESUME_MAY_DIFFER

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = " ".join(train.format_help().split())
    assert all(key.split(".")[1] in help_text for key in RESUME_MAY_DIFFER)


def test_corrupt_image_for_caption(trained, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, _, err = run_cli(capsys, "caption", "--model", trained / "run", tmp_path / "bad.png")
    assert code == 2 and "bad.png" in err and "cannot decode image" in err


def test_python_dash_m_entry_point_shows_help():
    result = subprocess.run([sys.executable, "-m", "moevlm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert all(cmd in result.stdout for cmd in ("train", "caption", "eval", "demo"))


def test_demo_end_to_end_with_few_steps(tmp_path, capsys, monkeypatch):
    from moevlm import demo

    monkeypatch.setattr(demo, "VAL_SCENES", 40)  # an untrained model captions each to the length limit
    code, out, _ = run_cli(capsys, "demo", "--out", tmp_path / "demo", "--max-steps", "2", "--no-tracking")
    assert code == 0
    assert "held-out exact match" in out
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "data" / "val.csv").is_file()
    assert not (tmp_path / "demo" / "data" / "train.csv").exists()  # training scenes are drawn as it trains
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "demo", "--max-steps", "2", "--no-tracking")
    assert code == 2 and "already holds a demo run" in err and "--resume" in err
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "other", "--set", "train.nope=1", "--no-tracking")
    assert code == 2 and "unknown config key train.nope" in err and len(err.strip().splitlines()) == 1


def test_caption_of_an_image_that_cannot_be_read_is_one_line(trained, tmp_path, capsys, monkeypatch):
    from moevlm.data import images

    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "locked.png")

    def refuse(ref):
        raise PermissionError(13, "Permission denied", ref)

    monkeypatch.setattr(images, "_read_bytes", refuse)
    code, out, err = run_cli(capsys, "caption", "--model", trained / "run", tmp_path / "locked.png")
    assert code == 2 and out == ""
    assert err.strip() == f"moevlm: error: {tmp_path / 'locked.png'}: cannot read image file: Permission denied"
