"""The random streams a checkpoint keeps, so that a resumed run draws the same router noise and dropout
as one never stopped: rank 0's (and its GPU's) state, and each other rank's own seed."""

from __future__ import annotations

import base64

import numpy as np
import torch


def rng_state(device: torch.device) -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Router noise and dropout of rank > 0 (rank 0 goes on from the weights' initialisation, as one process)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8),
                                 device)
