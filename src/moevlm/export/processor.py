"""The files beside the weights that make the export usable on its own: the tokenizer with an
``<image>`` token and a chat template that lays out a prompt as moevlm does, the image processor
that resizes as moevlm does, ``LlavaProcessor``'s config and ``generation_config.json``.

Prompt layouts, as ``input_ids`` (``<image>`` expanded to the image tokens by the processor):
- a model trained from scratch: ``<image> <bos> prompt <sep>`` (no ``<sep>`` for an empty prompt:
  plain captioning; no ``<image>`` in a text-only conversation), then ``answer <eos>``, and further
  turns ``prompt <sep> answer <eos>``; system texts before the first prompt, joined by newlines;
- a pretrained LM: its own chat template with ``<image>\\n`` before the first user text, or, for
  plain captioning (one user message with no text), ``<bos> <image>``, as moevlm trains it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import tokenizers

from moevlm.data.chat import MOEVLM_LAYOUT_MARKER
from moevlm.export.vision import VisionPart

IMAGE_TOKEN = "<image>"

# Message content is a string or OpenAI-style parts; text parts are joined by newlines (as
# ``moevlm serve`` joins them), image parts placed where the layout puts the image.
_TEXT_OF = """{%- if message['content'] is string -%}{%- set text = message['content'] -%}
{%- else -%}
{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}
{%- endif -%}"""
# Whether the conversation has an image: an image part, or a placeholder typed in the text.
_HAS_IMAGE = """{%- set moevlm_image = namespace(found=false) -%}
{%- for message in messages -%}""" + _TEXT_OF + """
{%- if message['content'] is not string and message['content'] | selectattr('type', 'in', ['image', 'image_url'])
 | list or '<image>' in text -%}{%- set moevlm_image.found = true -%}{%- endif -%}
{%- endfor -%}"""

# System messages go before the next user text, joined by newlines, as moevlm's data readers and
# server put them; <image> placeholders and the whitespace around them become one space (clean_prompt).
SCRATCH_TEMPLATE = ("{#- " + MOEVLM_LAYOUT_MARKER + ": the image (if any), <bos>, then per turn: "
                    "system and prompt <sep> (if any), answer <eos> -#}\n" + _HAS_IMAGE + """
{{- ('<image>' if moevlm_image.found else '') + bos_token -}}
{%- set moevlm_ns = namespace(system=[]) -%}
{%- for message in messages -%}""" + _TEXT_OF + """
{%- if message['role'] in ['system', 'developer'] -%}{%- set moevlm_ns.system = moevlm_ns.system + [text] -%}
{%- elif message['role'] == 'assistant' -%}{{- text + eos_token -}}
{%- elif message['role'] == 'user' -%}
{%- set text = (moevlm_ns.system + [text]) | join('\\n') -%}{%- set moevlm_ns.system = [] -%}
{%- set text = text.split('<image>') | map('trim') | join(' ') | trim -%}
{%- if text -%}{{- text + '<sep>' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}""")

# Before a pretrained LM's own template: system texts joined before the first user text, and list
# contents become strings with the image placeholder in front of the first user text, as moevlm
# renders them.
_WRAPPED_MARKER = "moevlm image placement"
_PRETRAINED_PREFIX = "{#- " + _WRAPPED_MARKER + " -#}\n" + """
{%- set moevlm_ns = namespace(messages=[], text=0, users=0, system=[]) -%}
{%- for message in messages -%}""" + _TEXT_OF + """
{%- if message['role'] in ['system', 'developer'] -%}{%- set moevlm_ns.system = moevlm_ns.system + [text] -%}
{%- else -%}
{%- if message['role'] == 'user' and moevlm_ns.system -%}
{%- set text = (moevlm_ns.system + [text]) | join('\\n') -%}{%- set moevlm_ns.system = [] -%}{%- endif -%}
{%- if message['content'] is not string and message['content'] | selectattr('type', 'in', ['image', 'image_url'])
 | list -%}{%- set text = '<image>\\n' + text -%}{%- endif -%}
{%- if message['role'] == 'user' -%}{%- set moevlm_ns.users = moevlm_ns.users + 1 -%}
{%- if text | replace('<image>', '') | trim -%}{%- set moevlm_ns.text = moevlm_ns.text + 1 -%}{%- endif -%}
{%- endif -%}
{%- set moevlm_ns.messages = moevlm_ns.messages + [{'role': message['role'], 'content': text}] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = moevlm_ns.messages -%}
{%- if moevlm_ns.users == 1 and moevlm_ns.text == 0 and messages[0]['role'] == 'user'
 and '<image>' in messages[0]['content'] -%}
{{- (bos_token or '') + '<image>' -}}
{%- if messages | length > 1 -%}{{- messages[1]['content'] + eos_token -}}{%- endif -%}
{%- else -%}
"""


def pretrained_template(own: str | None) -> str | None:
    """The LM's own template with the image placed as moevlm does; a template that places it
    already (an export exported again) stays as it is."""
    if not own or _WRAPPED_MARKER in own or MOEVLM_LAYOUT_MARKER in own:
        return own
    return _PRETRAINED_PREFIX + own + "\n{%- endif -%}"


def scratch_tokenizer(tokenizer):
    """moevlm's char/BPE ``Tokenizer`` as a transformers fast tokenizer with ``<image>`` (the next id)."""
    # Lazy: transformers takes seconds to import.
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer.from_str(tokenizer._backend.to_str())
    backend.add_special_tokens([IMAGE_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", sep_token="<sep>", padding_side="left",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN})


def pretrained_tokenizer(hf_tokenizer):
    """A copy of the LM's tokenizer with ``<image>`` added when it has none, padding on the left."""
    tok = copy.deepcopy(hf_tokenizer)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:  # batched prompts need one; moevlm pads with eos then (never attended to)
        tok.pad_token = tok.eos_token
    tok.padding_side = tok.init_kwargs["padding_side"] = "left"  # init_kwargs: what save_pretrained writes
    _no_automatic_bos(tok)
    return tok


def _no_automatic_bos(tok) -> None:
    """The chat template writes <bos> itself, and LlavaProcessor tokenizes its text with the special
    tokens the tokenizer adds: without this, prompts would start with two."""
    if tok.bos_token_id is None or tok("a")["input_ids"][:1] != [tok.bos_token_id]:
        return
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False
    if tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        tok.backend_tokenizer.post_processor = None
    assert tok("a")["input_ids"][:1] != [tok.bos_token_id], "the tokenizer still adds <bos>"


def image_processor(vision: VisionPart, size: int, source_processor=None):
    """``source_processor``: the checkpoint's own (pretrained tower); else SigLIP's with moevlm's resize
    (PIL bicubic to size x size, no crop)."""
    if source_processor is not None:
        processor = copy.deepcopy(source_processor)
        processor.image_mean, processor.image_std = vision.pixel_mean, vision.pixel_std
        processor.do_rescale = processor.do_normalize = True
        return processor
    # Lazy: transformers takes seconds to import.
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size, "width": size}, resample=3, image_mean=vision.pixel_mean,
                                   image_std=vision.pixel_std, do_convert_rgb=True)


def write_processor(out: Path, tokenizer, images, vision: VisionPart, patch_size: int, chat_template: str | None):
    # Lazy: transformers takes seconds to import.
    from transformers import LlavaProcessor

    extra = 1 if vision.config["model_type"] == "clip_vision_model" else 0  # CLIP's CLS, dropped by "default"
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy=vision.select_strategy, chat_template=chat_template,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=extra)
    processor.save_pretrained(str(out))
    return processor


def write_generation_config(out: Path, special: dict[str, int | None], suppress: list[int]) -> None:
    # Lazy: transformers takes seconds to import.
    from transformers import GenerationConfig

    config = GenerationConfig(bos_token_id=special["bos"], eos_token_id=special["eos"], pad_token_id=special["pad"],
                              do_sample=False, suppress_tokens=suppress or None)
    config.save_pretrained(str(out))
