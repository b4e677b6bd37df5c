"""`wham-batch dream | convert | bench-engine`: the model on its own, without Ray or storage.

dream's context file is an .npz with `images` uint8 (T, 3, H, W) and `actions` (T, 16) in
model form (12 buttons 0/1, then 4 stick bins 0..10). The first K steps are the context
(`--context-steps`, default: as many as fit, at most 10). Steps after the context are used
when a mode needs them: policy mode takes the frames after the context as the observations
it acts on; world_model mode takes the actions after the context unless `--actions FILE.npz`
(key `actions`, (N, 16)) is given.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.cli.command import Command
from pipeline.contracts.choices import DECODINGS, DTYPES, MODES
from pipeline.contracts.errors import UserError
from workers import wham
from workers.actor.encode import auto_preview_scale, encode_gif
from workers.actor.replica import load_replica, resolve_device

MAX_CONTEXT = 10


def _dream_arguments(dream: argparse.ArgumentParser) -> None:
    _add_model_arguments(dream, preset_help="random weights of a named preset (for trials)")
    dream.add_argument("--context", required=True, metavar="FILE.npz",
                       help="clip with `images` uint8 (T,3,H,W) and `actions` (T,16)")
    dream.add_argument("--steps", required=True, type=int, metavar="N", help="steps to generate")
    dream.add_argument("--mode", choices=MODES, default="full",
                       help="full: frames and actions; world_model: frames for given actions; "
                       "policy: actions for given frames (default: full)")
    dream.add_argument("--actions", metavar="FILE.npz",
                       help="world_model: `actions` (N,16) to take after each generated frame")
    dream.add_argument("--context-steps", type=int, metavar="K",
                       help="use the first K steps of the clip as context (1..10)")
    dream.add_argument("--max-context", type=int, default=MAX_CONTEXT, metavar="M",
                       help="history kept while generating, oldest dropped first (default 10)")
    sampling = dream.add_argument_group("sampling (defaults: the official server's)")
    sampling.add_argument("--greedy", action="store_true", help="always take the arg-max")
    sampling.add_argument("--temperature", type=float, default=0.9,
                          help="clamped to >= 0.1 (default 0.9)")
    sampling.add_argument("--top-k", type=int, default=None, help="keep the K most likely")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1.0)")
    dream.add_argument("--decoding", choices=DECODINGS, default="sequential",
                       help="how image tokens are sampled: sequential (one per forward pass, "
                       "the model's order), diagonal (one grid diagonal per pass, faster) or "
                       "diagonal-checked (diagonal, each row's first token checked once the "
                       "row above is complete: closer to sequential, more passes)")
    dream.add_argument("--seed", type=int, default=0,
                       help="rollout b uses seed S+b; same seed, same output (default 0)")
    dream.add_argument("--batch", type=int, default=1, metavar="B",
                       help="rollouts from the same context, run together (default 1)")
    dream.add_argument("--out", required=True, metavar="OUT.npz",
                       help="write image_tokens (B,N,n), actions (B,N,16), images (B,N,3,H,W)")
    dream.add_argument("--gif", metavar="OUT.gif",
                       help="also write rollout 0 (context + watermarked frames) as a GIF")
    dream.add_argument("--json", action="store_true", help="print one JSON line of timings")


def _convert_arguments(convert: argparse.ArgumentParser) -> None:
    convert.add_argument("checkpoint", metavar="OFFICIAL.ckpt")
    convert.add_argument("out_dir", metavar="OUT_DIR")


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--preset", required=True, help="model preset, e.g. tiny or wham-200m")
    bench.add_argument("--batch", type=int, default=1, metavar="B")
    bench.add_argument("--steps", type=int, default=2, metavar="N")
    bench.add_argument("--context-steps", type=int, default=MAX_CONTEXT, metavar="K",
                       help="context steps (default 10: the window is full and slides)")
    bench.add_argument("--dtype", choices=DTYPES, default="auto")
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    _add_threads_argument(bench)
    bench.add_argument("--naive", action="store_true",
                       help="time the full-recompute reference sampler instead of the engine")
    bench.add_argument("--compile", action="store_true", help="compiled decode (CUDA only)")
    bench.add_argument("--json", action="store_true", help="print one JSON line")


def _add_model_arguments(parser: argparse.ArgumentParser, *, preset_help: str) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH",
                        help="native model folder or official .ckpt")
    source.add_argument("--preset", metavar="NAME", help=preset_help)
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="transformer precision (auto: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    _add_threads_argument(parser)


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads, at most the cores this process may use "
                        "(default: torch's choice)")


def _load(args: argparse.Namespace):
    return load_replica(checkpoint=args.checkpoint, preset=args.preset, device=args.device,
                        dtype=args.dtype, threads=args.threads)


def _read_npz(path: str, keys: tuple[str, ...], *, what: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        with np.load(file, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise UserError(f"{what} {path}: missing array(s) {missing}; "
                                f"found {sorted(data.files)}")
            return {k: data[k] for k in keys}
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} {path}: not a readable .npz ({exc})") from None


def _clip(args: argparse.Namespace, model) -> dict:
    """Context, and the given actions/observations, from the files named on the command line."""
    data = _read_npz(args.context, ("images", "actions"), what="--context")
    images, actions = data["images"], data["actions"]
    h, w = model.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, h, w):
        raise UserError(f"--context {args.context}: images must be uint8 (T, 3, {h}, {w}) "
                        f"for this model, got {images.dtype} {images.shape}")
    actions = wham.validate_actions(actions, name=f"--context {args.context}: actions")
    if actions.shape != (len(images), 16):
        raise UserError(f"--context {args.context}: actions must be ({len(images)}, 16) like "
                        f"the images, got {actions.shape}")
    wants_future = args.mode == "policy" or (args.mode == "world_model" and not args.actions)
    k = args.context_steps
    if k is None:
        k = min(MAX_CONTEXT, len(images) - (args.steps if wants_future else 0))
        if k < 1:
            what = "frames" if args.mode == "policy" else "actions (or pass --actions)"
            raise UserError(f"{args.mode} mode needs {args.steps} {what} after the context; "
                            f"{args.context} has {len(images)} steps in all")
    if not 1 <= k <= min(MAX_CONTEXT, len(images)):
        raise UserError(f"--context-steps: need 1..{min(MAX_CONTEXT, len(images))} context "
                        f"steps from a clip of {len(images)} (got {k})")
    clip = {"context_images": images[:k], "context_actions": actions[:k]}
    if args.mode == "policy":
        clip["observations"] = images[k:k + args.steps]
        if len(clip["observations"]) < args.steps:
            raise UserError(f"policy mode needs {args.steps} frames after the {k} context "
                            f"steps in {args.context}; it has {len(images) - k}")
    if args.mode == "world_model":
        if args.actions:
            given = _read_npz(args.actions, ("actions",), what="--actions")["actions"]
            given = wham.validate_actions(given, name=f"--actions {args.actions}")
            source = f"--actions {args.actions}"
        else:
            given, source = actions[k:], f"the steps after the context in {args.context}"
        if given.ndim != 2 or len(given) < args.steps:
            raise UserError(f"world_model mode needs {args.steps} actions (N, 16); {source} "
                            f"has {len(given) if given.ndim == 2 else given.shape}")
        clip["actions"] = given[:args.steps]
    return clip


def _check_counts(args: argparse.Namespace) -> None:
    for flag, value, low in (("--steps", args.steps, 1), ("--batch", args.batch, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")


def cmd_dream(args: argparse.Namespace) -> int:
    _check_counts(args)
    out = Path(args.out)
    for path in (out, Path(args.gif) if args.gif else None):
        if path is not None and not path.parent.is_dir():
            raise UserError(f"{path}: folder {path.parent} does not exist")
    sampling = wham.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              greedy=args.greedy)
    model = _load(args)
    clip = _clip(args, model)
    batch = args.batch

    def tile(x):
        return None if x is None else np.repeat(x[None], batch, axis=0)

    engine = wham.RolloutEngine(model, max_batch=batch)
    t0 = time.perf_counter()
    outputs = list(engine.rollout(
        context_images=tile(clip["context_images"]),
        context_actions=tile(clip["context_actions"]), steps=args.steps, mode=args.mode,
        actions=tile(clip.get("actions")), observations=tile(clip.get("observations")),
        sampling=sampling, seeds=[args.seed + b for b in range(batch)],
        max_context=args.max_context, decoding=args.decoding))
    seconds = time.perf_counter() - t0
    tokens_per_step = {"full": model.tokens_per_step, "world_model": model.tokens_per_image,
                       "policy": model.tokens_per_step - model.tokens_per_image}[args.mode]
    result = {
        "image_tokens": np.stack([o.image_tokens.numpy() for o in outputs], axis=1),
        "actions": np.stack([o.actions.numpy() for o in outputs], axis=1),
        "images": np.stack([o.images for o in outputs], axis=1),
    }
    with open(out, "wb") as fh:  # a file handle keeps numpy from appending ".npz"
        np.savez(fh, **result)
    if args.gif:
        _write_gif(args.gif, clip["context_images"], result["images"][0],
                   watermark=args.mode != "policy", model_id=model.model_id)
    tokens = batch * args.steps * tokens_per_step
    summary = {
        "generate_seconds": round(seconds, 4), "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2), "frames_per_s": round(
            batch * args.steps / seconds, 3),
        "batch": batch, "steps": args.steps, "mode": args.mode, "decoding": args.decoding,
        "model_id": model.model_id,
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "out": str(out),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{batch} x {args.steps} steps ({args.mode}) in {seconds:.2f}s: "
              f"{summary['tokens_per_s']} tokens/s, {summary['frames_per_s']} frames/s -> {out}")
    return 0


def _write_gif(path: str, context, frames_out, *, watermark: bool, model_id: str) -> None:
    """Context frames as they are, then the rollout's frames (marked when generated), upscaled
    like the pipeline's previews so small frames are visible."""
    frames = [(f, False) for f in context] + [(f, watermark) for f in frames_out]
    scale = auto_preview_scale(*context.shape[-2:])
    data = encode_gif(frames, scale=scale, watermark=watermark,
                      comment=f"generator=WHAM world model (wham-batch dream); model_id={model_id}")
    with open(path, "wb") as fh:
        fh.write(data)


def cmd_convert(args: argparse.Namespace) -> int:
    folder = wham.convert_checkpoint(args.checkpoint, args.out_dir)
    print(f"wrote {folder}")
    return 0


def _peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def cmd_bench_engine(args: argparse.Namespace) -> int:
    import torch

    _check_counts(args)
    if not 1 <= args.context_steps <= MAX_CONTEXT:
        raise UserError(f"--context-steps must be 1..{MAX_CONTEXT}, got {args.context_steps}")
    device, dtype = resolve_device(args.device, args.dtype)
    if device.type == "cpu" and args.threads:
        wham.set_cpu_threads(args.threads)
    model = wham.random_model(args.preset, seed=0, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    b, t = args.batch, args.context_steps
    inputs = {
        "context_tokens": torch.randint(1, model.image_vocab_size,
                                        (b, t, model.tokens_per_image), generator=g),
        "context_actions": torch.cat([torch.randint(0, 2, (b, t, 12), generator=g),
                                      torch.randint(0, 11, (b, t, 4), generator=g)], dim=2),
        "steps": args.steps, "mode": "full", "sampling": wham.SamplingParams(),
        "seeds": list(range(b)),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.naive:
        t0 = time.perf_counter()
        wham.naive_rollout(model, **inputs)
        seconds = time.perf_counter() - t0
    else:
        engine = wham.RolloutEngine(model, max_batch=b, compile=args.compile)
        list(engine.rollout(**{**inputs, "steps": 1}, decode_images=False))  # warm-up
        t0 = time.perf_counter()
        list(engine.rollout(**inputs, decode_images=False))
        seconds = time.perf_counter() - t0
    tokens = b * args.steps * model.tokens_per_step
    summary = {
        "preset": args.preset, "engine": "naive" if args.naive else "cached", "batch": b,
        "steps": args.steps, "context_steps": t, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "seconds": round(seconds, 4),
        "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
        "frames_per_s": round(b * args.steps / seconds, 4),
        "peak_memory_mb": round(_peak_memory_bytes(device) / 2**20, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


DREAM = Command("dream", "generate rollouts from one context clip on this machine",
                _dream_arguments, cmd_dream, description=__doc__, raw_description=True)
CONVERT = Command(
    "convert", "convert an official WHAM .ckpt into a native model folder", _convert_arguments,
    cmd_convert,
    description="Read an official Lightning checkpoint without running its pickled code and "
    "write config.json + model.safetensors into OUT_DIR.")
BENCH_ENGINE = Command(
    "bench-engine", "measure rollout speed with random weights", _bench_arguments,
    cmd_bench_engine,
    description="Full-mode rollouts from a random context of image tokens (the pixel "
    "tokenizer is not timed): tokens/s, frames/s and peak memory.")
