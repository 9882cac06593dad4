"""A transformers causal LM joined to a vision encoder as LLaVA does (``PretrainedVLM``).

References: LLaVA-1.5 (Liu et al. 2023) and transformers' ``LlavaForConditionalGeneration``,
whose layout this follows: placeholder ids in the text whose embeddings are replaced by the
projected image features. litgpt's LLaVA parity tests are the model for tests/models/test_parity.py.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from moevlm.config import ModelConfig
from moevlm.models.hf_config import hf_config_object, is_resolved
from moevlm.models.hf_vision import HFVisionTower
from moevlm.models.moe import IMAGE, PAD, TEXT, MoE
from moevlm.models.moe_install import MoEMLP, TokenKinds, install_moe_layers
from moevlm.models.projector import build_projector
from moevlm.models.vit import ViT
from moevlm.models.vlm import HeadLoss, VLMOutput, attention_mask_for, expert_load, labelled_positions, vlm_output


class StaticLMCache:
    """transformers' ``StaticCache`` for a compiled decoding step (moevlm.compiled), with the slot it
    writes next as a tensor (the column of the caller's key mask). Reused from one generation to the
    next: ``prefill`` resets it."""

    def __init__(self, lm_config, max_len: int, device):
        # Lazy: transformers takes seconds to import.
        from transformers import StaticCache

        self.cache = StaticCache(config=lm_config, max_cache_len=max_len)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.max_len = max_len

    def tensors(self) -> list[torch.Tensor]:
        """What a CUDA graph must find at fixed addresses (transformers marks its own layers)."""
        return [self.slot]


class PretrainedVLM(nn.Module):
    """A vision encoder, a projector and a transformers causal LM (``vision``, ``projector``,
    ``lm``), joined as LLaVA does: input_ids hold ``image_token_id`` at the image positions
    (``num_image_tokens`` of them per sample) and their embeddings become the projected image
    features. Same interface as ``VLM``: forward, moe_layers, expert_load, new_cache,
    prefill, step. MoE layers (decoder.moe_layer_indices) replace the LM's dense MLPs
    (models/moe_install.py); each learns which tokens are image / text / padding from
    ``token_kind``, handed over for each LM call (``TokenKinds``)."""

    images_in_text = True

    def __init__(self, cfg: ModelConfig, vision: nn.Module | None = None, lm: nn.Module | None = None):
        """``vision`` / ``lm`` None: random weights from the configs (a checkpoint overwrites them)."""
        super().__init__()
        assert is_resolved(cfg) and cfg.decoder.pretrained is not None, "resolve_pretrained(cfg) first"
        self.cfg = cfg
        self.num_image_tokens = cfg.vision.num_image_tokens
        self.image_token_id = cfg.decoder.image_token_id
        if vision is None:
            vision = (HFVisionTower.build(cfg.vision, load_weights=False) if cfg.vision.pretrained is not None
                      else ViT(cfg.vision))
        self.vision = vision
        self.projector = build_projector(cfg.projector, cfg.vision.width, cfg.decoder.width)
        if lm is None:
            # Lazy: transformers takes seconds to import.
            from transformers import AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_config(hf_config_object(cfg.decoder.hf_config), dtype=torch.float32)
        self.lm = lm
        # transformers renamed past_key_values to cache during 5.x; speak whichever this LM takes.
        self._cache_arg = "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"
        self.token_kinds = TokenKinds()  # shared with the MoE layers installed in the LM
        self.head_loss: HeadLoss | None = None
        if cfg.decoder.moe_layer_indices:
            install_moe_layers(self.lm, cfg.decoder, self.token_kinds)

    # -- MoE bookkeeping ------------------------------------------------------------------
    @property
    def moe_layers(self) -> list[MoE]:
        # Looked up each time: upcycle() and LoRA wrapping change the LM after construction.
        return [m.moe for m in self.lm.modules() if isinstance(m, MoEMLP)]

    def expert_load(self) -> torch.Tensor:
        """Routed token counts of the last forward: (MoE layers, 2 [image, text], experts)."""
        return expert_load(self.moe_layers)

    # -- the shared pieces of forward / prefill / step ------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [-1, 1] -> image tokens in the LM's space (B, n_img, D)."""
        return self.projector(self.vision(images))

    def _embed(self, images: torch.Tensor | None, input_ids: torch.Tensor, text_mask: torch.Tensor,
               has_image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, T, D) with image features at the image ids, and token kinds (B, T).
        ``has_image`` False: a text-only row (no image ids; its image is ignored)."""
        is_image = input_ids == self.image_token_id
        # The image id may lie outside the embedding table (default: the vocabulary size).
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        if images is not None and has_image is not None and not bool(has_image.all()):
            images = images[has_image.bool()] if bool(has_image.any()) else None  # the image rows' only
        if images is not None:
            counts = is_image.sum(1)
            assert bool((counts % self.num_image_tokens == 0).all()) and \
                int(counts.sum()) == images.size(0) * self.num_image_tokens, (
                f"{images.size(0)} images need {self.num_image_tokens} image ids ({self.image_token_id}) each, "
                f"got {counts.tolist()}")
            # (images, n, D): the rows' images in order, several per row where the ids say so.
            features = self.encode_images(images).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features)
        else:
            assert not bool(is_image.any()), "image ids in input_ids but no images"
        kind = torch.where(text_mask, torch.where(is_image, IMAGE, TEXT), PAD)
        return embeds, kind

    def _run_lm(self, embeds: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor,
                kind: torch.Tensor | None, cache=None, keep: int | torch.Tensor | None = None) -> torch.Tensor:
        """The LM's logits at the positions ``keep`` says (transformers' ``logits_to_keep``: the last
        n, or these indices, in every row; None: all). The LM's own head computes them, with
        whatever it does after the matmul (Gemma's soft-capping, Cohere's scale). key_mask: (B, S)
        True on real tokens, or a full bool mask (B, 1, T, S) that the LM takes as it is."""
        extra = {self._cache_arg: cache, **({"logits_to_keep": keep} if keep is not None else {})}
        mask = key_mask.long() if key_mask.dim() == 2 else self._full_mask(key_mask)
        if kind is None:  # a compiled step: every token is text, and no context manager to trace
            return self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           use_cache=cache is not None, **extra).logits
        with self.token_kinds.given(kind):
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          use_cache=cache is not None, **extra)
        return out.logits

    def _run_body(self, embeds: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor,
                  kind: torch.Tensor) -> torch.Tensor:
        """The LM without its head: the final hidden states (B, T, D), for ``head_loss``."""
        with self.token_kinds.given(kind):
            return self.lm.base_model(inputs_embeds=embeds, attention_mask=key_mask.long(), position_ids=positions,
                                      use_cache=False).last_hidden_state

    def _full_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        # SDPA takes a bool mask; transformers' eager attention adds the mask to the scores.
        if self.lm.config._attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=self.lm.dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(self.lm.dtype).min)

    # -- training / evaluation -------------------------------------------------------------
    def forward(self, images: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                has_image: torch.Tensor | None = None, label_smoothing: float = 0.0) -> VLMOutput:
        """images (B, C, S, S) (None for text only); input_ids, attention_mask, labels (B, T),
        labels being next-token targets aligned with input_ids (-100: no loss); given labels, logits
        are computed at the labelled positions only (``VLMOutput.logits``: (N, V)). has_image (B,)
        False marks a text-only row in a mixed batch (None: every row has an image)."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        embeds, kind = self._embed(images, input_ids, mask, has_image)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # real tokens only: left padding is invisible
        if labels is None:
            return vlm_output(self._run_lm(embeds, mask, positions, kind), None, self.moe_layers,
                              self.cfg.decoder.moe)
        # The LM's head runs at the columns labelled in any row, the loss takes each row's own.
        labelled = labelled_positions(labels)
        if self.head_loss is not None and self.training:
            hidden = self._run_body(embeds, mask, positions, kind)[labelled]
            logits, lm_loss = self.head_loss(hidden, labels[labelled], label_smoothing)
            return vlm_output(logits, labels[labelled], self.moe_layers, self.cfg.decoder.moe, lm_loss=lm_loss)
        columns = labelled.any(0).nonzero().squeeze(1)
        logits = self._run_lm(embeds, mask, positions, kind, keep=columns)
        return vlm_output(logits[labelled[:, columns]], labels[labelled], self.moe_layers, self.cfg.decoder.moe,
                          label_smoothing)

    # -- generation ------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int):
        """A transformers DynamicCache (it grows as needed; batch and max_len are not used)."""
        # Lazy: transformers takes seconds to import.
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.config)

    def prefill(self, images: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache=None, has_image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts (image ids included) -> next-token logits (B, V), key mask (B, T).
        ``images``: every image the ids ask for, row by row (has_image None), or one per row."""
        mask = attention_mask.bool()
        embeds, kind = self._embed(images, input_ids, mask, has_image)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        if isinstance(cache, StaticLMCache):
            # The static layers hand back all max_len slots: a full mask over them, empty ones hidden.
            T = mask.size(1)
            cache.cache.reset()
            full = F.pad(attention_mask_for(mask, T), (0, cache.max_len - T))
            logits = self._run_lm(embeds, full, positions, kind, cache.cache, keep=1)
            cache.slot.fill_(T)
        else:
            logits = self._run_lm(embeds, mask, positions, kind, cache, keep=1)
        return logits[:, -1], mask

    def step(self, token_ids: torch.Tensor, key_mask: torch.Tensor, cache) -> torch.Tensor:
        """One cached decoding step. token_ids (B,); key_mask (B, S) includes the new token."""
        positions = key_mask.long().sum(1, keepdim=True) - 1  # (B, 1)
        embeds = self.lm.get_input_embeddings()(token_ids[:, None])
        kind = torch.full_like(positions, TEXT)
        return self._run_lm(embeds, key_mask, positions, kind, cache, keep=1)[:, -1]

    def new_static_cache(self, batch: int, max_len: int) -> StaticLMCache:
        """A ``StaticLMCache``; its batch is that of the first prefill (``batch`` is not used)."""
        return StaticLMCache(self.lm.config, max_len, next(self.lm.parameters()).device)

    def decode_step(self, token_ids: torch.Tensor, key_mask: torch.Tensor, cache: StaticLMCache) -> torch.Tensor:
        """``step`` with static shapes, for ``torch.compile`` (moevlm.compiled): token_ids (B,) go to
        ``cache.slot``; key_mask (B, cache.max_len) is updated in place to show that slot."""
        key_mask.index_fill_(1, cache.slot, True)
        positions = key_mask.long().sum(1, keepdim=True) - 1
        embeds = self.lm.get_input_embeddings()(token_ids[:, None])
        logits = self._run_lm(embeds, key_mask[:, None, None, :], positions, None, cache.cache, keep=1)
        cache.slot.add_(1)
        return logits[:, -1]
