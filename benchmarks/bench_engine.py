"""Rollout engine speed, measured side by side in one process, with random weights.

    python benchmarks/bench_engine.py            # CPU table -> docs/benchmarks.md "## Engine"
    python benchmarks/bench_engine.py --quick    # tiny preset only, prints, writes nothing
    python benchmarks/bench_engine.py --gpu      # what benchmarks/gpu_engine.sh runs

Every configuration runs full-mode rollouts from a 10-step context of random image tokens,
so the window is full and slides: each generated step is one prefill of the 9-step window
plus `tokens_per_step` decoded tokens. The pixel tokenizer is not timed. Prefill time is
measured by wrapping the engine's `prefill` function; decode time is the rest. Figures are
set against bounds measured in the same run: a large tensor copy (memory bandwidth, which
bounds batch-1 decode) and a square matmul (compute, which bounds prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.wham import engine as engine_mod  # noqa: E402
from workers.wham import naive_rollout, random_model  # noqa: E402
from workers.wham.sampling import SamplingParams  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Engine"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device: torch.device, *, mbytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write)."""
    src = torch.empty(mbytes * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * 4 * repeats / (time.perf_counter() - t0)


def matmul_flops(device: torch.device, dtype: torch.dtype, *, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    repeats, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ b
        repeats += 1
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def _inputs(model, *, batch: int, steps: int, context: int = 10) -> dict:
    g = torch.Generator().manual_seed(0)
    n = model.tokens_per_image
    return {
        "context_tokens": torch.randint(1, model.image_vocab_size, (batch, context, n),
                                        generator=g),
        "context_actions": torch.cat([torch.randint(0, 2, (batch, context, 12), generator=g),
                                      torch.randint(0, 11, (batch, context, 4), generator=g)], 2),
        "steps": steps, "mode": "full", "sampling": SamplingParams(),
        "seeds": list(range(batch)),
    }


def _flops(cfg, *, tokens: int, context: int) -> float:
    """Forward FLOPs for `tokens` new tokens attending to `context` positions on average."""
    matmul = cfg.n_layer * 12 * cfg.n_embd**2
    return 2 * tokens * matmul + 4 * cfg.n_layer * tokens * context * cfg.n_embd


def run_engine(model, *, batch: int, steps: int, compile: bool = False) -> dict:
    """End-to-end engine time, split into prefill and decode."""
    device, cfg, tps = model.device, model.gpt.config, model.tokens_per_step
    engine = engine_mod.RolloutEngine(model, max_batch=batch, compile=compile)
    spent = {"prefill": 0.0}
    original = engine_mod.prefill

    def timed_prefill(*args, **kwargs):
        _sync(device)
        t = time.perf_counter()
        out = original(*args, **kwargs)
        _sync(device)
        spent["prefill"] += time.perf_counter() - t
        return out

    inputs = _inputs(model, batch=batch, steps=steps)
    engine_mod.prefill = timed_prefill
    try:
        warm = {**inputs, "steps": 1}
        list(engine.rollout(**warm, decode_images=False))  # allocator, kernels, graphs
        spent["prefill"] = 0.0
        _sync(device)
        t0 = time.perf_counter()
        list(engine.rollout(**inputs, decode_images=False))
        total = time.perf_counter() - t0
    finally:
        engine_mod.prefill = original
    window = (model.gpt.config.block_size // tps - 1) * tps  # 9 steps
    decoded = steps * (tps - 1)  # the first token of a step comes out of the prefill
    decode_s = total - spent["prefill"]
    item = torch.empty((), dtype=model.dtype).element_size()
    weight_bytes = (cfg.n_layer * 12 * cfg.n_embd**2 + cfg.vocab_size * cfg.n_embd) * item
    kv_bytes = 2 * cfg.n_layer * batch * (window + tps / 2) * cfg.n_embd * item
    return {
        "seconds": total, "tokens": batch * steps * tps,
        "tokens_per_s": batch * steps * tps / total, "frames_per_s": batch * steps / total,
        "prefill_s": spent["prefill"], "decode_ms_per_token": 1e3 * decode_s / decoded,
        "prefill_flops": steps * _flops(cfg, tokens=batch * window, context=window // 2)
        / max(spent["prefill"], 1e-9),
        "decode_flops": steps * _flops(cfg, tokens=batch * (tps - 1), context=window + tps // 2)
        / max(decode_s, 1e-9),
        "decode_bytes_per_s": decoded * (weight_bytes + kv_bytes) / max(decode_s, 1e-9),
    }


def naive_token_seconds(model, *, batch: int, preset_small: bool) -> float:
    """Seconds per generated token of the full-recompute reference."""
    tps = model.tokens_per_step
    if preset_small:  # cheap enough to run the real naive sampler for one step
        inputs = _inputs(model, batch=batch, steps=1)
        t0 = time.perf_counter()
        naive_rollout(model, **inputs)
        return (time.perf_counter() - t0) / tps
    # Big shapes: naive = one full forward of the window per token; time one such forward
    # at the mean length a step sees.
    length = (model.gpt.config.block_size // tps - 1) * tps + tps // 2
    idx = torch.randint(0, model.gpt.config.vocab_size, (batch, length), device=model.device)
    with torch.no_grad():
        model.gpt(idx[:, :64])
        _sync(model.device)
        t0 = time.perf_counter()
        model.gpt(idx)
        _sync(model.device)
    return time.perf_counter() - t0


def cpu_table(presets: list[tuple[str, int]], *, batches: tuple[int, ...]) -> tuple[list, dict]:
    device = torch.device("cpu")
    bounds = {"copy_GBps": memory_bandwidth(device) / 1e9,
              "float32_GFLOPs": matmul_flops(device, torch.float32) / 1e9,
              "bfloat16_GFLOPs": matmul_flops(device, torch.bfloat16) / 1e9}
    print(json.dumps({"bounds": {k: round(v, 1) for k, v in bounds.items()}}), flush=True)
    rows = []
    for preset, steps in presets:
        model = random_model(preset, seed=0, device=device)
        for dtype in (torch.float32, torch.bfloat16):
            model.place(device=device, dtype=dtype)
            name = str(dtype).removeprefix("torch.")
            for batch in batches:
                r = run_engine(model, batch=batch, steps=steps)
                naive = None
                if batch == 1 or preset == "tiny":
                    naive = naive_token_seconds(model, batch=batch, preset_small=preset == "tiny")
                per_token = r["seconds"] / (steps * model.tokens_per_step)
                row = {"preset": preset, "dtype": name, "batch": batch, "steps": steps, **r,
                       "speedup_vs_naive": None if naive is None else naive / per_token,
                       "prefill_of_bound": r["prefill_flops"] / 1e9 / bounds[f"{name}_GFLOPs"],
                       "decode_of_bandwidth": r["decode_bytes_per_s"] / 1e9 / bounds["copy_GBps"]}
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                  for k, v in row.items()}), flush=True)
        del model
    return rows, bounds


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_docs(rows: list, bounds: dict, *, seconds: float, command: str) -> None:
    lines = [
        SECTION, "",
        "Full-mode rollouts with random weights from a 10-step context (the window is full and "
        "slides, so every generated step is one prefill of 9 steps plus one step of decoded "
        "tokens; the pixel tokenizer is not timed). One process, one run, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
        f"{platform.machine()}; total {seconds:.0f} s. The machine was shared with other work, "
        "so absolute numbers are noisy; ratios within the table were measured side by side.",
        "",
        f"Command: `{command}`", "",
        f"Bounds measured in the same run: tensor copy {bounds['copy_GBps']:.1f} GB/s; matmul "
        f"{bounds['float32_GFLOPs']:.0f} GFLOP/s float32, {bounds['bfloat16_GFLOPs']:.0f} "
        "GFLOP/s bfloat16.", "",
        "`wham-200m` is the real 200M transformer (chinchilla-251M: 16 layers, 16 heads, width "
        "1024) with the preset's token layout (assumed: 128x128 frames, 8x8 = 64 image tokens "
        "from a 4096-code taming VQ-GAN, 80 tokens per step, 800-token block); the released "
        "checkpoint's tokenizer may use more tokens per image, which lengthens the window "
        "(prefill) but not the per-token decode weights.", "",
        "| preset | dtype | batch | tokens/s | frames/s | prefill s/step | decode ms/token "
        "| prefill GFLOP/s (of bound) | decode GB/s (of copy bw) | vs naive |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = r["steps"]
        lines.append(
            f"| {r['preset']} | {r['dtype']} | {r['batch']} | {_fmt(r['tokens_per_s'])} "
            f"| {_fmt(r['frames_per_s'], 3)} | {_fmt(r['prefill_s'] / steps, 2)} "
            f"| {_fmt(r['decode_ms_per_token'], 2)} "
            f"| {_fmt(r['prefill_flops'] / 1e9, 0)} ({_fmt(100 * r['prefill_of_bound'], 0)}%) "
            f"| {_fmt(r['decode_bytes_per_s'] / 1e9)} ({_fmt(100 * r['decode_of_bandwidth'], 0)}%) "
            f"| {_fmt(r['speedup_vs_naive'])}x |"
        )
    lines += [
        "",
        "\"vs naive\": time per generated token of the full-recompute reference sampler "
        "(`naive_rollout`, which re-runs the whole window for every token) divided by the "
        "engine's; for wham-200m it is one full window forward at the mean length, timed at "
        "batch 1. Decode GB/s counts the weights plus the KV cache read per token step; at "
        "batch 1 decode is bound by that traffic, at larger batches by compute.", "",
        "CUDA: `bash benchmarks/gpu_engine.sh` measures the 200M shape in bfloat16 at batch "
        "1, 8 and 32 (eager and compiled decode) and prints one JSON line; it was not run for "
        "this table (no GPU here).", "",
    ]
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = "\n".join(lines)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOCS.write_text(text.rstrip() + "\n")


def gpu_main() -> dict:
    """200M shape, bfloat16, batch 1/8/32 on CUDA (tiny smoke run on a CPU-only machine)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset, batches, steps = ("wham-200m", (1, 8, 32), 2) if cuda else ("tiny", (1, 2), 1)
    model = random_model(preset, seed=0, device=device, dtype=torch.bfloat16)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu (smoke run)",
              "preset": preset, "dtype": "bfloat16", "flash_attn": engine_mod.flash_available(
                  device, torch.bfloat16),
              "copy_GBps": round(memory_bandwidth(device, mbytes=1024 if cuda else 64) / 1e9, 1),
              "runs": []}
    start = time.perf_counter()
    for batch in batches:
        for compile in (False, True) if cuda else (False,):
            if compile and time.perf_counter() - start > 150:
                continue  # keep the whole script under five minutes
            try:
                r = run_engine(model, batch=batch, steps=steps, compile=compile)
            except Exception as exc:  # a compile failure is a result worth printing
                result["runs"].append({"batch": batch, "compile": compile, "error": str(exc)[:300]})
                continue
            r["decode_of_bandwidth"] = r["decode_bytes_per_s"] / 1e9 / result["copy_GBps"]
            result["runs"].append({"batch": batch, "compile": compile,
                                   **{k: round(v, 4) for k, v in r.items()}})
    if cuda:
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset only; no docs")
    parser.add_argument("--gpu", action="store_true", help="the gpu_engine.sh measurement")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.gpu:
        print(json.dumps(gpu_main()))
        return 0
    t0 = time.perf_counter()
    presets = [("tiny", 2)] if args.quick else [("tiny", 2), ("wham-200m", 1)]
    rows, bounds = cpu_table(presets, batches=(1, 4, 16))
    if not args.quick:
        command = "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]])
        write_docs(rows, bounds, seconds=time.perf_counter() - t0, command=command)
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
