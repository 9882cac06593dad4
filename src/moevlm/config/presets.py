"""Presets: named starting points, each a dict of values over the schema's defaults.

``moevlm train --preset NAME`` starts from one; a YAML file and ``--set`` overrides go on top
(config/loading.py). Values use the same nesting as ``config.json``.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Sizes and layout of the original notebook: 96 px, patch 16, ViT 512 x 3 blocks x 8 heads with
    # a CLS token (the one image token), GPT-style decoder 128 x 8 layers x 8 heads, 8 experts
    # top-2, character tokenizer.
    "seed": {
        "model": {
            "vision": {"arch": "vit", "image_size": 96, "patch_size": 16, "width": 512, "depth": 3, "heads": 8,
                       "image_tokens": "cls"},
            "decoder": {"arch": "gpt", "width": 128, "depth": 8, "heads": 8, "max_text_len": 40,
                        "moe": {"num_experts": 8, "top_k": 2}},
            "tokenizer": {"kind": "char"},
        },
        "train": {"batch_size": 16, "max_steps": 300, "lr": 1e-3, "warmup_steps": 20,
                  "eval_every": 100, "checkpoint_every": 300},
    },
    # About 100M parameters (one GPU): 224 px, patch 32 (49 image tokens), decoder 512 x 8 layers
    # with 8 experts of hidden 1024, top-2, byte-level BPE; llama + siglip, so it exports.
    "base": {
        "model": {
            "vision": {"arch": "siglip", "image_size": 224, "patch_size": 32, "width": 384, "depth": 6, "heads": 6,
                       "image_tokens": "patches"},
            "decoder": {"arch": "llama", "width": 512, "depth": 8, "heads": 8, "ffn_hidden": 1024,
                        "max_text_len": 128,
                        "moe": {"num_experts": 8, "top_k": 2}},
            "tokenizer": {"kind": "bpe", "vocab_size": 8192},
        },
        # Natural photos: random resized crops (zoom up to 1.2x), shifts and colour jitter, no turns.
        "data": {"augment": True, "aug_translate": 0.1, "aug_scale": 0.2, "aug_color": 0.2},
        "train": {"batch_size": 32, "lr": 5e-4, "warmup_steps": 200, "max_steps": 20000,
                  "eval_every": 1000, "checkpoint_every": 1000, "ema_decay": 0.999},
    },
    # The staged recipe on pretrained parts (--stage pretrain|instruct|moe with model.vision=hf:ID
    # and model.lm=hf:ID): LLaVA-length conversations, no augmentation of the pretrained tower's
    # input. Learning rates are per stage: see the staged recipe in docs/training.md.
    "llava": {
        "model": {"decoder": {"max_text_len": 1024}},
        "data": {"augment": False, "val_fraction": 0.01, "preload": False, "num_workers": 2},
        "train": {"batch_size": 16, "lr": 1e-3, "warmup_steps": 100, "max_steps": 5000, "eval_every": 500,
                  "checkpoint_every": 500, "val_generate": 16},
    },
    # Seconds per run: for tests and quick checks.
    "tiny": {
        "model": {
            "vision": {"arch": "siglip", "image_size": 16, "patch_size": 16, "width": 32, "depth": 1, "heads": 2,
                       "image_tokens": "patches"},
            "decoder": {"arch": "llama", "width": 32, "depth": 2, "heads": 2, "max_text_len": 24,
                        "moe": {"num_experts": 4, "top_k": 2}},
        },
        "train": {"batch_size": 8, "max_steps": 20, "warmup_steps": 2, "eval_every": 10,
                  "checkpoint_every": 10, "log_every": 5},
    },
    # Learns well on small datasets of small images (a few thousand, up to 32 px): every 4 px
    # patch is an image token; small shifts, turns and zooms of the images and a weight average,
    # tuned on held-out digits (docs/training.md, "Defaults that generalise"); ~13 minutes on 2 CPU cores;
    # llama + siglip, so it exports to transformers.
    "default": {
        "model": {"vision": {"arch": "siglip"}, "decoder": {"arch": "llama"}},
        "data": {"augment": True, "aug_translate": 0.125, "aug_rotate": 10, "aug_scale": 0.1},
        "train": {"max_steps": 2000, "lr": 1.5e-3, "checkpoint_every": 500, "ema_decay": 0.995},
    },
}
