"""The vision-language model: ViT -> projector -> image tokens, prepended to the text tokens
of an MoE decoder. ``forward`` is the training/eval path; ``prefill`` and ``step`` are the two
pieces ``moevlm.generate`` needs.

Sequence layout (S = image tokens + text tokens):
    [img_1 .. img_n][<bos> prompt <sep> answer <eos>][<pad> ...]     training (right padding)
    [img_1 .. img_n][<pad> ...][<bos> prompt <sep>]                   generation (pads before text)
Position ids count real tokens only, so both layouts give the text the same positions.

The vision encoder is our ``ViT`` trained from scratch or, with ``vision.pretrained`` set, a
pretrained CLIP/SigLIP tower (``models.hf_vision.HFVisionTower``); build either through
``models.factory.build_model``. A pretrained LM instead makes a ``PretrainedVLM``, which
shares this model's interface (forward, prefill, step, moe_layers, expert_load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moevlm.config import ModelConfig, MoEConfig
from moevlm.models.attention import KVCache, StaticKVCache
from moevlm.models.decoder import Decoder
from moevlm.models.hf_vision import HFVisionTower
from moevlm.models.moe import IMAGE, PAD, TEXT, MoE
from moevlm.models.projector import build_projector
from moevlm.models.vit import ViT

# Labels' "no loss here" value: cross_entropy's default ignore_index, which moevlm.data writes.
IGNORE_INDEX = -100


@dataclass
class VLMOutput:
    # Without labels: (B, T, V) at the text positions. With labels: (N, V) at the N labelled
    # positions only (labels != -100, row by row), the only ones the loss reads.
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + weighted aux losses
    lm_loss: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # balance, z (means over MoE layers)


class HeadLoss(Protocol):
    """The LM head and its cross-entropy in one, at the labelled positions, for a head whose weight
    is split over processes: the trainer fills a model's ``head_loss`` in (moevlm.train.vocab_parallel)
    and the model calls it in training mode instead of its head and ``F.cross_entropy``."""

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor,
                 label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (N, D) and labels (N,) at the labelled positions -> (logits, lm_loss): this
        process's part of the logits, and the mean cross-entropy over the N positions."""


def attention_mask_for(key_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Causal mask over the last ``num_queries`` of S positions, hiding padded keys.

    key_mask: bool (B, S), True on real tokens. Returns bool (B, 1, Q, S). Every query may see
    itself, so a padded query never has an all-masked row (which SDPA turns into NaN).
    """
    B, S = key_mask.shape
    q_pos = torch.arange(S - num_queries, S, device=key_mask.device)
    k_pos = torch.arange(S, device=key_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (Q, S)
    mask = causal[None] & key_mask[:, None, :]
    mask |= k_pos[None, None, :] == q_pos[None, :, None]
    return mask.unsqueeze(1)


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """bool (B, T): the positions whose next token is learnt. Image, prompt and padding positions
    need no logits in training: the LM head (a vocabulary-wide matmul, and the fp32 logits the loss
    keeps for its backward) runs on these only."""
    return labels != IGNORE_INDEX


def vlm_output(logits: torch.Tensor, labels: torch.Tensor | None, moe_layers: list[MoE],
               moe: MoEConfig, label_smoothing: float = 0.0, lm_loss: torch.Tensor | None = None) -> VLMOutput:
    """Logits (..., V) -> VLMOutput with the aux losses of the forward that just ran and,
    given labels (next-token targets aligned with the logits, (...)), loss = CE + weighted aux
    (CE against targets smoothed by ``label_smoothing``; ``lm_loss``: that CE, computed already)."""
    out = VLMOutput(logits=logits, aux=moe_aux(moe_layers))
    if labels is not None:
        out.lm_loss = lm_loss if lm_loss is not None else F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing)
        out.loss = out.lm_loss
        if out.aux:
            out.loss = out.loss + weighted_aux(out.aux, moe)
    return out


def weighted_aux(aux: dict[str, torch.Tensor], moe: MoEConfig) -> torch.Tensor | float:
    """The aux losses' part of the loss (``vlm_output``'s ``loss - lm_loss``); 0 without them."""
    return moe.aux_loss_coef * aux["balance"] + moe.z_loss_coef * aux["z"] if aux else 0.0


def moe_aux(layers: list[MoE]) -> dict[str, torch.Tensor]:
    """Balance and z losses, each the mean over the MoE layers; empty outside training mode.

    Switch Transformer and ST-MoE add one loss per layer instead: to match their coefficient c,
    set moe.aux_loss_coef / moe.z_loss_coef to c x (number of MoE layers)."""
    if not layers or not layers[0].aux:  # aux losses exist in training mode only
        return {}
    return {name: torch.stack([layer.aux[name] for layer in layers]).mean() for name in ("balance", "z")}


def expert_load(layers: list[MoE]) -> torch.Tensor:
    """Assignments each expert computed in the last forward, padding and dropped ones not
    counted: (MoE layers, 2 [image, text], experts)."""
    if not layers:
        return torch.zeros(0, 2, 0, dtype=torch.long)
    return torch.stack([layer.last_load.cpu() for layer in layers])


def expert_dropped(layers: list[MoE]) -> torch.Tensor:
    """Real assignments over moe.capacity_factor in the last forward, per MoE layer: dropped in
    training; in eval, those training would drop (inference is dropless). (MoE layers,) long."""
    return torch.stack([layer.last_dropped.cpu() for layer in layers]) if layers else torch.zeros(0, dtype=torch.long)


class VLM(nn.Module):
    # Image tokens are prepended by the model, not marked in input_ids (see PretrainedVLM).
    images_in_text = False
    image_token_id = None
    # ``prefill`` traces as one graph with a static cache (no host syncs when every row has an
    # image), so moevlm.compiled compiles it too.
    prefill_compiles = True

    def __init__(self, cfg: ModelConfig, vision: nn.Module | None = None):
        """``vision``: the image encoder, (B, C, S, S) in [-1, 1] -> (B, num_image_tokens,
        vision.width). None: a ViT, or for ``vision.pretrained`` a tower with random weights
        built from ``vision.hf_config`` (to be overwritten by a checkpoint)."""
        super().__init__()
        assert cfg.decoder.vocab_size > 0, "set decoder.vocab_size from the tokenizer first"
        self.cfg = cfg
        vocab_size = cfg.decoder.vocab_size
        self.num_image_tokens = cfg.vision.num_image_tokens
        if vision is None and cfg.vision.pretrained is not None:
            vision = HFVisionTower.build(cfg.vision, load_weights=False)
        self.vision = ViT(cfg.vision) if vision is None else vision
        self.projector = build_projector(cfg.projector, cfg.vision.width, cfg.decoder.width)
        self.decoder = Decoder(cfg.decoder, vocab_size, self.num_image_tokens + cfg.decoder.max_text_len)
        self.head_loss: HeadLoss | None = None

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [-1, 1] -> image tokens in the decoder's space (B, n_img, D)."""
        return self.projector(self.vision(images))

    def _embed(self, images: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               has_image: torch.Tensor | None = None):
        B, T = input_ids.shape
        n = self.num_image_tokens
        text_emb = self.decoder.tok_emb(input_ids)
        text_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if images is not None and (has_image is None or bool(has_image.all())):
            image_emb, image_mask = self.encode_images(images), text_mask.new_ones(B, n)
        else:
            # Text-only rows keep their image slots as padding: hidden from attention, not
            # counted in the positions, so the other rows compute exactly what they would alone.
            has_image = text_mask.new_zeros(B) if images is None else has_image.bool()
            image_emb = text_emb.new_zeros(B, n, text_emb.size(-1))
            if bool(has_image.any()):
                image_emb[has_image] = self.encode_images(images[has_image]).to(image_emb.dtype)
            image_mask = has_image[:, None].expand(B, n)
        embeds = torch.cat([image_emb, text_emb], dim=1)
        key_mask = torch.cat([image_mask, text_mask], dim=1)  # (B, n + T)
        kind = torch.cat([torch.where(image_mask, IMAGE, PAD), torch.where(text_mask, TEXT, PAD)], dim=1)
        return embeds, key_mask, kind

    def forward(self, images: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                has_image: torch.Tensor | None = None, label_smoothing: float = 0.0) -> VLMOutput:
        """images (B, C, S, S) (None: text only); input_ids, attention_mask, labels (B, T). labels
        are next-token targets aligned with input_ids (-100 = no loss), as built by
        ``moevlm.data.dataset``; given labels, logits are computed at the labelled positions
        only (``VLMOutput.logits``: (N, V)). has_image (B,) bool: False marks a text-only row,
        whose image is ignored (None: every row has one)."""
        embeds, key_mask, kind = self._embed(images, input_ids, attention_mask, has_image)
        # Training batches are right-padded: a causal mask alone already keeps every real
        # token from seeing padding, so the faster is_causal path gives identical results.
        right_padded = bool((key_mask[:, :-1] | ~key_mask[:, 1:]).all())
        attn_mask = None if right_padded else attention_mask_for(key_mask, key_mask.size(1))
        positions = (key_mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.decoder(embeds, positions, attn_mask, kind)
        hidden = hidden[:, self.num_image_tokens:]
        if labels is not None:
            labelled = labelled_positions(labels)
            hidden, labels = hidden[labelled], labels[labelled]
            if self.head_loss is not None and self.training:
                logits, lm_loss = self.head_loss(hidden, labels, label_smoothing)
                return vlm_output(logits, labels, self.moe_layers, self.cfg.decoder.moe, lm_loss=lm_loss)
        logits = self.decoder.lm_head(hidden)
        return vlm_output(logits, labels, self.moe_layers, self.cfg.decoder.moe, label_smoothing)

    @property
    def moe_layers(self) -> list[MoE]:
        return self.decoder.moe_layers

    def expert_load(self) -> torch.Tensor:
        """Routed token counts of the last forward: (MoE layers, 2 [image, text], experts)."""
        return expert_load(self.moe_layers)

    def new_cache(self, batch: int, max_len: int, kind: type[KVCache] | type[StaticKVCache] = KVCache):
        """An empty cache of ``kind`` for ``batch`` rows of up to ``max_len`` positions."""
        d = self.cfg.decoder
        p = self.decoder.tok_emb.weight
        return kind(d.depth, batch, d.kv_heads, max_len, d.width // d.heads, device=p.device, dtype=p.dtype)

    def new_static_cache(self, batch: int, max_len: int) -> StaticKVCache:
        return self.new_cache(batch, max_len, StaticKVCache)

    def prefill(self, images: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: KVCache | StaticKVCache | None = None,
                has_image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs image + prompt tokens; returns next-token logits (B, V) and the key mask (B, S).
        A text-only row (has_image False, or images None) keeps its image slots as padding, as training does."""
        embeds, key_mask, kind = self._embed(images, input_ids, attention_mask, has_image)
        positions = (key_mask.cumsum(1) - 1).clamp(min=0)
        static = cache if isinstance(cache, StaticKVCache) else None
        if static is not None:
            cache = static.prefill_view()
        hidden = self.decoder(embeds, positions, attention_mask_for(key_mask, key_mask.size(1)), kind, cache)
        if static is not None:
            static.slot.fill_(key_mask.size(1))
        return self.decoder.lm_head(hidden[:, -1]), key_mask

    def step(self, token_ids: torch.Tensor, key_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One cached decoding step. token_ids (B,); key_mask (B, S) includes the new token."""
        positions = (key_mask.sum(1, keepdim=True) - 1)  # (B, 1)
        kind = torch.full_like(positions, TEXT)
        embeds = self.decoder.tok_emb(token_ids[:, None])
        hidden = self.decoder(embeds, positions, attention_mask_for(key_mask, 1), kind, cache)
        return self.decoder.lm_head(hidden[:, -1])

    def decode_step(self, token_ids: torch.Tensor, key_mask: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """``step`` with static shapes, for ``torch.compile`` (moevlm.compiled): token_ids (B,) go to
        ``cache.slot``; key_mask (B, cache.max_len) is updated in place to show that slot."""
        key_mask.index_fill_(1, cache.slot, True)
        positions = key_mask.sum(1, keepdim=True) - 1  # real tokens only, as in step
        kind = torch.full_like(positions, TEXT)
        embeds = self.decoder.tok_emb(token_ids[:, None])
        hidden = self.decoder(embeds, positions, key_mask[:, None, None, :], kind, cache)
        return self.decoder.lm_head(hidden[:, -1])
