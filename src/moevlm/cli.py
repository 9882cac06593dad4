"""Command line: ``moevlm train | caption | eval | demo | upcycle | export | bench | plan | serve`` (README, "Usage").

User mistakes end with one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from moevlm import __version__
from moevlm.config import PRESETS, STAGES, describe_fields

EXIT_USER_ERROR = 2


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


def _checkpoint_folder(args) -> Path:
    """The folder ``--model`` and ``--checkpoint`` name; says on stderr which step when it is not the last."""
    from moevlm.checkpoint import resolve_checkpoint

    folder, note = resolve_checkpoint(args.model, args.checkpoint)
    if note is not None:
        print(f"moevlm: {note}", file=sys.stderr)
    return folder


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
                                       "Hugging Face datasets, WebDataset shards, image folders (README, "
                                       "\"Data formats\").")
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
                                      "fits (README, \"Memory plan\").")
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
                                       "web page at / (README, \"Serving\").")
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


def _cmd_train(args) -> int:
    from moevlm.train.run import config_from_command_line, run_training

    config, config_given = config_from_command_line(args.preset, args.config, args.overrides, args.stage,
                                                    args.from_dir)
    trainer, result = run_training(config, args.data, args.out, val_data=args.val_data, resume=args.resume,
                                   max_steps=args.max_steps, tracking_uri=args.tracking_uri,
                                   tracking=not args.no_tracking, progress=sys.stderr.isatty(),
                                   from_dir=args.from_dir, compare_config=config_given)
    if not trainer.world.is_main:  # under torchrun rank 0 reports for all
        return 0
    rows = "validation" if trainer.val_set else "training"
    print(f"trained to step {trainer.step}: {rows} loss {result['loss']:.4f} on {result['num_samples']} rows, "
          f"exact match {result['exact_match']:.3f} on {len(result['predictions'])} of them")
    print(f"checkpoint: {args.out}")
    if trainer.tracker.enabled:
        print(f"MLflow run {trainer.tracker.run_id}: {trainer.tracker.ui_command()}")
    return 0


def _cmd_caption(args) -> int:
    from moevlm.generate import caption_files

    captions = caption_files(_checkpoint_folder(args), args.images, prompt=args.prompt, device=args.device,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             quantize=args.quantize, compile=args.compile)
    for path, text in captions:
        print(json.dumps({"image": str(path), "text": text}) if args.json else f"{path}: {text}", flush=True)
    return 0


def _public_result(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("predictions", "expert_load_counts")}


def _cmd_eval(args) -> int:
    from moevlm.evaluate import evaluate_file

    result = evaluate_file(_checkpoint_folder(args), args.data, device=args.device, max_new_tokens=args.max_new_tokens,
                           generate=not args.no_generate, image_root=args.image_root, quantize=args.quantize,
                           compile=args.compile)
    if args.json:
        print(json.dumps(_public_result(result)))
        return 0
    for key in ("num_samples", "exact_match", "bleu4", "cider_d", "loss", "perplexity", "expert_balance"):
        if key in result:
            value = result[key]
            print(f"{key:>15}: {value:.4f}" if isinstance(value, float) else f"{key:>15}: {value}")
    return 0


def _cmd_demo(args) -> int:
    from moevlm.demo import run_demo

    run_demo(args.out, max_steps=args.max_steps, tracking=not args.no_tracking, progress=sys.stderr.isatty(),
             seed=args.seed, resume=args.resume, overrides=args.overrides)
    return 0


def _cmd_upcycle(args) -> int:
    from moevlm.train.upcycling import layer_spec, upcycle_checkpoint

    config = upcycle_checkpoint(args.model, args.out, args.experts, args.top_k, layer_spec(args.layers))
    moe = config.model.decoder.moe
    print(f"upcycled {len(config.model.decoder.moe_layer_indices)} layers {config.model.decoder.moe_layer_indices} "
          f"to {moe.num_experts} {moe.activation} experts, top-{moe.top_k}: {args.out}")
    return 0


def _cmd_export(args) -> int:
    from moevlm.export.hf import export_hf

    result = export_hf(_checkpoint_folder(args), args.out, register=args.register, tracking_uri=args.tracking_uri,
                       hub_repo=args.push_to_hub)
    print(f"exported to {result.out}: LlavaForConditionalGeneration with a {result.text_model} text model, "
          f"{result.parameters:,} parameters ({result.active_parameters:,} active per token)")
    if result.registered_version is not None:
        print(f"registered in MLflow as {args.register} version {result.registered_version}")
    if result.hub_url is not None:
        print(f"pushed to the Hub: {result.hub_url}")
    return 0


def _cmd_plan(args) -> int:
    from moevlm.plan import make_plan, parse_bytes, render
    from moevlm.train.run import config_from_command_line

    memory = parse_bytes(args.gpu_memory)
    config, _ = config_from_command_line(args.preset, args.config, args.overrides, args.stage)
    print(render(make_plan(config, args.world_size, memory, device=args.device, seq_len=args.seq_len)))
    return 0


def _cmd_bench(args) -> int:
    from moevlm.bench.harness import format_table
    from moevlm.bench.scenarios import run_bench

    result = run_bench(quick=args.quick)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _cmd_serve(args) -> int:
    from moevlm.serve.server import serve

    # The run folder's name whichever checkpoint of it is served.
    serve(_checkpoint_folder(args), host=args.host, port=args.port, device=args.device, api_key=args.api_key,
          served_name=args.served_model_name or args.model.resolve().name, max_batch=args.max_batch,
          max_queue=args.max_queue, grace=args.grace,
          allow_http_images=args.allow_http_images, max_image_bytes=args.max_image_bytes,
          max_image_pixels=args.max_image_pixels, max_image_decodes=args.max_image_decodes,
          max_image_fetches=args.max_image_fetches, image_fetch_timeout=args.image_fetch_timeout,
          allowed_local_media_path=args.allowed_local_media_path, max_body_bytes=args.max_body_bytes,
          request_timeout=args.request_timeout, allowed_origins=args.allowed_origins, quantize=args.quantize)
    return 0


COMMANDS = {"train": _cmd_train, "caption": _cmd_caption, "eval": _cmd_eval, "demo": _cmd_demo,
            "upcycle": _cmd_upcycle, "export": _cmd_export, "bench": _cmd_bench, "plan": _cmd_plan,
            "serve": _cmd_serve}


def main(argv: list[str] | None = None) -> int:
    from moevlm.errors import MoevlmError
    from moevlm.extras import MissingExtraError, missing_module

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="moevlm: %(message)s")
    # Pillow warns (file, line and source) about images it still decodes, e.g. corrupt EXIF;
    # an image it cannot use ends in our own one-line error instead.
    warnings.filterwarnings("ignore", module="PIL")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' own notices (e.g. that it uses its PIL image processors) are not ours to
    # print; its weight-loading bars only where someone watches the terminal.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # imported before main (a notebook, tests): too late for the variable
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except MoevlmError as err:
        print(f"moevlm: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as err:
        if missing_module(err) is None:
            raise
        # An optional library that no feature checked for itself: name the extra that brings it.
        print(f"moevlm: error: {MissingExtraError(f'moevlm {args.command}', missing_module(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("moevlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
