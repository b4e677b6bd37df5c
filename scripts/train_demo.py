"""Train the demo world model on the toy game: a small VQ tokenizer, then a small GPT.

    python scripts/train_demo.py --out models/demo --budget-minutes 40

Stage 1 trains a taming-layout VQ tokenizer (32x32 frames -> 4x4 = 16 tokens, 256 codes;
straight-through estimator, codebook + commitment losses, dead codes restarted from encoder
outputs). Stage 2 tokenises clips and trains a GPT on 10-step windows in the official token
layout (16 image tokens then 16 action tokens per step), with the loss on image tokens only:
in world-model mode the actions are given. Seeds are fixed; every stage stops at its step
count or at its share of the time budget, whichever comes first (the log says which; the
learning-rate schedule follows whichever is further along), so a run that stays inside the
budget is reproducible. Not run by CI: the result ships in
models/demo/.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.toygame import SIZE, make_dataset  # noqa: E402
from workers.toygame.game import TILE_COLOURS  # noqa: E402
from workers.wham.actions import ACTION_DIM, ACTION_VOCAB_SIZE, actions_to_tokens  # noqa: E402
from workers.wham.checkpoints import load_model, save_native  # noqa: E402
from workers.wham.config import GPTConfig, WHAMConfig  # noqa: E402
from workers.wham.model import WHAMModel  # noqa: E402
from workers.wham.tokenizers import TamingConfig  # noqa: E402

SEQ_LEN = 10
# The smallest taming shape that reaches 8x8 patches: every level 32 channels, no encoder
# ResNet blocks (one per decoder level), attention only in the middle (4x4 latents).
TOKENIZER = TamingConfig(image_size=(SIZE, SIZE), n_embed=256, embed_dim=16, ch=32,
                         ch_mult=(1, 1, 1, 1), num_res_blocks=0, attn_resolutions=(),
                         z_channels=32)
GPT_SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128}
MODEL_ID = "toygame-demo"


def demo_config() -> WHAMConfig:
    tps = TOKENIZER.tokens_per_image + ACTION_DIM
    gpt = GPTConfig(vocab_size=TOKENIZER.n_embed + ACTION_VOCAB_SIZE, block_size=SEQ_LEN * tps,
                    **GPT_SHAPE)
    return WHAMConfig(gpt=gpt, tokenizer=TOKENIZER, seq_len=SEQ_LEN, gpt_size=None)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine(it: int, steps: int, elapsed: float, seconds: float, floor: float) -> float:
    """Cosine decay over the run's progress: steps done or time used, whichever is further
    along, so a run cut short by the time budget still ends at a low learning rate."""
    progress = min(1.0, max(it / steps, elapsed / seconds))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def pixel_weights(x: torch.Tensor) -> torch.Tensor:
    """Weight 1 on checkerboard pixels, 5 elsewhere (the small player and effects)."""
    tiles = torch.from_numpy(TILE_COLOURS.astype(np.float32) / 127.5 - 1.0)  # [2, 3]
    on_tile = ((x[:, None] - tiles[None, :, :, None, None]).abs().amax(2) < 1e-3).any(1)
    return 1.0 + 4.0 * (~on_tile).float()[:, None]  # [B, 1, H, W]


def quantise(vq, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [B, D, h, w] -> (nearest codes [B, D, h, w], indices [B*h*w])."""
    d = z.shape[1]
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    codes = vq.quantize.embedding.weight
    dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
    idx = dist.argmin(1)
    zq = codes[idx].reshape(z.shape[0], z.shape[2], z.shape[3], d).permute(0, 3, 1, 2)
    return zq, idx


def train_tokenizer(model: WHAMModel, frames: np.ndarray, *, steps: int, seconds: float,
                    batch: int, seed: int) -> None:
    vq = model.tokenizer.vq_model
    vq.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    data = torch.from_numpy(frames)  # [N, 3, H, W] uint8
    usage = torch.zeros(TOKENIZER.n_embed)
    start = time.monotonic()
    for it in range(1, steps + 1):
        lr = 2e-3 * min(1.0, it / 50) * cosine(it, steps, time.monotonic() - start, seconds, 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        x = data[torch.randint(len(data), (batch,), generator=gen)].float() / 127.5 - 1.0
        z = vq.quant_conv(vq.encoder(x))  # [B, D, 4, 4]
        zq, idx = quantise(vq, z)
        recon = vq.decoder(vq.post_quant_conv(z + (zq - z).detach()))  # straight-through
        w = pixel_weights(x)
        rec_loss = (w * (recon - x).pow(2)).mean() + 0.5 * (w * (recon - x).abs()).mean()
        vq_loss = F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())
        opt.zero_grad(set_to_none=True)
        (rec_loss + vq_loss).backward()
        opt.step()
        usage += torch.bincount(idx, minlength=TOKENIZER.n_embed).float()
        if (it == 1 or it % 25 == 0) and it < 0.8 * steps:
            # Restart codes nobody used since the last check on random encoder outputs.
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                pick = torch.randint(len(flat), (len(dead),), generator=gen)
                with torch.no_grad():
                    vq.quantize.embedding.weight[dead] = flat[pick]
            usage.zero_()
        if it % 50 == 0 or it == steps:
            mse = F.mse_loss(recon, x).item()
            psnr = 10 * math.log10(4.0 / max(mse, 1e-10))
            log(f"vq step {it}/{steps} rec {rec_loss.item():.4f} vq {vq_loss.item():.4f} "
                f"psnr {psnr:.1f} dB lr {lr:.2e} {time.monotonic() - start:.0f}s")
        if time.monotonic() - start > seconds:
            log(f"vq: time budget reached after {it} steps")
            break
    vq.eval()


def finetune_decoder(model: WHAMModel, frames: np.ndarray, *, seconds: float, batch: int,
                     seed: int) -> None:
    """Train only post_quant_conv + decoder on frozen tokens: sharper frames, and every
    token (hence the GPT trained on them) keeps its meaning."""
    vq = model.tokenizer.vq_model
    params = [*vq.post_quant_conv.parameters(), *vq.decoder.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 2)
    data = torch.from_numpy(frames)  # [N, 3, H, W] uint8
    vq.decoder.train()
    start, it = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        it += 1
        lr = 1e-3 * cosine(it, 10**9, time.monotonic() - start, seconds, 0.05)
        for group in opt.param_groups:
            group["lr"] = lr
        x = data[torch.randint(len(data), (batch,), generator=gen)]
        with torch.no_grad():
            idx = model.tokenizer.encode(x[:, None])[:, 0]  # [B, n]
            zq = vq.quantize.lookup(idx, TOKENIZER.grid)
        x = x.float() / 127.5 - 1.0
        recon = vq.decoder(vq.post_quant_conv(zq))
        w = pixel_weights(x)
        loss = (w * (recon - x).pow(2)).mean() + 0.5 * (w * (recon - x).abs()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 50 == 0:
            psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon, x).item(), 1e-10))
            log(f"decoder step {it} loss {loss.item():.4f} psnr {psnr:.1f} dB lr {lr:.2e} "
                f"{time.monotonic() - start:.0f}s")
    vq.eval()


def free_code_zero(model: WHAMModel, tokens: torch.Tensor) -> torch.Tensor:
    """Move the least used code to index 0 (the reference never samples code 0 as a frame's
    first token) and return the tokens renumbered to match."""
    counts = torch.bincount(tokens.flatten(), minlength=TOKENIZER.n_embed)
    rare = int(counts.argmin())
    perm = torch.arange(TOKENIZER.n_embed)
    perm[0], perm[rare] = rare, 0  # new index i holds old code perm[i]
    emb = model.tokenizer.vq_model.quantize.embedding.weight
    with torch.no_grad():
        emb.copy_(emb[perm].clone())
    log(f"code 0 <- old code {rare} (used {int(counts[rare])} times); "
        f"{int((counts > 0).sum())}/{TOKENIZER.n_embed} codes in use")
    return perm.argsort()[tokens]


def encode_all(model: WHAMModel, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, T, 3, H, W) -> image tokens (N, T, n), in chunks."""
    return torch.cat([model.encode_images(images[i:i + 32]) for i in range(0, len(images), 32)])


def train_gpt(model: WHAMModel, seqs: torch.Tensor, *, steps: int, seconds: float, batch: int,
              lr_max: float, seed: int) -> None:
    """seqs: (N, T, tokens_per_step) full token steps; trains on random 10-step windows."""
    gpt = model.gpt
    gpt.train()
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(gpt.parameters(), lr=lr_max, betas=(0.9, 0.95), weight_decay=0.01)
    n, t, tps = seqs.shape
    image_mask = (torch.arange(SEQ_LEN * tps) % tps < TOKENIZER.tokens_per_image)[1:]
    start = time.monotonic()
    for it in range(1, steps + 1):
        lr = lr_max * min(1.0, it / 100) * cosine(it, steps, time.monotonic() - start, seconds,
                                                  0.05)
        for group in opt.param_groups:
            group["lr"] = lr
        clip = torch.randint(n, (batch,), generator=gen)
        first = torch.randint(t - SEQ_LEN + 1, (batch,), generator=gen)
        rows = torch.stack([seqs[c, f:f + SEQ_LEN] for c, f in zip(clip, first, strict=True)])
        idx = rows.reshape(batch, -1)  # [B, 10 * tps]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = gpt(idx[:, :-1])  # [B, S-1, V]
        target = idx[:, 1:][:, image_mask]
        loss = F.cross_entropy(logits[:, image_mask].float().reshape(-1, logits.shape[-1]),
                               target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        if it % 25 == 0 or it == steps:
            acc = (logits[:, image_mask].argmax(-1) == target).float().mean().item()
            log(f"gpt step {it}/{steps} loss {loss.item():.4f} acc {acc:.3f} lr {lr:.2e} "
                f"{time.monotonic() - start:.0f}s")
        if time.monotonic() - start > seconds:
            log(f"gpt: time budget reached after {it} steps")
            break
    gpt.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="models/demo", help="native model folder to write")
    parser.add_argument("--budget-minutes", type=float, default=40.0,
                        help="hard wall-clock budget for both stages together")
    parser.add_argument("--clips", type=int, default=600, help="training clips (seeds 0..N-1)")
    parser.add_argument("--first-clip", type=int, default=0,
                        help="game seed of the first training clip (seeds stay far below the "
                        "held-out ones)")
    parser.add_argument("--clip-steps", type=int, default=32, help="steps per training clip")
    parser.add_argument("--vq-steps", type=int, default=1500)
    parser.add_argument("--vq-batch", type=int, default=16)
    parser.add_argument("--gpt-steps", type=int, default=9000)
    parser.add_argument("--gpt-batch", type=int, default=8)
    parser.add_argument("--gpt-lr", type=float, default=2e-3)
    parser.add_argument("--stage1", default=None,
                        help="folder for the stage-1 model: reused if present, else written")
    parser.add_argument("--decoder-from", default=None,
                        help="only fine-tune the decoder of this trained model folder "
                        "(tokens unchanged, so the GPT stays valid) and write --out")
    parser.add_argument("--resume", default=None,
                        help="continue training the GPT of this model folder (its tokenizer "
                        "is kept) on the clips given here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    budget = args.budget_minutes * 60.0
    t0 = time.monotonic()
    images, actions = make_dataset(range(args.first_clip, args.first_clip + args.clips),
                                   args.clip_steps)
    log(f"data: {images.shape[0]} clips x {images.shape[1]} steps in {time.monotonic() - t0:.0f}s")

    if args.decoder_from:
        model = load_model(args.decoder_from)
        finetune_decoder(model, images.reshape(-1, 3, SIZE, SIZE), seconds=budget - 30.0,
                         batch=args.vq_batch, seed=args.seed)
        log(f"saved {save_native(model, args.out)} after {(time.monotonic() - t0) / 60:.1f} min")
        return 0

    model = WHAMModel(demo_config(), model_id=MODEL_ID)
    model.gpt.reset_parameters(torch.Generator().manual_seed(args.seed))
    stage1 = Path(args.stage1) if args.stage1 else None
    if args.resume:
        model = load_model(args.resume)
        log(f"resuming from {args.resume}")
    elif stage1 is not None and (stage1 / "config.json").is_file():
        model.tokenizer.load_state_dict(load_model(stage1).tokenizer.state_dict())
        log(f"tokenizer loaded from {stage1}")
    else:
        train_tokenizer(model, images.reshape(-1, 3, SIZE, SIZE), steps=args.vq_steps,
                        seconds=0.3 * budget, batch=args.vq_batch, seed=args.seed)
        if stage1 is not None:
            save_native(model, stage1)
    model.eval()
    tokens = encode_all(model, images)  # [N, T, 16]
    if not args.resume:
        tokens = free_code_zero(model, tokens)
    act = torch.from_numpy(actions_to_tokens(actions, TOKENIZER.n_embed))  # [N, T, 16]
    seqs = torch.cat([tokens, act], dim=-1)
    left = budget - (time.monotonic() - t0) - 60.0  # keep a minute for saving
    train_gpt(model, seqs, steps=args.gpt_steps, seconds=left, batch=args.gpt_batch,
              lr_max=args.gpt_lr, seed=args.seed)
    model.eval()
    out = save_native(model, args.out)
    log(f"saved {out} after {(time.monotonic() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
