"""The staged recipe on tiny local pretrained pretrained_parts: what each stage trains, what checkpoints hold,
``--from`` between stages, upcycling, LoRA."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moevlm.checkpoint import PRETRAINED, WEIGHTS, load_checkpoint, load_model
from moevlm.config import load_config
from moevlm.errors import CheckpointError, ConfigError
from moevlm.models.factory import build_model
from moevlm.train.run import prepare_config, run_training
from moevlm.train.stages import freeze_for_stage
from moevlm.train.upcycling import upcycle_checkpoint
from pretrained_fixtures import tiny_llama
from shapes import write_llava_data

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_data(tmp_path_factory.mktemp("data"))


def stage_config(pretrained_parts, stage, vision="clip", lm="llama", model=None, extra=()):
    overrides = [f"train.stage={stage}", "train.batch_size=4", "train.max_steps=3", "train.warmup_steps=1",
                 "train.eval_every=100", "train.checkpoint_every=100", "train.val_generate=2",
                 "decoder.max_text_len=96", *extra]
    if model is None:
        overrides += [f"model.vision=hf:{pretrained_parts[vision]}", f"model.lm=hf:{pretrained_parts[lm]}"]
    return load_config("tiny", overrides=overrides, model=model)


def train(config, data_file, out, **kw):
    return run_training(config, data_file, out, tracking=False, progress=False, **kw)


def weights_of(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed(before, after):
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.parametrize("vision,lm", [("clip", "llama"), ("siglip", "gpt2")])
def test_pretrain_changes_only_the_projector(pretrained_parts, data, tmp_path, vision, lm):
    config = stage_config(pretrained_parts, "pretrain", vision, lm)
    trainer, _ = train(config, data["captions"], tmp_path / "run")
    # A model built fresh from the same sources and seed is the "before".
    fresh = load_config("tiny", overrides=[f"model.vision=hf:{pretrained_parts[vision]}",
                                           f"model.lm=hf:{pretrained_parts[lm]}"])
    from moevlm.train.run import fresh_model
    fresh = fresh.updated({"train.seed": config.train.seed})
    before = weights_of(fresh_model(fresh).model)
    after = weights_of(trainer.model)
    assert changed(before, after) and all(name.startswith("projector.") for name in changed(before, after))
    assert {n for n in before if n.startswith("projector.")} == changed(before, after)


def test_pretrain_checkpoint_references_frozen_weights_and_reloads_exactly(pretrained_parts, data, tmp_path):
    trainer, _ = train(stage_config(pretrained_parts, "pretrain"), data["captions"], tmp_path / "run")
    saved = set(load_file(str(tmp_path / "run" / WEIGHTS)))
    assert saved and all(name.startswith("projector.") for name in saved)
    refs = json.loads((tmp_path / "run" / PRETRAINED).read_text())
    assert set(refs["sources"]) == {"vision", "lm"} and len(refs["untouched"]) > 10
    model, _, _ = load_model(tmp_path / "run")
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_save_frozen_writes_everything_and_needs_no_source(pretrained_parts, data, tmp_path):
    source = tmp_path / "llama"
    shutil.copytree(pretrained_parts["llama"], source)
    config = stage_config(pretrained_parts, "pretrain", extra=["train.save_frozen=true"])
    config = load_config("tiny", overrides=[f"model.vision=hf:{pretrained_parts['clip']}", f"model.lm=hf:{source}",
                                            "train.stage=pretrain", "train.save_frozen=true", "train.max_steps=1",
                                            "train.batch_size=4", "decoder.max_text_len=96", "train.val_generate=1"])
    trainer, _ = train(config, data["captions"], tmp_path / "run")
    assert any(name.startswith("lm.") for name in load_file(str(tmp_path / "run" / WEIGHTS)))
    shutil.rmtree(source)
    model, _, _ = load_model(tmp_path / "run")
    assert torch.equal(model.lm.lm_head.weight, trainer.model.lm.lm_head.weight)


def pretrain_on_a_copy_of_llama(pretrained_parts, data, tmp_path):
    """One pretrain step on a copy of the tiny Llama (in tmp_path/llama, free to change) into tmp_path/run."""
    source = tmp_path / "llama"
    shutil.copytree(pretrained_parts["llama"], source)
    config = load_config("tiny", overrides=[f"model.vision=hf:{pretrained_parts['clip']}", f"model.lm=hf:{source}",
                                            "train.stage=pretrain", "train.max_steps=1", "train.batch_size=4",
                                            "decoder.max_text_len=96", "train.val_generate=1"])
    trainer, _ = train(config, data["captions"], tmp_path / "run")
    return source, trainer


def test_a_changed_source_is_refused_by_name(pretrained_parts, data, tmp_path):
    source, _ = pretrain_on_a_copy_of_llama(pretrained_parts, data, tmp_path)
    shutil.rmtree(source)
    tiny_llama(source, seed=1)  # same architecture, other weights
    with pytest.raises(CheckpointError, match="fingerprint differs"):
        load_model(tmp_path / "run")


def test_a_source_changed_past_the_first_bytes_of_a_tensor_is_refused(pretrained_parts, data, tmp_path):
    from safetensors.torch import save_file

    from moevlm.checkpoint import CHECKSUMS, fingerprint, sha256

    source, trainer = pretrain_on_a_copy_of_llama(pretrained_parts, data, tmp_path)
    run = tmp_path / "run"
    refs = json.loads((run / PRETRAINED).read_text())
    # A checkpoint of a moevlm whose fingerprint hashed the first 4096 bytes of each tensor still loads.
    legacy = shutil.copytree(run, tmp_path / "legacy")
    old_refs = {"sources": refs["sources"], "untouched": refs["untouched"],
                "fingerprint": fingerprint(trainer.model, set(refs["untouched"]), prefix_bytes=4096)}
    (legacy / PRETRAINED).write_text(json.dumps(old_refs))
    sums = json.loads((legacy / CHECKSUMS).read_text())
    sums["sha256"][PRETRAINED] = sha256(legacy / PRETRAINED)
    (legacy / CHECKSUMS).write_text(json.dumps(sums))
    load_model(legacy)

    weights = source / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.mlp.down_proj.weight"
    assert tensors[name].numel() * 4 > 4096
    tensors[name][-1, -1] += 1  # its last byte lies past the 4096 bytes the old fingerprint read
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"pretrained\.json fingerprint differs"):
        load_model(run)
    load_model(legacy)  # what the old fingerprint missed


def test_the_fingerprint_follows_a_tensor_changed_in_place(tiny_config):
    from moevlm.checkpoint import fingerprint
    from moevlm.models.factory import build_model

    model = build_model(tiny_config.model)
    names = set(model.state_dict())
    before = fingerprint(model, names)
    weight = next(model.parameters()).view(-1)
    value = weight[-1].item()
    with torch.no_grad():
        weight[-1] = value + 1
    assert fingerprint(model, names) != before
    with torch.no_grad():
        weight[-1] = value
    assert fingerprint(model, names) == before


def test_instruct_from_pretrain_trains_projector_and_lm_with_their_own_rates(pretrained_parts, data, tmp_path):
    train(stage_config(pretrained_parts, "pretrain"), data["captions"], tmp_path / "pre")
    before = weights_of(load_model(tmp_path / "pre")[0])
    model_section = json.loads((tmp_path / "pre" / "config.json").read_text())["model"]
    config = stage_config(pretrained_parts, "instruct", model=model_section,
                          extra=["train.lr_projector=1e-3", "train.lr_lm=1e-4"])
    trainer, _ = train(config, data["conversations"], tmp_path / "sft", from_dir=tmp_path / "pre")
    lrs = {group["group"]: group["base_lr"] for group in trainer.optimizer.param_groups}
    assert lrs == {"projector": 1e-3, "lm": 1e-4}
    diff = changed(before, weights_of(trainer.model))
    assert any(n.startswith("lm.") for n in diff) and any(n.startswith("projector.") for n in diff)
    assert not any(n.startswith("vision.") for n in diff)
    saved = set(load_file(str(tmp_path / "sft" / WEIGHTS)))
    assert not any(n.startswith("vision.") for n in saved) and any(n.startswith("lm.") for n in saved)


def test_stage_moe_upcycles_and_the_cli_upcycle_keeps_the_eval_loss(pretrained_parts, data, tmp_path):
    from moevlm.cli import main

    train(stage_config(pretrained_parts, "instruct"), data["conversations"], tmp_path / "sft")
    assert main(["upcycle", "--model", str(tmp_path / "sft"), "--experts", "4", "--top-k", "2",
                 "--layers", "every-other", "--out", str(tmp_path / "moe0")]) == 0
    bundle = load_checkpoint(tmp_path / "moe0")
    assert bundle.config.model.decoder.moe_layer_indices == [1] and len(bundle.model.moe_layers) == 1
    assert bundle.config.model.decoder.moe.activation == "swiglu"

    def eval_loss(folder):
        from moevlm.data.records import read_samples
        from moevlm.data.training_data import dataset_for
        from moevlm.evaluate import evaluate
        model, tokenizer, config = load_model(folder)
        samples, _ = read_samples(data["conversations"])
        dataset = dataset_for(samples, tokenizer, config, None, folder)
        return evaluate(model, dataset, tokenizer, max_generate=0)["loss"]

    assert eval_loss(tmp_path / "moe0") == pytest.approx(eval_loss(tmp_path / "sft"), rel=1e-5)

    model_section = json.loads((tmp_path / "sft" / "config.json").read_text())["model"]
    trainer, _ = train(stage_config(pretrained_parts, "moe", model=model_section), data["conversations"],
                       tmp_path / "moe", from_dir=tmp_path / "sft")
    assert trainer.config.model.decoder.moe_layer_indices == [0, 1]
    learning = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert learning and all(".moe." in n for n in learning)


def test_lora_trains_adapters_only_and_is_merged_by_the_next_stage(pretrained_parts, data, tmp_path):
    config = stage_config(pretrained_parts, "instruct", extra=["decoder.lora_rank=4"])
    trainer, _ = train(config, data["conversations"], tmp_path / "lora")
    learning = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in learning)
    assert all(n.startswith("projector.") or "lora_" in n for n in learning)
    saved = set(load_file(str(tmp_path / "lora" / WEIGHTS)))
    assert not any("base_layer" in n for n in saved)  # the frozen base weights are referenced
    model, tokenizer, _ = load_model(tmp_path / "lora")
    batch = torch.tensor([tokenizer.prompt_ids("What colour is it?")])
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    trainer.model.eval()
    torch.testing.assert_close(model(images, batch).logits, trainer.model(images, batch).logits)

    model_section = json.loads((tmp_path / "lora" / "config.json").read_text())["model"]
    moe, _ = train(stage_config(pretrained_parts, "moe", model=model_section), data["conversations"], tmp_path / "moe",
                   from_dir=tmp_path / "lora")
    learning = {n for n, p in moe.model.named_parameters() if p.requires_grad}
    assert learning and all(".moe." in n or "lora_" in n for n in learning)
    # The merged base weights were trained (by their adapters): now saved, not referenced.
    assert any("base_layer" in n for n in load_file(str(tmp_path / "moe" / WEIGHTS)))
    assert any("lora_" in n for n in learning) and moe.config.model.decoder.lora_rank == 4

    upcycle_checkpoint(tmp_path / "lora", tmp_path / "merged", experts=2, top_k=1, layers=[0])
    merged, _, _ = load_model(tmp_path / "merged")
    assert not any("lora_" in n for n in merged.state_dict())
    torch.testing.assert_close(merged(images, batch).logits, model(images, batch).logits, rtol=1e-4, atol=1e-5)


def test_stage_errors_are_one_line(pretrained_parts, data, tmp_path):
    train(stage_config(pretrained_parts, "pretrain"), data["captions"], tmp_path / "pre")
    model_section = json.loads((tmp_path / "pre" / "config.json").read_text())["model"]
    with pytest.raises(ConfigError, match=r"model\.projector\.kind is 'mlp' there, 'linear' here"):
        train(stage_config(pretrained_parts, "instruct", model=model_section, extra=["projector.kind=linear"]),
              data["conversations"], tmp_path / "x", from_dir=tmp_path / "pre")
    with pytest.raises(ConfigError, match="trains moe, and this model has none of those"):
        train(stage_config(pretrained_parts, "full", extra=["train.trainable=[moe]"]), data["captions"], tmp_path / "y")
    with pytest.raises(ConfigError, match="already exists"):
        upcycle_checkpoint(tmp_path / "pre", tmp_path / "pre", 2, 1, "all")


def test_upcycle_deletes_only_a_temporary_folder_it_made(pretrained_parts, data, tmp_path):
    train(stage_config(pretrained_parts, "pretrain"), data["captions"], tmp_path / "pre")
    theirs = tmp_path / ".moe.tmp"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("not moevlm's")
    with pytest.raises(ConfigError, match=r"\.moe\.tmp is in the way and moevlm did not make it"):
        upcycle_checkpoint(tmp_path / "pre", tmp_path / "moe", 2, 1, "all")
    assert (theirs / "notes.txt").read_text() == "not moevlm's" and not (tmp_path / "moe").exists()

    left = tmp_path / ".moe2.tmp"  # what an upcycle killed before its rename leaves
    left.mkdir()
    (left / ".moevlm-partial").touch()
    (left / "model.safetensors").write_bytes(b"half")
    upcycle_checkpoint(tmp_path / "pre", tmp_path / "moe2", 2, 1, "all")
    assert not left.exists() and not (tmp_path / "moe2" / ".moevlm-partial").exists()
    load_model(tmp_path / "moe2")
    upcycle_checkpoint(tmp_path / "pre", tmp_path / "new" / "moe3", 2, 1, "all")  # into a folder yet to be made
    load_model(tmp_path / "new" / "moe3")


def test_a_llava_checkpoint_given_as_both_sources_computes_what_transformers_llava_does(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from moevlm.train.run import fresh_model
    from pretrained_fixtures import IMAGE_TOKEN_ID, NUM_PATCHES, tiny_llava

    folder = tiny_llava(tmp_path / "llava", strategy="full", feature_layer=-1)
    config = load_config("tiny", overrides=[f"model.vision=hf:{folder}", f"model.lm=hf:{folder}"])
    bundle = fresh_model(config)
    model = bundle.model.eval()
    assert (bundle.config.model.vision.feature_layer, bundle.config.model.vision.keep_cls) == (-1, True)
    reference = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = model.vision.pixel_mean.view(1, 3, 1, 1), model.vision.pixel_std.view(1, 3, 1, 1)
    ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * (NUM_PATCHES + 1) + [80, 90, 100]] * 2)
    with torch.no_grad():
        theirs = reference(input_ids=ids, pixel_values=((images + 1) / 2 - mean) / std).logits
        ours = model(images, ids).logits
    torch.testing.assert_close(ours, theirs)


def test_stage_moe_on_a_fresh_dense_lm_upcycles_every_ffn_and_starts_where_the_dense_lm_is(pretrained_parts):
    from moevlm.train.run import fresh_model

    def build(stage):
        config = load_config("tiny", overrides=[f"model.vision=hf:{pretrained_parts['clip']}",
                                                f"model.lm=hf:{pretrained_parts['gpt2']}", f"train.stage={stage}"])
        return fresh_model(config)

    dense, moe = build("pretrain"), build("moe")
    assert moe.config.model.decoder.moe_layer_indices == [0, 1] and not dense.model.moe_layers
    assert moe.config.model.decoder.moe.activation == "gelu_tanh"
    moe.model.projector.load_state_dict(dense.model.projector.state_dict())
    ids = torch.tensor([[0] + [dense.model.image_token_id] * 16 + [70, 80, 90]])
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(moe.model.eval()(images, ids).logits, dense.model.eval()(images, ids).logits)


def test_resume_of_an_instruct_run_with_lora_ends_where_an_uninterrupted_run_does(pretrained_parts, data, tmp_path,
                                                                                    monkeypatch):
    from moevlm.train.trainer import Trainer

    extra = ["decoder.lora_rank=2", "train.max_steps=4", "train.checkpoint_every=2"]
    straight, _ = train(stage_config(pretrained_parts, "instruct", extra=extra), data["conversations"], tmp_path / "a")
    stop = Trainer.save

    def save_then_stop(self):
        stop(self)
        if self.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(stage_config(pretrained_parts, "instruct", extra=extra), data["conversations"], tmp_path / "b")
    monkeypatch.setattr(Trainer, "save", stop)
    resumed, _ = train(load_config("tiny"), data["conversations"], tmp_path / "b", resume=True)
    assert resumed.step == 4
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_lora_stage_after_pretrain_still_references_the_base_weights(pretrained_parts, data, tmp_path):
    train(stage_config(pretrained_parts, "pretrain"), data["captions"], tmp_path / "pre")
    model_section = json.loads((tmp_path / "pre" / "config.json").read_text())["model"]
    config = stage_config(pretrained_parts, "instruct", model=model_section, extra=["decoder.lora_rank=2"])
    train(config, data["conversations"], tmp_path / "lora", from_dir=tmp_path / "pre")
    saved = set(load_file(str(tmp_path / "lora" / WEIGHTS)))
    assert any("lora_" in n for n in saved) and not any("base_layer" in n for n in saved)
    refs = json.loads((tmp_path / "lora" / PRETRAINED).read_text())
    assert any("base_layer" in n for n in refs["untouched"])
    load_model(tmp_path / "lora")


@pytest.mark.parametrize("lm,lora", [("llama", False), ("llama_tied", False), ("llama_tied", True)])
def test_pretrain_instruct_moe_caption_through_the_cli(pretrained_parts, data, tmp_path, lm, lora):
    """The recipe as a user runs it. A tied LM head learns with the embedding in stage instruct
    (unless LoRA adapters learn instead), so it is saved, not referenced, and each checkpoint loads."""
    from moevlm.cli import main

    common = ["--preset", "tiny", "--no-tracking", "--set", "train.batch_size=4", "--set", "train.max_steps=2",
              "--set", "train.warmup_steps=1", "--set", "decoder.max_text_len=96", "--set", "train.val_generate=1"]
    sources = ["--set", f"model.vision=hf:{pretrained_parts['siglip']}", "--set", f"model.lm=hf:{pretrained_parts[lm]}"]
    pre, sft, moe = tmp_path / "pre", tmp_path / "sft", tmp_path / "moe"
    conversations = str(data["conversations"])
    assert main(["train", "--data", str(data["captions"]), "--out", str(pre), "--stage", "pretrain", *sources,
                 *common]) == 0
    lora_rank = ["--set", "decoder.lora_rank=2"] if lora else []
    assert main(["train", "--data", conversations, "--out", str(sft), "--stage", "instruct", "--from", str(pre),
                 *common, *lora_rank]) == 0

    head, embedding = "lm.lm_head.weight", "lm.model.embed_tokens.weight"
    untouched = set(json.loads((sft / PRETRAINED).read_text())["untouched"])
    saved = set(load_file(str(sft / WEIGHTS)))
    model = load_model(sft)[0]
    source = load_file(str(next(Path(pretrained_parts[lm]).glob("*.safetensors"))))["model.embed_tokens.weight"]
    if lora:
        assert {head, embedding} <= untouched and not {head, embedding} & saved
        assert torch.equal(model.lm.lm_head.weight, source)
    else:
        assert not {head, embedding} & untouched
        assert embedding in saved and (head in saved) == (lm == "llama")
        assert not torch.equal(model.lm.model.embed_tokens.weight, source)  # it learned
    if lm == "llama_tied":
        assert model.lm.lm_head.weight.data_ptr() == model.lm.model.embed_tokens.weight.data_ptr()

    assert main(["eval", "--model", str(sft), "--data", conversations]) == 0
    assert main(["train", "--data", conversations, "--out", str(moe), "--stage", "moe", "--from", str(sft),
                 *common]) == 0
    assert main(["caption", "--model", str(moe), str(data["captions"].parent / "000.png")]) == 0


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_tower_weights_the_image_tokens_never_use_are_frozen_even_when_the_tower_trains(pretrained_parts, vision):
    config = prepare_config(load_config("tiny", overrides=[f"model.vision=hf:{pretrained_parts[vision]}",
                                                           "decoder.vocab_size=30", "train.trainable=[vision]"]))
    model = build_model(config.model)
    model.vision(torch.zeros(1, 3, config.model.vision.image_size, config.model.vision.image_size)).sum().backward()
    without_gradient = {f"vision.{name}" for name, p in model.vision.named_parameters() if p.grad is None}
    assert without_gradient and {f"vision.{name}" for name in model.vision.unused_parameters()} == without_gradient
    freeze_for_stage(model, config.train)
    frozen = {name for name, p in model.named_parameters() if name.startswith("vision.") and not p.requires_grad}
    assert frozen == without_gradient


def test_a_fresh_stage_moe_upcycles_every_layer_of_the_pretrained_lm_not_of_the_preset(tmp_path):
    # tiny's decoder has 2 layers; the LM has 3: all 3 become MoE layers.
    from pretrained_fixtures import tiny_llama

    lm = tiny_llama(tmp_path / "llama3", num_hidden_layers=3)
    config = load_config("tiny", overrides=["train.stage=moe", f"model.lm=hf:{lm}"])
    prepared = prepare_config(config)
    assert prepared.model.decoder.depth == 3
    assert prepared.model.decoder.moe_layer_indices == [0, 1, 2]
