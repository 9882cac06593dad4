"""Tiny random transformers models, saved like hub checkpoints, for offline tests.

Each ``tiny_*`` function builds a small randomly initialised model from a config (nothing is
downloaded), writes it with ``save_pretrained`` into ``folder`` together with what a real
checkpoint ships beside it (tokenizer, image processor), and returns the folder as a string.
The weights depend only on ``seed``: the global torch RNG is forked, so callers' seeds are
left alone. Every model is a few hundred kB and builds in well under a second.

    tiny_clip_vision   CLIPVisionModel, 32 px, patch 8 (16 patches + CLS), 3 layers, width 32
    tiny_siglip_vision SiglipVisionModel, 32 px, patch 8 (16 patches, no CLS), 3 layers, width 32
    tiny_llama         LlamaForCausalLM, 2 layers, width 32, GQA (4 heads, 2 KV heads), SwiGLU,
                       untied head (tie_word_embeddings=True ties it, as in SmolLM2); tokenizer
                       adds <s>, has a chat template, no pad token
    tiny_gpt2          GPT2LMHeadModel, 2 layers, width 32, gelu_new, tied head; tokenizer
                       with <|endoftext|> as bos/eos/unk, no chat template, no pad token
    tiny_llava         LlavaForConditionalGeneration: tiny CLIP tower + tiny Llama, "<image>"
                       token (id IMAGE_TOKEN_ID) in its tokenizer, CLIP image processor

The tokenizers are byte-level BPE without merges: every byte is a token, so any text
encodes, and ids 0..3 are the special tokens listed in ``LLAMA_SPECIALS`` / ``GPT2_SPECIALS``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

# Without torchvision, transformers falls back to the PIL image processors with a warning;
# asking for those directly is the same processor without the noise.
CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
SiglipImageProcessor = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor

IMAGE_SIZE = 32
PATCH_SIZE = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>"]  # ids 0, 1, 2, 3
GPT2_SPECIALS = ["<|endoftext|>"]  # id 0
IMAGE_TOKEN_ID = 3  # "<image>" in the Llama / LLaVA tokenizer

# A minimal chat template in the Llama-2/Vicuna spirit. {% generation %} marks what the
# assistant says, so apply_chat_template(..., return_assistant_tokens_mask=True) works.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _byte_bpe(specials: list[str], bos: str | None) -> Tokenizer:
    """Byte-level BPE with no merges: ids of ``specials`` first, then the 256 byte symbols."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    if bos is not None:  # Llama's tokenizer puts <s> in front of every encoded text
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return tokenizer


def llama_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(LLAMA_SPECIALS, bos="<s>"), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   chat_template=CHAT_TEMPLATE)


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    end = GPT2_SPECIALS[0]
    return PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(GPT2_SPECIALS, bos=None), bos_token=end,
                                   eos_token=end, unk_token=end)


def _vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    return len(tokenizer)  # 260 (Llama) / 257 (GPT-2)


def clip_vision_config(**overrides) -> CLIPVisionConfig:
    values = dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=2, projection_dim=16)
    return CLIPVisionConfig(**(values | overrides))


# Real shapes for benchmarks (random weights built from these configs): the SigLIP-base-patch16-224
# tower and LMs shaped like SmolLM2-135M/360M and TinyLlama-1.1B.
SIGLIP_BASE_224 = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0,
                    tie_word_embeddings=True)
SMOLLM2_360M = dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                    num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True)
TINYLLAMA_1_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)


def llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    values = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return LlamaConfig(**(values | overrides))


def _build(seed: int, make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def tiny_clip_vision(folder: str | Path, seed: int = 0, **config) -> str:
    model = _build(seed, lambda: CLIPVisionModel(clip_vision_config(**config)))
    model.save_pretrained(folder)
    size = model.config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return str(folder)


def tiny_siglip_vision(folder: str | Path, seed: int = 0, **config) -> str:
    values = dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=2)
    model = _build(seed, lambda: SiglipVisionModel(SiglipVisionConfig(**(values | config))))
    model.save_pretrained(folder)
    size = model.config.image_size
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return str(folder)


def tiny_llama(folder: str | Path, seed: int = 0, **config) -> str:
    tokenizer = llama_tokenizer()
    values = {"vocab_size": _vocab_size(tokenizer)} | config  # a larger vocabulary leaves ids nobody uses
    model = _build(seed, lambda: LlamaForCausalLM(llama_config(**values)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_gpt2(folder: str | Path, seed: int = 0, **config) -> str:
    tokenizer = gpt2_tokenizer()
    values = dict(vocab_size=_vocab_size(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                  bos_token_id=0, eos_token_id=0)
    model = _build(seed, lambda: GPT2LMHeadModel(GPT2Config(**(values | config))))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_llava(folder: str | Path, seed: int = 0, strategy: str = "default", feature_layer: int = -2) -> str:
    """LLaVA-1.5 layout: CLIP tower, two-layer GELU projector, Llama; ``strategy`` "default"
    drops CLS (16 image tokens), "full" keeps it (17)."""
    tokenizer = llama_tokenizer()
    config = LlavaConfig(vision_config=clip_vision_config(), text_config=llama_config(_vocab_size(tokenizer)),
                         image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=feature_layer,
                         vision_feature_select_strategy=strategy, projector_hidden_act="gelu")
    model = _build(seed, lambda: LlavaForConditionalGeneration(config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return str(folder)
