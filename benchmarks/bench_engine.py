"""Rollout engine speed on the 540-token layout, measured beside its physical floor.

    python benchmarks/bench_engine.py              # CPU figures -> docs/benchmarks.md "## Engine"
    python benchmarks/bench_engine.py --quick      # tiny preset, prints, writes nothing
    python benchmarks/bench_engine.py --fidelity   # bfloat16 vs float32 tokens -> its subsection
    python benchmarks/bench_engine.py --gpu        # what benchmarks/gpu_engine.sh runs

Layout (preset `wham-200m-540`): the 200M transformer (16 layers, 16 heads, width 1024) over
the 300x180 ViT-VQGAN layout (540 image + 16 action tokens per step), random weights, float32,
context of 2 steps, 1 generated step, greedy: the setting in which the official code is
compared (benchmarks/bench_official.py). Per batch size (1 and 4): one real
`RolloutEngine.generate` step end to end, then the engine's own `Decoder.prefill` and
`decode_n_tokens` (sampling included) through the public step API, with the quality
statistics on and off. The yardstick is the physical floor of one decoded token: the bytes
it must read (every 2-D weight of the GPT once, the tied head once, plus the keys and values
cached so far) over the memory read bandwidth measured in the same run. Beside it, as
context: the same weight products as `x @ W.T` through torch's default BLAS and through the
engine's prepacked kernel, and torch.profiler's split of one decoded token by operator. Each
small timing is the best of a few repeats, so a load spike on a shared machine does not
decide it. The pixel tokenizer is never timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docs_section import command_line, provenance, replace_section  # noqa: E402

from workers.wham import (  # noqa: E402
    RolloutEngine,
    SamplingParams,
    decode_n_tokens,
    prepare_rollout,
    random_model,
)
from workers.wham.gpt import KVCache, flash_available  # noqa: E402
from workers.wham.linear import Linear, packed_view  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Engine"
FIDELITY_SECTION = "### bfloat16 on the CPU"
PRESET = "wham-200m-540"
CONTEXT_STEPS = 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], object], *, repeats: int = 3, device=None) -> float:
    """Fastest of `repeats` timed calls (after one untimed call), in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device or torch.device("cpu"))
        t0 = time.perf_counter()
        fn()
        _sync(device or torch.device("cpu"))
        times.append(time.perf_counter() - t0)
    return min(times)


def read_bandwidth(device: torch.device, *, mbytes: int = 512) -> float:
    """Bytes/s of reading a large tensor (a sum)."""
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    return x.numel() * 4 / best_of(x.sum, device=device)


def _weights(model) -> list[torch.Tensor]:
    """Every 2-D weight a decode step multiplies by (the tied head once)."""
    return [m.weight.detach() for m in model.gpt.modules() if isinstance(m, Linear)]


def physical_floor(model, *, batch: int, cached: int) -> dict:
    """The floor of one decoded token at this batch: the bytes it must read (every 2-D weight
    once, the keys and values of `cached` positions per row) over the read bandwidth measured
    now; beside it, as context, the weight products through torch's default BLAS (`x @ W.T`)
    and through the prepacked kernel the engine uses."""
    weights = _weights(model)
    g = torch.Generator().manual_seed(0)
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], generator=g).to(model.device, model.dtype)
          for w in weights}
    view = packed_view(model.gpt) or model.gpt  # the engine's prepacked copy, as it runs
    packed = [m for m in view.modules() if isinstance(m, Linear)]
    with torch.no_grad():
        plain = best_of(lambda: [xs[w.shape[1]] @ w.T for w in weights], device=model.device)
        kernel = best_of(lambda: [m(xs[m.in_features]) for m in packed], device=model.device)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    kv_bytes = KVCache.bytes_for(model.gpt.config, batch=batch, max_seq=cached,
                                 dtype=model.dtype)
    bandwidth = read_bandwidth(model.device)
    return {"floor_ms": 1e3 * (weight_bytes + kv_bytes) / bandwidth,
            "read_GBps": bandwidth / 1e9, "weight_MB": weight_bytes / 1e6,
            "kv_MB": kv_bytes / 1e6, "xWT_ms": 1e3 * plain, "kernel_ms": 1e3 * kernel,
            "xWT_GBps": weight_bytes / plain / 1e9, "kernel_GBps": weight_bytes / kernel / 1e9}


def profile_token(model, *, batch: int, tokens: int = 4) -> dict[str, float]:
    """torch.profiler's self CPU ms per decoded token, by operator (engine's step API)."""
    engine = RolloutEngine(model, max_batch=batch)
    r = _rollout(model, batch=batch)
    decoder, sampler = engine.decoder(batch), engine.sampler(r)
    window = r.history.reshape(batch, -1)  # [B, 2 * tps]
    with torch.no_grad():
        logits = decoder.prefill(window, start=0)

        def run() -> None:
            decode_n_tokens(decoder, logits, positions=range(tokens + 1),
                            start_pos=window.shape[1],
                            sample=lambda lg, j: sampler.sample(lg, step=0, position=j))

        run()  # warm
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
    return {e.key: e.self_cpu_time_total / 1e3 / tokens for e in prof.key_averages()}


def _rollout(model, *, batch: int, steps: int = 1, context: int = CONTEXT_STEPS):
    g = torch.Generator().manual_seed(0)
    return prepare_rollout(
        model, context_tokens=torch.randint(1, model.image_vocab_size,
                                            (batch, context, model.tokens_per_image), generator=g),
        context_actions=torch.cat([torch.randint(0, 2, (batch, context, 12), generator=g),
                                   torch.randint(0, 11, (batch, context, 4), generator=g)], 2),
        steps=steps, mode="full", seeds=list(range(batch)), decode_images=False,
        sampling=SamplingParams(greedy=True), max_batch=batch)


def measure_decode(model, *, batch: int, tokens: int = 8, end_to_end: bool = True) -> dict:
    """Prefill of the 2-step window and ms per decoded token (stats on / off), engine's own
    step API; then (unless skipped) one real generated step end to end."""
    tokens = min(tokens, model.tokens_per_step - 1)  # stay within one step
    engine = RolloutEngine(model, max_batch=batch)
    r = _rollout(model, batch=batch)
    decoder = engine.decoder(batch)
    window = r.history.reshape(batch, -1)  # [B, 2 * tps]
    width = window.shape[1]
    out = {}
    with torch.no_grad():
        out["prefill_s"] = best_of(lambda: decoder.prefill(window, start=0), repeats=1,
                                   device=model.device)
        logits = decoder.prefill(window, start=0)
        for stats in (True, False, True, False):  # interleaved, so drift hits both
            sampler = engine.sampler(r, stats=stats)

            def run(sampler=sampler):
                decode_n_tokens(decoder, logits, positions=range(tokens + 1), start_pos=width,
                                sample=lambda lg, j: sampler.sample(lg, step=0, position=j))

            key = "decode_ms" if stats else "decode_nostats_ms"
            ms = 1e3 * best_of(run, repeats=2, device=model.device) / tokens
            out[key] = min(out.get(key, ms), ms)
    out.update(e2e_s=None, e2e_tokens_per_s=None)
    if end_to_end:
        _sync(model.device)
        t0 = time.perf_counter()
        list(engine.generate(r))
        _sync(model.device)
        seconds = time.perf_counter() - t0
        out.update(e2e_s=seconds, e2e_tokens_per_s=batch * model.tokens_per_step / seconds)
    out.update(cached_positions=width + tokens // 2,
               stats_overhead=out["decode_ms"] / out["decode_nostats_ms"] - 1)
    return out


def cpu_run(preset: str, batches: tuple[int, ...], *, end_to_end: bool = True) -> dict:
    device = torch.device("cpu")
    model = random_model(preset, seed=0, device=device)
    result = {"preset": preset, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0], "rows": [], "profile": {}}
    for batch in batches:
        row = {"batch": batch, **measure_decode(model, batch=batch, end_to_end=end_to_end)}
        row.update(physical_floor(model, batch=batch, cached=row["cached_positions"]))
        row["decode_of_floor"] = row["decode_ms"] / row["floor_ms"]
        result["rows"].append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                          for k, v in row.items()}), flush=True)
        result["profile"][batch] = profile_token(model, batch=batch)
    result["load_average_end"] = os.getloadavg()[0]
    rows = result["rows"]
    if len(rows) > 1:
        result["batch_cost_ratio"] = rows[-1]["decode_ms"] / rows[0]["decode_ms"]
    return result


def fidelity(*, steps: int = 5, batch: int = 1) -> dict:
    """Greedy tokens of a bfloat16 model against float32 over `steps` generated steps."""
    f32 = random_model(PRESET, seed=0)
    bf16 = random_model(PRESET, seed=0, dtype=torch.bfloat16)
    outs, seconds = {}, {}
    for name, model in (("float32", f32), ("bfloat16", bf16)):
        engine = RolloutEngine(model, max_batch=batch)
        t0 = time.perf_counter()
        outs[name] = list(engine.generate(_rollout(model, batch=batch, steps=steps)))
        seconds[name] = time.perf_counter() - t0
    pairs = list(zip(outs["float32"], outs["bfloat16"], strict=True))
    image = torch.stack([(x.image_tokens == y.image_tokens).float().mean() for x, y in pairs])
    action = torch.stack([(x.actions == y.actions).float().mean() for x, y in pairs])
    first_diff = next((i for i, (x, y) in enumerate(pairs)
                       if not torch.equal(x.image_tokens, y.image_tokens)), None)
    return {"preset": PRESET, "steps": steps, "batch": batch,
            "image_token_match": image.mean().item(), "action_token_match": action.mean().item(),
            "image_match_per_step": [round(v, 4) for v in image.tolist()],
            "first_step_with_a_difference": first_diff,
            "seconds_float32": seconds["float32"], "seconds_bfloat16": seconds["bfloat16"]}


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


FLOOR_TARGET = 1.3  # decode within 1.3x of the physical floor
BATCH_TARGET = 2.0  # batch 4 at most 2x batch 1 per token


def _speed_table(rows: list[dict]) -> list[str]:
    return [
        "| batch | prefill s (2 steps) | decode ms/token | without stats | physical floor ms "
        "(weights + KV / read bandwidth) | decode / physical floor | one step end to end, "
        "tokens/s |", "|---|---|---|---|---|---|---|",
        *(f"| {r['batch']} | {_fmt(r['prefill_s'], 2)} | {_fmt(r['decode_ms'])} "
          f"| {_fmt(r['decode_nostats_ms'])} | {_fmt(r['floor_ms'])} "
          f"| {_fmt(r['decode_of_floor'], 2)}x | {_fmt(r['e2e_tokens_per_s'])} |" for r in rows),
        "", "| batch | weight MB | KV MB read | read bandwidth GB/s | context: `x @ W.T` ms "
        "(default BLAS) | context: prepacked kernel ms | weights read by `x @ W.T`, GB/s | "
        "weights read by the kernel, GB/s |", "|---|---|---|---|---|---|---|---|",
        *(f"| {r['batch']} | {r['weight_MB']:.0f} | {r['kv_MB']:.0f} | {_fmt(r['read_GBps'])} "
          f"| {_fmt(r['xWT_ms'])} | {_fmt(r['kernel_ms'])} | {_fmt(r['xWT_GBps'])} "
          f"| {_fmt(r['kernel_GBps'])} |" for r in rows)]


def _profile_table(profile: dict[int, dict[str, float]], *, top: int = 6) -> list[str]:
    batches = sorted(profile)
    totals = {b: sum(profile[b].values()) for b in batches}
    names = sorted({n for b in batches for n in profile[b]},
                   key=lambda n: -sum(profile[b].get(n, 0.0) for b in batches))[:top]
    def cell(b: int, n: str | None) -> str:
        ms = profile[b].get(n, 0.0) if n else totals[b] - sum(profile[b].get(m, 0.0)
                                                               for m in names)
        return f"{ms:.1f} ({100 * ms / totals[b]:.0f}%)"
    return ["| operator (self CPU time) | " + " | ".join(f"batch {b}, ms/token" for b in batches)
            + " |", "|---|" + "---|" * len(batches),
            *(f"| `{n}` | " + " | ".join(cell(b, n) for b in batches) + " |" for n in names),
            "| everything else | " + " | ".join(cell(b, None) for b in batches) + " |",
            "| total under the profiler | " + " | ".join(f"{totals[b]:.1f}" for b in batches)
            + " |"]


def _verdict(result: dict) -> str:
    rows = result["rows"]
    worst = max(r["decode_of_floor"] for r in rows)
    ratio = result.get("batch_cost_ratio", float("nan"))
    floor = "met" if worst <= FLOOR_TARGET else "not met"
    batch = "met" if ratio <= BATCH_TARGET else "not met"
    return (f"Targets: decode within {FLOOR_TARGET}x of the physical floor: {floor} (at most "
            f"{worst:.2f}x here); batch {rows[-1]['batch']} at most {BATCH_TARGET:g}x batch "
            f"{rows[0]['batch']} per token: {batch} ({ratio:.2f}x here).")


def write_docs(result: dict, *, seconds: float, command: str) -> None:
    rows = result["rows"]
    overhead = ", ".join(f"{100 * r['stats_overhead']:+.1f}% at batch {r['batch']}"
                         for r in rows)
    prose = [
        provenance(command, load=(result["load_average"], result["load_average_end"]),
                   seconds=seconds, note=f"{result['threads']} CPU threads"),
        f"`{PRESET}`: the 200M transformer (chinchilla-251M: 16 layers, 16 heads, width 1024) "
        "over the 300x180 ViT-VQGAN layout (540 image + 16 action tokens per step), random "
        "weights, float32, context of 2 steps, 1 generated step, greedy. Decode ms/token is "
        "the engine's own `Decoder` + `decode_n_tokens` (sampling and the quality statistics "
        f"included) with {rows[0]['cached_positions']:,} cached positions; every small timing "
        "is the best of a few repeats.",
        "The physical floor is what one decoded token must read: every 2-D weight of the GPT "
        "once (the tied head once) and the keys and values cached so far, over the read "
        "bandwidth of a large sum measured in this run. As context only: the same weight "
        "products through torch's default BLAS (`x @ W.T`) and through the prepacked oneDNN "
        "weights the engine uses on the CPU, and the rate at which each reads the weights.",
    ]
    lines = [
        SECTION, "", *(textwrap.fill(p, 92, break_on_hyphens=False) + "\n" for p in prose),
        *_speed_table(rows), "",
        textwrap.fill(f"{_verdict(result)} Quality statistics: {overhead} of decode time.",
                      92, break_on_hyphens=False), "",
        textwrap.fill("Where one decoded token's time goes (torch.profiler over a few tokens "
                      "through the same step API, self CPU time per operator, the profiler's "
                      "own overhead included):", 92), "",
        *_profile_table(result["profile"]), "",
    ]
    replace_section(DOCS, "\n".join(lines), stop=("## ", "### "))


def write_fidelity(r: dict, *, seconds: float, load: tuple[float, float]) -> None:
    slower = r["seconds_bfloat16"] / r["seconds_float32"]
    first = r["first_step_with_a_difference"]
    per_step = " / ".join(f"{100 * v:.1f}%" for v in r["image_match_per_step"])
    lines = [
        FIDELITY_SECTION, "",
        textwrap.fill(provenance(command_line(), load=load, seconds=seconds), 92) + "\n",
        textwrap.fill(f"`{r['preset']}` with random weights, batch {r['batch']}, "
                      f"{r['steps']} generated steps, greedy, float32 then bfloat16 weights "
                      "and KV cache in one run (`--dtype bfloat16`, `model.dtype`: an opt-in "
                      "on the CPU).", 92) + "\n",
        "| | float32 | bfloat16 |", "|---|---|---|",
        f"| seconds for {r['steps']} steps | {r['seconds_float32']:.1f} | "
        f"{r['seconds_bfloat16']:.1f} |",
        f"| image tokens equal to float32 | | {100 * r['image_token_match']:.1f}% "
        f"(per step {per_step}) |",
        f"| action tokens equal to float32 | | {100 * r['action_token_match']:.1f}% |", "",
        textwrap.fill(f"bfloat16 took {slower:.2f}x the float32 time here, and the first "
                      "generated step with a different image token is "
                      f"{'none' if first is None else f'step {first + 1}'}. With random "
                      "weights the logits of many image tokens are nearly tied, so greedy "
                      "choices flip easily; a trained model's peaked distributions match more "
                      "often. float32 stays the CPU default; bfloat16 is for GPUs.", 92),
    ]
    replace_section(DOCS, "\n".join(lines), stop=("## ", "### "))


def gpu_main() -> dict:
    """The 540-token 200M layout in bfloat16 on CUDA at batch 1/8/32: eager (or flash) and
    compiled static decode, end to end (tiny smoke run on a CPU-only machine)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset, batches, steps = (PRESET, (1, 8, 32), 2) if cuda else ("tiny", (1, 2), 1)
    model = random_model(preset, seed=0, device=device, dtype=torch.bfloat16)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu (smoke run)",
              "preset": preset, "dtype": "bfloat16",
              "read_GBps": round(read_bandwidth(device) / 1e9, 1),
              "flash_attn": flash_available(device, torch.bfloat16), "runs": []}
    start = time.perf_counter()
    for batch in batches:
        for compile in (False, True) if cuda else (False,):
            if compile and time.perf_counter() - start > 150:
                continue  # keep the whole script under five minutes
            run = {"batch": batch, "compile": compile}
            try:
                engine = RolloutEngine(model, max_batch=batch, compile=compile)
                run["decode_path"] = engine.decode_path
                list(engine.generate(_rollout(model, batch=batch, steps=1)))  # warm-up
                t0 = time.perf_counter()
                list(engine.generate(_rollout(model, batch=batch, steps=steps)))
                _sync(device)
                seconds = time.perf_counter() - t0
                run.update(seconds=seconds, frames_per_s=batch * steps / seconds,
                           tokens_per_s=batch * steps * model.tokens_per_step / seconds)
                if not compile:
                    run.update(measure_decode(model, batch=batch, tokens=32))
            except Exception as exc:  # a failed compile is a result worth printing
                run["error"] = f"{type(exc).__name__}: {exc}"[:300]
            result["runs"].append({k: round(v, 4) if isinstance(v, float) else v
                                   for k, v in run.items()})
    if cuda:
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset only; no docs")
    parser.add_argument("--fidelity", action="store_true", help="bfloat16 vs float32 tokens")
    parser.add_argument("--gpu", action="store_true", help="the gpu_engine.sh measurement")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--skip-end-to-end", action="store_true",
                        help="no real step end to end (its slowest part on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.gpu:
        print(json.dumps(gpu_main()))
    elif args.fidelity:
        load0 = os.getloadavg()[0]
        result = fidelity()
        print(json.dumps(result))
        write_fidelity(result, seconds=time.perf_counter() - t0,
                       load=(load0, os.getloadavg()[0]))
    elif args.quick:
        print(json.dumps(cpu_run("tiny", (1, 4))))
    else:
        result = cpu_run(PRESET, (1, 4), end_to_end=not args.skip_end_to_end)
        write_docs(result, seconds=time.perf_counter() - t0, command=command_line())
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
