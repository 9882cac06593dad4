"""moe.capacity_factor: the share of real assignments over capacity is reported per MoE layer,
in the training log (dropped there) and by eval --json (what training would drop)."""

import json

from moevlm.cli import main
from moevlm.config import load_config
from moevlm.train.run import run_training


def test_dropped_assignments_are_logged_in_training_and_reported_by_eval(shapes_csv, tmp_path, capsys):
    # Capacity 0.5 gives the experts slots for half the assignments at most: at least about
    # half are over capacity in every batch, whatever the routing.
    config = load_config("tiny", overrides=["moe.capacity_factor=0.5", "train.max_steps=5", "train.log_every=5",
                                            "train.eval_every=5", "train.checkpoint_every=5"])
    trainer, _ = run_training(config, shapes_csv, tmp_path / "run", tracking=False, progress=False)
    layers = config.model.decoder.moe_layer_indices
    assert layers == [0, 1]
    for i in layers:
        [(step, share)] = trainer.history[f"train/dropped/layer_{i}"]
        assert step == 5 and 0.4 < share < 1
    capsys.readouterr()  # what training printed
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(shapes_csv), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["dropped"]) == {"layer_0", "layer_1"}
    assert all(0.4 < share < 1 for share in result["dropped"].values())
