"""Every command's flags and their help (``moevlm COMMAND --help``): ``build_parser``. What each command
then does is cli.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from moevlm import __version__
from moevlm.config import PRESETS, STAGES, describe_fields


def _add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", default=None, metavar="int8|nf4",
                        help="quantized decoder weights: int8 (weight-only, per output channel; CPU and GPU) or "
                             "nf4 (bitsandbytes, CUDA only); default: the weights as saved")


def _add_compile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="decode with a torch.compile'd step over a static KV cache: faster per token after a "
                             "one-off compile (tens of seconds per batch-size bucket); the same greedy tokens")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass p")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def _add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|mps",
                        help="where the model runs: auto (default) picks CUDA, then Apple MPS, then the CPU; "
                             "bf16 autocast where the device supports it (cuda:N names one card)")


def _add_checkpoint_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="best", metavar="last|best|step-N",
                        help="which checkpoint of a training run folder: best (default; the snapshot of the best "
                             "validation, train.select; the last where none is recorded), last, or step-N's snapshot")


class _HelpConfig(argparse.Action):
    """``train --help-config``: every config key with its default and meaning, then exit (like --help)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        rows = describe_fields()
        width = max(len(key) for key, _, _ in rows)
        for key, default, text in rows:
            print(f"{key:<{width}}  {default:<10}  {text}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moevlm", description="Mixture-of-Experts vision-language models.")
    parser.add_argument("--version", action="version", version=f"moevlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model on image-text data",
                           description="Train a model. Data: CSV, JSONL, LLaVA or COCO JSON, Parquet/Arrow, "
                                       "Hugging Face datasets, WebDataset shards, image folders (docs/data.md).")
    train.add_argument("--data", required=True, type=Path,
                       help="training data: .csv, .jsonl, LLaVA or COCO .json, .parquet, .arrow, a save_to_disk or "
                            "image folder, hf:NAME[:split], or WebDataset shards ('s/{00..09}.tar')")
    train.add_argument("--val-data", type=Path, help="validation data (default: split off data.val_fraction)")
    train.add_argument("--preset", choices=sorted(PRESETS), help="starting config (default: default)")
    train.add_argument("--config", type=Path, help="YAML file of config values over the preset")
    train.add_argument("--help-config", action=_HelpConfig, help="list every config key (--set KEY=VALUE) with its "
                                                                 "default and meaning, then exit")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    train.add_argument("--out", type=Path, default=Path("runs/latest"),
                       help="output and checkpoint folder (default runs/latest)")
    train.add_argument("--max-steps", type=int, help="shorthand for --set train.max_steps=N")
    train.add_argument("--resume", action="store_true",
                       help="continue the checkpoint in --out, or start the run there if it holds none yet, so one "
                            "command line serves the first run and every restart. --preset/--config/--set/--stage/"
                            "--from may be given again: they must give the config the run was started with, except "
                            "train.max_steps, log_every, eval_every, checkpoint_every, keep_checkpoints, "
                            "max_bad_steps, patience, val_generate, activation_checkpointing, data.num_workers and "
                            "dist.strategy, expert_parallel, backend, timeout_s, mixed_precision, meta_init, "
                            "which take the new value; under torchrun it may continue on another number of ranks")
    train.add_argument("--stage", choices=STAGES, help="what learns: pretrain (projector), instruct (projector + "
                                                       "LM), moe (MoE layers; upcycles a dense LM), full (all; "
                                                       "default); shorthand for --set train.stage=NAME")
    train.add_argument("--from", dest="from_dir", type=Path, metavar="DIR",
                       help="start from an earlier stage's checkpoint (its model and tokenizer; data and train "
                            "settings from --preset/--config/--set)")
    tracking = train.add_mutually_exclusive_group()
    tracking.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store inside --out)")
    tracking.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")

    caption = sub.add_parser("caption", help="caption images with a trained model")
    caption.add_argument("--model", required=True, type=Path, help="checkpoint folder")
    _add_checkpoint_flag(caption)
    caption.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    caption.add_argument("--prompt", default="", help="text prompt (default: none, plain captioning)")
    _add_sampling_flags(caption)
    _add_device_flag(caption)
    _add_quantize_flag(caption)
    _add_compile_flag(caption)
    caption.add_argument("--batch-size", type=int, default=32,
                         help="images read and captioned together; captions print batch by batch (default 32)")
    caption.add_argument("--json", action="store_true", help='one {"image", "text"} JSON object per line')

    evaluate = sub.add_parser("eval", help="evaluate a model on a data set")
    evaluate.add_argument("--model", required=True, type=Path, help="checkpoint folder")
    _add_checkpoint_flag(evaluate)
    evaluate.add_argument("--data", required=True, type=Path,
                          help="data with reference captions (any --data format of train)")
    evaluate.add_argument("--image-root", help="where COCO file names resolve (default: the file's train2017/-style "
                                               "folder or its own; the training run's data.image_root is not used)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    generation = evaluate.add_mutually_exclusive_group()
    generation.add_argument("--max-new-tokens", type=int, metavar="N",
                            help="most tokens to generate per row (default: twice the longest reference "
                                 "of the batch plus 8)")
    generation.add_argument("--no-generate", action="store_true",
                            help="loss and perplexity only: no captions, no exact match or BLEU")
    _add_device_flag(evaluate)
    _add_quantize_flag(evaluate)
    _add_compile_flag(evaluate)

    demo = sub.add_parser("demo", help="build a handwritten-digit scene task and train on it (a few minutes)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="where data, checkpoint and plots go")
    demo.add_argument("--max-steps", type=int, help="fewer steps for a quick look")
    demo.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    demo.add_argument("--seed", type=int, default=0, help="seed of the scans held out, the scenes and the weights")
    demo.add_argument("--resume", action="store_true", help="go on with the interrupted demo in --out")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="change one of the demo's settings (repeatable), e.g. train.lr=1e-3")

    upcycle = sub.add_parser("upcycle", help="turn a model's dense FFNs into MoE layers (sparse upcycling)",
                             description="Copy each chosen dense FFN of the decoder into N identical experts with "
                                         "a new router. Right after, the model computes what the dense one did.")
    upcycle.add_argument("--model", required=True, type=Path, help="checkpoint folder of a model with dense FFNs")
    upcycle.add_argument("--experts", required=True, type=int, help="experts per MoE layer")
    upcycle.add_argument("--top-k", required=True, type=int, help="experts each token is routed to")
    upcycle.add_argument("--layers", default="all",
                         help="all (default), every-other, or a comma-separated list of layer indices")
    upcycle.add_argument("--out", required=True, type=Path, help="folder for the upcycled checkpoint (new)")

    export = sub.add_parser("export", help="write a model as a transformers LLaVA folder (AutoModelForImageTextToText, "
                                           "vLLM)",
                            description="Export a checkpoint to transformers' LlavaForConditionalGeneration with a "
                                        "Mixtral / Qwen2-MoE / Qwen3-MoE text model, its processor, generation "
                                        "config and model card. A model no HF class computes exactly is refused.")
    export.add_argument("--model", required=True, type=Path, help="checkpoint folder")
    _add_checkpoint_flag(export)
    export.add_argument("--to", choices=["hf"], default="hf", help="format: hf (transformers' LLaVA layout)")
    export.add_argument("--out", required=True, type=Path, help="the folder to write (new or empty)")
    export.add_argument("--register", metavar="NAME",
                        help="log the folder to the training run's MLflow run and register it as a new version of "
                             "model NAME")
    export.add_argument("--tracking-uri", help="MLflow tracking URI for --register (default: the run's own mlflow.db)")
    export.add_argument("--push-to-hub", metavar="REPO_ID",
                        help="upload the folder to this Hugging Face Hub repository (token: HF_TOKEN or the login)")

    bench = sub.add_parser("bench", help="measure training, MoE and generation speed on this machine",
                           description="Speed figures on this machine (a few minutes on 2 CPU cores); on a "
                                       "GPU also bf16 figures for the ~100M-parameter base preset.")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--quick", action="store_true", help="tiny sizes, seconds: checks that it runs, "
                                                             "figures mean nothing; no compiled decoding")
    plan = sub.add_parser("plan", help="per-rank memory of a training run (DDP / FSDP, checkpointing): what fits",
                          description="Bytes per rank of weights, gradients, AdamW state, DDP/FSDP2 buffers and "
                                      "activations (with and without activation checkpointing) for a config, read "
                                      "from config files only (no weights), and the largest batch per rank that "
                                      "fits (docs/distributed.md, \"Memory plan\").")
    plan.add_argument("--preset", choices=sorted(PRESETS), help="starting config (default: default)")
    plan.add_argument("--config", type=Path, help="YAML file of config values over the preset")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, as for train (repeatable)")
    plan.add_argument("--stage", choices=STAGES, help="shorthand for --set train.stage=NAME")
    plan.add_argument("--gpus", "--world-size", dest="world_size", type=int, default=1, metavar="N",
                       help="ranks (torchrun processes, one per GPU; default 1)")
    plan.add_argument("--gpu-memory", required=True, metavar="SIZE",
                      help="memory of one rank's device, e.g. 80GB, 24GiB (with --device cpu: the host's)")
    plan.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                      help="cuda (default: bf16 mixed precision unless train.precision=fp32, 1 GiB + 10 %% kept "
                           "back) or cpu (fp32, the process's resident memory)")
    plan.add_argument("--seq-len", type=int, metavar="N",
                      help="tokens per row in the LM, image tokens included (default: image tokens + "
                           "decoder.max_text_len, the longest row)")

    serve = sub.add_parser("serve", help="serve a model: OpenAI-compatible chat API and a web page",
                           description="OpenAI-compatible /v1/chat/completions (images as base64 data: URLs, "
                                       "streaming, continuous batching), /v1/models, /health, /metrics and a "
                                       "web page at / (docs/serving.md).")
    serve.add_argument("--model", required=True, type=Path, help="checkpoint folder")
    _add_checkpoint_flag(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    _add_device_flag(serve)
    _add_quantize_flag(serve)
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 requests")
    serve.add_argument("--served-model-name", default=None, help="the model's name in the API "
                                                                  "(default: the folder's name)")
    serve.add_argument("--max-batch", type=int, default=16, help="most requests decoding together (default 16)")
    serve.add_argument("--no-compile", action="store_true",
                       help="decode eagerly: skip compiling the decoding step for every batch size at start "
                            "(by default the server compiles it, and falls back to eager in one line where it cannot)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="most requests waiting for a batch slot; more get 429 (default 64)")
    serve.add_argument("--grace", type=float, default=10.0,
                       help="seconds in-flight requests get to finish after SIGTERM (default 10)")
    serve.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds from a request's arrival to its last token; then it ends with a 504 (a stream: "
                            "an error chunk, finish_reason length) (default 600)")
    serve.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                       help="web origins allowed to call the API from a browser (CORS), e.g. https://app.example; "
                            "'*' for any (default: none)")
    serve.add_argument("--allow-http-images", action="store_true",
                       help="also accept http(s): image URLs: fetched with --max-image-bytes, one deadline for the "
                            "whole fetch, redirects to the same scheme only. The server then fetches any address "
                            "a client names, internal ones included")
    serve.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                       help="accept file: image URLs of regular files under DIR (symlinks resolved; nothing outside "
                            "DIR) (default: file: URLs refused)")
    serve.add_argument("--image-fetch-timeout", type=float, default=10.0,
                       help="seconds for a whole http(s) image fetch (default 10)")
    serve.add_argument("--max-image-fetches", type=int, default=8,
                       help="http(s) image fetches at once; more get 429 (default 8)")
    serve.add_argument("--max-image-bytes", type=int, default=10 * 2**20, help="per image (default 10 MiB)")
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                       help="per image, read from its header before decoding; larger ones get 413 "
                            "(default 16777216, 4096 x 4096)")
    serve.add_argument("--max-image-decodes", type=int, default=2,
                       help="images decoded at once, server-wide; bounds the memory of decoding (default 2)")
    serve.add_argument("--max-body-bytes", type=int, default=20 * 2**20, help="per request (default 20 MiB)")
    return parser
