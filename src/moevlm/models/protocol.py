"""The interface every moevlm model offers to training, generation, evaluation and checkpoints.

Two classes implement it: ``VLM`` (models/vlm.py: a decoder trained from scratch, image tokens
prepended to the text) and ``PretrainedVLM`` (models/hf_lm.py: a transformers causal LM, image
tokens marked in the text by ``image_token_id``). Code outside models/ names this protocol, never
one of the two classes, so either works wherever a model is expected.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moevlm.config import ModelConfig
from moevlm.models.moe import MoE
from moevlm.models.vlm import HeadLoss, VLMOutput


class VisionLanguageModel(Protocol):
    cfg: ModelConfig
    num_image_tokens: int
    # True: input_ids hold num_image_tokens copies of image_token_id where the image goes;
    # False: the model puts its image tokens before the text itself.
    images_in_text: bool
    image_token_id: int | None
    training: bool
    # None: the model's own head and cross-entropy; set by the trainer for a head split over ranks.
    head_loss: HeadLoss | None

    def __call__(self, images: torch.Tensor | None, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 has_image: torch.Tensor | None = None, label_smoothing: float = 0.0) -> VLMOutput:
        """Training and evaluation: logits at the text positions, loss given next-token labels.
        has_image (B,) bool: False marks text-only rows of a mixed batch (their image is ignored).
        label_smoothing: the share of each target spread over the vocabulary (training loss)."""

    @property
    def moe_layers(self) -> list[MoE]: ...

    def expert_load(self) -> torch.Tensor:
        """Routed token counts of the last forward: (MoE layers, 2 [image, text], experts)."""

    def new_cache(self, batch: int, max_len: int) -> Any: ...

    def prefill(self, images: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: Any = None, has_image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts -> next-token logits (B, V) and the key mask (B, S). has_image as in
        training: False marks a text-only row (images None: no row has one). A model with
        ``images_in_text`` takes the images of every row, in order, as many as the image ids ask for."""

    def step(self, token_ids: torch.Tensor, key_mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """One cached decoding step: token_ids (B,) -> next-token logits (B, V)."""

    def new_static_cache(self, batch: int, max_len: int) -> Any:
        """A preallocated cache for ``decode_step``, which ``prefill`` also fills (from slot 0); its
        ``tensors()`` are what a CUDA graph must find at fixed addresses."""

    def decode_step(self, token_ids: torch.Tensor, key_mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """``step`` with static shapes for a compiled decoding step (moevlm.compiled): key_mask
        (B, max_len) is updated in place to show the slot the tokens are written to."""

    def parameters(self, recurse: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...
