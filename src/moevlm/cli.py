"""Command line: ``moevlm train | caption | eval | demo | upcycle | export | bench | plan | serve``
(docs/getting-started.md, "Usage").

User mistakes end with one line on stderr and exit code 2; no traceback. The flags of each command
are cli_flags.py (``build_parser``); each command here calls one library function.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

from moevlm.cli_flags import build_parser

EXIT_USER_ERROR = 2


def _checkpoint_folder(args) -> Path:
    """The folder ``--model`` and ``--checkpoint`` name; says on stderr which step when it is not the last."""
    from moevlm.checkpoint import resolve_checkpoint

    folder, note = resolve_checkpoint(args.model, args.checkpoint)
    if note is not None:
        print(f"moevlm: {note}", file=sys.stderr)
    return folder


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
          request_timeout=args.request_timeout, allowed_origins=args.allowed_origins, quantize=args.quantize,
          compile=not args.no_compile)
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
