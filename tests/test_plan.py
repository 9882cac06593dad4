"""moevlm plan: exact parameter counts from a meta-device build, the activation formula against the
tensors autograd keeps, per-rank bytes against a real training step's peak memory, and the verdicts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import SiglipVisionConfig

from moevlm.cli import main
from moevlm.config import load_config
from moevlm.models.factory import build_model
from moevlm.plan import make_plan, parse_bytes, render
from moevlm.plan.activations import activation_parts, row_shape
from moevlm.plan.counts import count, meta_model
from moevlm.plan.memory import CPU_RUNTIME, planned_config
from moevlm.train.distributed import repeated_blocks
from moevlm.train.stages import freeze_for_stage
from pretrained_fixtures import llama_config

CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_check.py"
MiB = 2 ** 20


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """config.json-only folders (no weights: the plan reads none)."""
    folder = tmp_path_factory.mktemp("sources")
    llama_config(300, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(folder / "llama")
    # A vocabulary large enough that the head keeps more than the blocks (as at real shapes).
    # (and more layers than the preset's decoder.depth, which the source's own replaces)
    llama_config(5000, hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False).save_pretrained(folder / "vocab")
    SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                       num_attention_heads=4).save_pretrained(folder / "siglip")
    return folder


def kept_by_autograd(model, images, ids, labels, checkpointing="none") -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward of one forward
    (with ``checkpointing``: also the inputs the recomputed modules keep)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and tensor.device.type != "meta":
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    recomputed = checkpointed_modules(model, checkpointing)
    for module in recomputed:
        forward = module.forward

        def keep_inputs(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled() and any(t.requires_grad for t in args if isinstance(t, torch.Tensor)):
                for tensor in args:
                    if isinstance(tensor, torch.Tensor):
                        pack(tensor)
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        module.forward = keep_inputs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images, ids, torch.ones_like(ids, dtype=torch.bool), labels)
    for module in recomputed:
        del module.forward
    return sum(kept.values())


def checkpointed_modules(model, mode):
    """What train.activation_checkpointing recomputes: every block (full) or each block's feed-forward
    (selective), as the plan assumes."""
    blocks = repeated_blocks(model)
    if mode == "full":
        return blocks
    if mode == "selective":
        return [getattr(block, "mlp", None) or block.ffn for block in blocks]
    return []


def real_model(config, batch):
    """``config``'s model on the CPU with random weights, frozen for its stage, and a batch of longest rows."""
    torch.manual_seed(0)
    model = build_model(config.model, load_weights=False)
    model.train()
    freeze_for_stage(model, config.train)
    shape = row_shape(config, None)
    text = shape.decoder_tokens - (0 if model.images_in_text else shape.image_tokens)
    ids = torch.randint(0, config.model.decoder.vocab_size, (batch, text))
    labels = ids.clone()
    if model.images_in_text:
        ids[:, :shape.image_tokens] = config.model.decoder.image_token_id
        labels[:, :shape.image_tokens] = -100
    size = config.model.vision.image_size
    return model, torch.rand(batch, 3, size, size) * 2 - 1, ids, labels


CASES = {
    "scratch llama + MoE": ("tiny", []),
    "scratch gpt, dense": ("tiny", ["decoder.arch=gpt", "vision.arch=vit", "moe.layers=none", "decoder.width=64"]),
    "scratch llama, shared expert": ("tiny", ["moe.shared_expert=true", "decoder.ffn_hidden=96"]),
    "llama + siglip, instruct": ("llava", ["model.lm=hf:{llama}", "model.vision=hf:{siglip}", "train.stage=instruct"]),
    "llama + siglip, pretrain": ("llava", ["model.lm=hf:{llama}", "model.vision=hf:{siglip}", "train.stage=pretrain"]),
    "llama + siglip, full": ("llava", ["model.lm=hf:{llama}", "model.vision=hf:{siglip}", "train.stage=full"]),
    "llama with a large vocabulary": ("llava", ["model.lm=hf:{vocab}", "model.vision=hf:{siglip}",
                                                "train.stage=instruct"]),
    "6-layer llama, moe every other layer": ("llava", ["model.lm=hf:{vocab}", "model.vision=hf:{siglip}",
                                                       "train.stage=moe", "moe.layers=every-other"]),
    "llama + siglip, moe": ("llava", ["model.lm=hf:{llama}", "model.vision=hf:{siglip}", "train.stage=moe"]),
}


def case_config(name, sources):
    preset, overrides = CASES[name]
    overrides = [o.format(llama=sources / "llama", vocab=sources / "vocab", siglip=sources / "siglip")
                 for o in overrides]
    return load_config(preset, overrides=overrides + ["decoder.max_text_len=40", "train.batch_size=2"])


@pytest.mark.parametrize("name", list(CASES))
def test_counts_from_the_meta_device_equal_the_built_models(name, sources):
    config = planned_config(case_config(name, sources))
    counts = count(meta_model(config))
    model = real_model(config, 1)[0]
    assert counts.params == sum(p.numel() for p in model.parameters())
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.params == sum(b.params for b in counts.blocks) + counts.root


@pytest.mark.parametrize("name", list(CASES))
def test_the_activation_formula_is_within_12_percent_of_what_autograd_keeps(name, sources):
    config = planned_config(case_config(name, sources))
    counts = count(meta_model(config))
    formula, _ = activation_parts(config, counts, row_shape(config, None), "none", 4)
    model, images, ids, labels = real_model(config, 2)
    assert 2 * formula == pytest.approx(kept_by_autograd(model, images, ids, labels), rel=0.12)


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("name", ["scratch llama + MoE", "scratch gpt, dense", "llama + siglip, instruct",
                                  "llama + siglip, full"])
def test_what_checkpointing_keeps_is_within_15_percent_of_the_formula(name, mode, sources):
    config = planned_config(case_config(name, sources))
    counts = count(meta_model(config))
    formula, _ = activation_parts(config, counts, row_shape(config, None), mode, 4)
    model, images, ids, labels = real_model(config, 2)
    assert 2 * formula == pytest.approx(kept_by_autograd(model, images, ids, labels, mode), rel=0.15)


def test_a_frozen_tower_keeps_nothing_and_checkpointing_keeps_less(sources):
    config = planned_config(case_config("llama + siglip, instruct", sources))
    counts = count(meta_model(config))
    assert {b.grad for b in counts.blocks if b.stack == "vision"} == {"none"}
    assert {b.grad for b in counts.blocks if b.stack == "decoder"} == {"train"}
    pretrain = count(meta_model(planned_config(case_config("llama + siglip, pretrain", sources))))
    assert {b.grad for b in pretrain.blocks if b.stack == "decoder"} == {"through"}
    shape = row_shape(config, 1024)
    none, full, selective = (sum(activation_parts(config, counts, shape, mode, 4)) for mode in
                             ("none", "full", "selective"))
    assert full < selective < none


def measured_peak(preset, overrides, seq_len=None) -> float:
    """benchmarks/plan_check.py's measurement: a fresh process, two fp32 training steps, peak RSS above
    the imports'."""
    spec = json.dumps({"preset": preset, "overrides": overrides, "seq_len": seq_len})
    done = subprocess.run([sys.executable, str(CHECK), "--child", spec], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["measured"]


LONG_ROWS = ["decoder.max_text_len=256"]


def test_the_plan_is_within_25_percent_of_a_real_steps_peak_and_its_verdicts_hold():
    # Large enough that the tensors make most of the peak, not the runtime's own memory: the plan counts
    # 94 MiB for it, and a step has measured anywhere from 36 to 94 MiB of it on the same machine.
    budget = parse_bytes("800MiB")
    plan = make_plan(load_config("tiny", overrides=LONG_ROWS + ["train.batch_size=8"]), 1, budget, device="cpu")
    row = plan.rows[0]
    assert (row.strategy, row.checkpointing) == ("one process", "none")
    fits = row.max_batch
    assert 50 < fits < 200
    at_fits = measured_peak("tiny", LONG_ROWS + [f"train.batch_size={fits}"])
    planned = make_plan(load_config("tiny", overrides=LONG_ROWS + [f"train.batch_size={fits}"]), 1, budget,
                        device="cpu").rows[0]
    assert planned.fits and planned.peak == pytest.approx(at_fits, rel=0.25)
    assert at_fits <= budget  # the batch the plan says fits does fit
    over = 2 * fits
    beyond = make_plan(load_config("tiny", overrides=LONG_ROWS + [f"train.batch_size={over}"]), 1, budget,
                       device="cpu").rows[0]
    assert not beyond.fits
    assert measured_peak("tiny", LONG_ROWS + [f"train.batch_size={over}"]) > budget  # and twice that does not


def test_sharding_and_checkpointing_divide_as_described():
    config = load_config("base", overrides=["train.batch_size=16"])
    one = make_plan(config, 1, parse_bytes("80GB"))
    eight = make_plan(config, 8, parse_bytes("80GB"))
    single = one.rows[0]
    rows = {(r.strategy, r.expert_parallel, r.checkpointing): r for r in eight.rows}
    assert set(rows) == {(s, ep, m) for s in ("ddp", "fsdp") for ep in (1, 8) for m in ("none", "full", "selective")}
    c = eight.counts
    assert rows["ddp", 1, "none"].optimizer == single.optimizer == (8 + 4) * c.trainable  # AdamW + the average
    assert rows["fsdp", 1, "none"].weights == pytest.approx(4 * c.params / 8)
    assert rows["ddp", 8, "none"].weights == pytest.approx(4 * (c.params - c.experts + c.experts / 8))
    # 2 rows per rank of 8 against 16 rows in one process: an eighth of the activations.
    assert rows["ddp", 1, "none"].activations == pytest.approx(single.activations / 8)
    largest = {mode: rows["fsdp", 1, mode].max_batch for mode in ("none", "full", "selective")}
    assert largest["full"] > largest["selective"] > largest["none"]


def test_cpu_mode_counts_the_runtime_and_fp32_activations():
    config = load_config("tiny")
    cpu, gpu = make_plan(config, 1, parse_bytes("1GB"), device="cpu"), make_plan(config, 1, parse_bytes("1GB"))
    assert cpu.rows[0].buffers == CPU_RUNTIME
    assert cpu.rows[0].activations > 1.5 * gpu.rows[0].activations
    assert gpu.usable == pytest.approx(0.9e9 - 2 ** 30)


@pytest.mark.parametrize("text,value", [("80GB", 80e9), ("24GiB", 24 * 2 ** 30), ("24G", 24 * 2 ** 30),
                                        ("512 MiB", 512 * MiB), ("1.5GB", 1.5e9)])
def test_memory_sizes(text, value):
    assert parse_bytes(text) == value


def test_the_command_prints_a_table(capsys):
    assert main(["plan", "--preset", "base", "--gpus", "4", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "strategy  ep  checkpointing" in out and "fsdp" in out and "8 row(s) of 177 tokens per rank" in out
    assert main(["plan", "--preset", "tiny", "--world-size", "2", "--gpu-memory", "1GB", "--device", "cpu"]) == 0


@pytest.mark.parametrize("args,message", [
    (["--gpu-memory", "80XB"], "moevlm: error: --gpu-memory '80XB': expected a positive size such as 80GB, 24GiB or "
                               "512MB\n"),
    (["--gpu-memory", "0GB"], "moevlm: error: --gpu-memory '0GB': expected a positive size such as 80GB, 24GiB or "
                              "512MB\n"),
    (["--gpu-memory", "8GB", "--gpus", "3"], "moevlm: error: train.batch_size 8 must be divisible by the 3 ranks "
                                             "(each rank takes batch_size / world size rows)\n"),
    (["--gpu-memory", "8GB", "--gpus", "0"], "moevlm: error: --gpus must be at least 1, not 0\n"),
    (["--gpu-memory", "8GB", "--gpus", "2", "--set", "dist.expert_parallel=3"],
     "moevlm: error: dist.expert_parallel=3 must divide the 2 ranks and moe.num_experts (4)\n"),
    (["--gpu-memory", "8GB", "--seq-len", "0"], "moevlm: error: --seq-len must be at least 1, not 0\n"),
    (["--gpu-memory", "8GB", "--set", "model.lm=hf:/no/such/folder"], None),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    assert main(["plan", "--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moevlm: error: ")
    if message is not None:
        assert err == message


def test_the_table_names_each_column():
    text = render(make_plan(load_config("tiny"), 2, parse_bytes("1GB")))
    assert text.splitlines()[5].split() == ["strategy", "ep", "checkpointing", "weights", "grads", "optimizer",
                                            "buffers", "activations", "peak", "fits", "max", "batch/rank"]


def test_stage_moe_upcycles_the_layers_of_the_source_not_of_the_preset(sources):
    counts = count(meta_model(planned_config(case_config("6-layer llama, moe every other layer", sources))))
    assert [b.moe for b in counts.blocks if b.stack == "decoder"] == [False, True] * 3
    assert [b.grad for b in counts.blocks if b.stack == "decoder"] == ["none"] + ["train", "through"] * 2 + ["train"]
