"""``moevlm export --to hf``: a checkpoint as a transformers ``LlavaForConditionalGeneration`` folder.

The vision encoder becomes a SigLIP (or CLIP) vision model, the projector LLaVA's
``multi_modal_projector`` and the decoder a Mixtral, Qwen2-MoE or Qwen3-MoE text model (or the
pretrained LM's own architecture when it has no MoE layer), with the tokenizer, image processor,
chat template, generation config and a model card beside it. Weights are written in the llava-hf
layout (``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.*``), which transformers and vLLM both load. A model that no transformers
class computes exactly is refused (``export.blockers``), never approximated.
"""
