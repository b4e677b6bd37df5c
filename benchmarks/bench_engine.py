"""Rollout engine speed, measured side by side in one process, with random weights.

    python benchmarks/bench_engine.py            # CPU table -> docs/benchmarks.md "## Engine"
    python benchmarks/bench_engine.py --quick    # tiny preset only, prints, writes nothing
    python benchmarks/bench_engine.py --gpu      # what benchmarks/gpu_engine.sh runs

Steady state of a full-mode rollout from a 10-step context: the window is full and slides,
so every generated step is one prefill of the 9-step window, then `tokens_per_step - 1`
decoded tokens (the first comes out of the prefill). On the CPU a whole 200M step at batch 16
takes minutes, so each configuration times the engine's own `prefill` once and its
`decode_n_tokens` loop (sampling included) for a few tokens, and composes a step from those;
for the tiny preset a real end-to-end `RolloutEngine.rollout` is timed as well, as a check on
that composition. The pixel tokenizer is never timed. Figures are set against bounds measured
in the same run: a large tensor copy (memory bandwidth, which bounds batch-1 decode) and a
square matmul (compute, which bounds prefill).
"""

from __future__ import annotations

import argparse
import copy
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
from workers.wham.sampling import SamplingParams, sample_tokens  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Engine"
TIME_BUDGET_S = 330.0  # configurations left when this is spent are reported as skipped


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


def matmul_flops(device: torch.device, dtype: torch.dtype, *, n: int = 2048,
                 seconds: float = 1.0) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    repeats, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
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


def _flops(cfg, *, tokens: int, context: float) -> float:
    """Forward FLOPs of `tokens` tokens attending to `context` positions on average."""
    return 2 * tokens * cfg.n_layer * 12 * cfg.n_embd**2 + 4 * cfg.n_layer * tokens * context \
        * cfg.n_embd


def _window_tokens(model) -> int:
    tps = model.tokens_per_step
    return (model.gpt.config.block_size // tps - 1) * tps  # 9 steps


def measure_parts(model, *, batch: int, decode_tokens: int) -> dict:
    """Time one window prefill and `decode_tokens` decode steps of the engine's own loop."""
    device, cfg, tps = model.device, model.gpt.config, model.tokens_per_step
    decode_tokens = min(decode_tokens, tps - 1)  # stay within one step (and the block)
    engine = engine_mod.RolloutEngine(model, max_batch=batch)
    k, v = engine.cache.rows(batch)
    width = _window_tokens(model)
    g = torch.Generator().manual_seed(1)
    window = torch.randint(1, model.image_vocab_size, (batch, width), generator=g).to(device)
    seeds = torch.arange(batch, device=device)
    params = SamplingParams()

    def sample(logits, j):
        return sample_tokens(logits, params=params, lo=engine.lo[j], hi=engine.hi[j],
                             seeds=seeds, counter=j)

    step_fn = engine._step_fn(k, v)
    with torch.no_grad():
        logits = engine_mod.prefill(engine.gpt, window[:, :tps], k=k, v=v, start=0)  # warm-up
        engine_mod.decode_n_tokens(step_fn, logits, positions=range(2), start_pos=tps,
                                   sample=sample)
        _sync(device)
        t0 = time.perf_counter()
        logits = engine_mod.prefill(engine.gpt, window, k=k, v=v, start=0)
        _sync(device)
        t1 = time.perf_counter()
        engine_mod.decode_n_tokens(step_fn, logits, positions=range(decode_tokens + 1),
                                   start_pos=width, sample=sample)
        _sync(device)
        t2 = time.perf_counter()
    prefill_s, token_s = t1 - t0, (t2 - t1) / decode_tokens
    item = torch.empty((), dtype=model.dtype).element_size()
    weight_bytes = (cfg.n_layer * 12 * cfg.n_embd**2 + cfg.vocab_size * cfg.n_embd) * item
    kv_bytes = 2 * cfg.n_layer * batch * (width + tps / 2) * cfg.n_embd * item
    step_s = prefill_s + (tps - 1) * token_s
    return {
        "prefill_s": prefill_s, "decode_ms_per_token": 1e3 * token_s, "step_s": step_s,
        "tokens_per_s": batch * tps / step_s, "frames_per_s": batch / step_s,
        "prefill_flops": _flops(cfg, tokens=batch * width, context=width / 2) / prefill_s,
        "decode_flops": _flops(cfg, tokens=batch, context=width + tps / 2) / token_s,
        "decode_bytes_per_s": (weight_bytes + kv_bytes) / token_s,
    }


def run_engine(model, *, batch: int, steps: int, compile: bool = False) -> dict:
    """End-to-end RolloutEngine.rollout time (after a one-step warm-up)."""
    engine = engine_mod.RolloutEngine(model, max_batch=batch, compile=compile)
    inputs = _inputs(model, batch=batch, steps=steps)
    list(engine.rollout(**{**inputs, "steps": 1}, decode_images=False))
    _sync(model.device)
    t0 = time.perf_counter()
    list(engine.rollout(**inputs, decode_images=False))
    seconds = time.perf_counter() - t0
    tokens = batch * steps * model.tokens_per_step
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "frames_per_s": batch * steps / seconds}


def naive_token_seconds(model, *, batch: int, real: bool) -> float:
    """Seconds per generated token of the full-recompute reference."""
    if real:  # the actual naive sampler for one step
        t0 = time.perf_counter()
        naive_rollout(model, **_inputs(model, batch=batch, steps=1))
        return (time.perf_counter() - t0) / model.tokens_per_step
    # big shapes: naive = one full forward of the window per token; time one such forward at
    # the mean length a step sees
    length = _window_tokens(model) + model.tokens_per_step // 2
    idx = torch.randint(0, model.gpt.config.vocab_size, (batch, length), device=model.device)
    with torch.no_grad():
        model.gpt(idx[:, :64])
        _sync(model.device)
        t0 = time.perf_counter()
        model.gpt(idx)
        _sync(model.device)
    return time.perf_counter() - t0


def cpu_table(presets: list[str], *, batches: tuple[int, ...]) -> tuple[list, dict]:
    device, start = torch.device("cpu"), time.perf_counter()
    bounds = {"copy_GBps": memory_bandwidth(device) / 1e9,
              "float32_GFLOPs": matmul_flops(device, torch.float32) / 1e9,
              "bfloat16_GFLOPs": matmul_flops(device, torch.bfloat16) / 1e9,
              "load_average": os.getloadavg()[0]}
    print(json.dumps({"bounds": {k: round(v, 1) for k, v in bounds.items()}}), flush=True)
    rows = []
    for preset in presets:
        small = preset == "tiny"
        f32 = random_model(preset, seed=0, device=device)
        models = {"bfloat16": copy.deepcopy(f32).place(device=device, dtype=torch.bfloat16),
                  "float32": f32}
        for batch in batches:
            for name, model in models.items():
                row = {"preset": preset, "dtype": name, "batch": batch}
                if time.perf_counter() - start > TIME_BUDGET_S:
                    rows.append({**row, "skipped": True})
                    continue
                # The load on a shared machine drifts: bound each row just before measuring it.
                copy_bw = memory_bandwidth(device, mbytes=256, repeats=3) / 1e9
                flops = matmul_flops(device, model.dtype, seconds=0.5) / 1e9
                row.update(measure_parts(model, batch=batch, decode_tokens=16 if small else 8))
                if small:
                    row["e2e_tokens_per_s"] = run_engine(model, batch=batch, steps=2)[
                        "tokens_per_s"]
                naive = (naive_token_seconds(model, batch=batch, real=small)
                         if small or batch == 1 else None)
                per_token = row["step_s"] / model.tokens_per_step
                row["speedup_vs_naive"] = None if naive is None else naive / per_token
                row.update(bound_GFLOPs=flops, bound_copy_GBps=copy_bw,
                           prefill_of_bound=row["prefill_flops"] / 1e9 / flops,
                           decode_of_bandwidth=row["decode_bytes_per_s"] / 1e9 / copy_bw)
                rows.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in row.items()}), flush=True)
        del models
    return rows, bounds


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table_row(r: dict) -> str:
    if r.get("skipped"):
        return f"| {r['preset']} | {r['dtype']} | {r['batch']} | skipped (time budget) |" \
            + " |" * 9
    return (
        f"| {r['preset']} | {r['dtype']} | {r['batch']} | {_fmt(r['tokens_per_s'])} "
        f"| {_fmt(r.get('e2e_tokens_per_s'))} | {_fmt(r['frames_per_s'], 3)} "
        f"| {_fmt(r['prefill_s'], 2)} | {_fmt(r['decode_ms_per_token'], 1)} "
        f"| {_fmt(r['prefill_flops'] / 1e9, 1)} ({_fmt(100 * r['prefill_of_bound'], 0)}%) "
        f"| {_fmt(r['decode_bytes_per_s'] / 1e9, 2)} ({_fmt(100 * r['decode_of_bandwidth'], 0)}%)"
        f" | {_fmt(r['decode_flops'] / 1e9, 1)} | {_fmt(r['speedup_vs_naive'])} "
        f"| {_fmt(r['bound_GFLOPs'], 0)}, {_fmt(r['bound_copy_GBps'])} |"
    )


def _summary(rows: list) -> list[str]:
    """One paragraph of ranges over the real-shape rows, computed from the table."""
    big = [r for r in rows if r["preset"] != "tiny" and not r.get("skipped")]
    if not big:
        return []

    def span(key: str, scale: float = 1.0, digits: int = 0) -> str:
        values = [r[key] * scale for r in big if r.get(key) is not None]
        return f"{min(values):.{digits}f}-{max(values):.{digits}f}"

    batch1 = [r for r in big if r["batch"] == 1]
    return [
        f"Reading: for {big[0]['preset']} the prefill ran at {span('prefill_of_bound', 100)}% "
        "of the matmul bound measured beside it and batch-1 decode moved "
        f"{min(r['decode_of_bandwidth'] for r in batch1) * 100:.0f}-"
        f"{max(r['decode_of_bandwidth'] for r in batch1) * 100:.0f}% of the copy bandwidth; "
        f"with the cache a token cost {span('speedup_vs_naive', digits=1)}x less than a full "
        "recompute. The tiny rows measure per-operation overhead (its matrices are 32 wide) and "
        "swing with the machine's load.", "",
    ]


def write_docs(rows: list, bounds: dict, *, seconds: float, command: str) -> None:
    lines = [
        SECTION, "",
        "Steady-state full-mode rollouts with random weights (window full and sliding: per "
        "generated step one prefill of 9 steps, then one step of decoded tokens; the pixel "
        "tokenizer is not timed). One process, one run: "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
        f"{platform.machine()}, {seconds:.0f} s in all, 1-minute load average "
        f"{bounds['load_average']:.1f} at the start. The machine may be shared, so compare "
        "rows with each other and with the bounds measured beside them.", "",
        f"Command: `{command}`", "",
        f"Bounds at the start of the run: tensor copy {bounds['copy_GBps']:.1f} GB/s; square "
        f"matmul {bounds['float32_GFLOPs']:.0f} GFLOP/s float32, "
        f"{bounds['bfloat16_GFLOPs']:.0f} GFLOP/s bfloat16 (quiet-machine figures: about 190 "
        "and 900). Because the load drifted, each row is also set against a matmul (its "
        "dtype) and a copy measured just before it (last column); the percentages use those.",
        "",
        "`wham-200m` is the real 200M transformer (chinchilla-251M: 16 layers, 16 heads, width "
        "1024) with the preset's token layout (assumed: 128x128 frames, 8x8 = 64 image tokens "
        "from a 4096-code taming VQ-GAN, so 80 tokens per step and a 720-token window); the "
        "released checkpoint may use more tokens per image, which lengthens the prefill but "
        "not the per-token decode traffic.", "",
        "| preset | dtype | batch | tokens/s | e2e tokens/s | frames/s | prefill s "
        "| decode ms/token | prefill GFLOP/s (of bound) | decode GB/s (of copy) "
        "| decode GFLOP/s | x faster than naive | row bounds: GFLOP/s, copy GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_table_row(r) for r in rows),
        "",
        "tokens/s and frames/s are per steady-state step, composed from the measured prefill "
        "and per-token decode time (sampling included) of the engine's own `prefill` and "
        "`decode_n_tokens`; \"e2e\" is a real `RolloutEngine.rollout` of two steps, run for "
        "the tiny preset to check that composition. Decode GB/s counts the weights plus the "
        "KV cache read per token step: batch-1 decode is bound by that traffic, larger batches "
        "by compute. \"vs naive\": time per generated token of the full-recompute reference "
        "(`naive_rollout`, which re-runs the window for every token) over the engine's; for "
        "wham-200m it is one full window forward at the mean length, timed at batch 1.", "",
        *_summary(rows),
        "CUDA: `bash benchmarks/gpu_engine.sh` measures the 200M shape in bfloat16 at batch "
        "1, 8 and 32 (eager and compiled decode, end to end) and prints one JSON line; it was "
        "not run for this table (no GPU here).", "",
    ]
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = "\n".join(lines)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    DOCS.write_text(text.rstrip() + "\n")


def gpu_main() -> dict:
    """200M shape, bfloat16, batch 1/8/32 on CUDA (tiny smoke run on a CPU-only machine)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset, batches, steps = ("wham-200m", (1, 8, 32), 3) if cuda else ("tiny", (1, 2), 1)
    model = random_model(preset, seed=0, device=device, dtype=torch.bfloat16)
    copy = memory_bandwidth(device, mbytes=1024 if cuda else 64) / 1e9
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu (smoke run)",
              "preset": preset, "dtype": "bfloat16", "copy_GBps": round(copy, 1),
              "flash_attn": engine_mod.flash_available(device, torch.bfloat16), "runs": []}
    start = time.perf_counter()
    for batch in batches:
        for compile in (False, True) if cuda else (False,):
            if compile and time.perf_counter() - start > 150:
                continue  # keep the whole script under five minutes
            run = {"batch": batch, "compile": compile}
            try:
                run.update(run_engine(model, batch=batch, steps=steps, compile=compile))
                if not compile:  # the prefill / decode split of the eager engine
                    parts = measure_parts(model, batch=batch, decode_tokens=32)
                    run.update({f"eager_{k}": v for k, v in parts.items()})
                    run["eager_decode_of_copy"] = parts["decode_bytes_per_s"] / 1e9 / copy
            except Exception as exc:  # a failed compile is a result worth printing
                result["runs"].append({**run, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            result["runs"].append({k: round(v, 4) if isinstance(v, float) else v
                                   for k, v in run.items()})
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
    presets = ["tiny"] if args.quick else ["tiny", "wham-200m"]
    rows, bounds = cpu_table(presets, batches=(1, 4, 16))
    if not args.quick:
        command = "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]])
        write_docs(rows, bounds, seconds=time.perf_counter() - t0, command=command)
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
