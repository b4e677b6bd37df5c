"""Train a demo world model on the toy game: a small VQ tokenizer, then a small GPT.

    python scripts/train_demo.py --out models/demo --budget-minutes 40
    python scripts/train_demo.py --recipe demo-large --out models/demo-large ...

Two recipes (`RECIPES`): `demo` (32x32 frames -> 4x4 = 16 tokens, 256 codes, a 10-step
window) and `demo-large` (32x32 frames -> 8x8 = 64 tokens of 4x4 pixels, 128 codes, a
4-step window: as many tokens as the demo's), a grid on which the decoding order matters.

Stage 1 trains the VQ tokenizer (taming layout for `demo`, ViT-VQGAN for `demo-large`;
straight-through estimator, codebook + commitment losses, dead codes restarted from encoder
outputs). Stage 2 tokenises clips and
trains a GPT on windows of the recipe's length in the official token layout (the image
tokens then 16 action tokens per step), with the loss on image tokens only: in world-model
mode the actions are given. Seeds are fixed; every stage stops at its step count or at its
share of the time budget, whichever comes first (the log says which; the learning-rate
schedule follows whichever is further along), so a run that stays inside the budget is
reproducible. Not run by CI: the results ship in models/demo/ and models/demo-large/.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
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
from workers.wham.tokenizers import TamingConfig, TokenizerConfig, ViTConfig, ViTVQGAN  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    """The shapes of one demo model."""

    model_id: str
    tokenizer: TokenizerConfig
    seq_len: int  # steps in the GPT's window
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128

    def config(self) -> WHAMConfig:
        tok = self.tokenizer
        gpt = GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                        vocab_size=tok.vocab_size + ACTION_VOCAB_SIZE,
                        block_size=self.seq_len * (tok.tokens_per_image + ACTION_DIM))
        return WHAMConfig(gpt=gpt, tokenizer=tok, seq_len=self.seq_len, gpt_size=None)


# `demo`: the smallest taming shape that reaches 8x8-pixel patches (4x4 latents): no encoder
# ResNet blocks (one per decoder level), attention only in the middle. `demo-large`: a small
# ViT-VQGAN (WHAM 1.6B's tokenizer family) over 4x4-pixel patches, the game's movement
# quantum, so each of its 8x8 tokens covers one STEP x STEP cell; a transformer over 64
# patches costs far less to train than convolutions at full resolution.
RECIPES = {
    "demo": Recipe(
        model_id="toygame-demo", seq_len=10,
        tokenizer=TamingConfig(image_size=(SIZE, SIZE), n_embed=256, embed_dim=16, ch=32,
                               ch_mult=(1, 1, 1, 1), num_res_blocks=0, attn_resolutions=(),
                               z_channels=32)),
    "demo-large": Recipe(
        model_id="toygame-demo-large", seq_len=4, n_embd=96,
        tokenizer=ViTConfig(image_size=(SIZE, SIZE), patch_size=4, transf_dim=64,
                            embedding_dim=16, num_layers=2, head_size=32, vocab_size=128)),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine(it: int, steps: int, elapsed: float, seconds: float, floor: float) -> float:
    """Cosine decay over the run's progress: steps done or time used, whichever is further
    along, so a run cut short by the time budget still ends at a low learning rate."""
    progress = min(1.0, max(it / steps, elapsed / seconds))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, *, lr: float,
                   clip: list[torch.nn.Parameter] | None = None) -> None:
    """One step at learning rate `lr`: gradients of `loss`, their norm clipped to 1 over
    `clip` when given, then the update."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()


def pixel_weights(x: torch.Tensor) -> torch.Tensor:
    """Weight 1 on checkerboard pixels, 5 elsewhere (the small player and effects)."""
    tiles = torch.from_numpy(TILE_COLOURS.astype(np.float32) / 127.5 - 1.0)  # [2, 3]
    on_tile = ((x[:, None] - tiles[None, :, :, None, None]).abs().amax(2) < 1e-3).any(1)
    return 1.0 + 4.0 * (~on_tile).float()[:, None]  # [B, 1, H, W]


def latents(tok, frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> the encoder's continuous latents [B, n, D], token order."""
    if isinstance(tok, ViTVQGAN):
        x = frames.float() / 255.0
        mean, std = tok._stats(x)
        return F.normalize(tok.encoder(tok._patchify((x - mean) / std)), dim=-1)
    z = tok.vq_model.quant_conv(tok.vq_model.encoder(frames.float() / 127.5 - 1.0))
    return z.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]


def codebook(tok) -> torch.nn.Embedding:
    """The codebook [V, D] (restarts and renumbering write into its weight)."""
    return tok.vq_vae._embedding if isinstance(tok, ViTVQGAN) else tok.vq_model.quantize.embedding


def codes(tok) -> torch.Tensor:
    """The codes as the latents are compared with them: [V, D] (unit length for the ViT)."""
    return tok.vq_vae.codes() if isinstance(tok, ViTVQGAN) else codebook(tok).weight


def reconstruct(tok, zq: torch.Tensor) -> torch.Tensor:
    """Quantised latents [B, n, D] -> frames [B, 3, H, W] in [-1, 1]."""
    if isinstance(tok, ViTVQGAN):
        x = tok._unpatchify(tok.decoder(zq))
        mean, std = tok._stats(x)
        return (x * std + mean) * 2.0 - 1.0
    z = zq.transpose(1, 2).reshape(zq.shape[0], zq.shape[2], *tok.grid)
    return tok.vq_model.decoder(tok.vq_model.post_quant_conv(z))


def decoder_parameters(tok) -> list[torch.nn.Parameter]:
    if isinstance(tok, ViTVQGAN):
        return list(tok.decoder.parameters())
    return [*tok.vq_model.post_quant_conv.parameters(), *tok.vq_model.decoder.parameters()]


def quantise(tok, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [B, n, D] -> (nearest codes [B, n, D], indices [B*n]) by squared distance."""
    flat = z.reshape(-1, z.shape[-1])
    book = codes(tok)
    dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.t()
    idx = dist.argmin(1)
    return book[idx].reshape(z.shape), idx


def train_tokenizer(model: WHAMModel, frames: np.ndarray, *, steps: int, seconds: float,
                    batch: int, seed: int) -> None:
    tok = model.tokenizer
    tok.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    data = torch.from_numpy(frames)  # [N, 3, H, W] uint8
    n_embed = model.image_vocab_size
    usage = torch.zeros(n_embed)
    start = time.monotonic()
    for it in range(1, steps + 1):
        lr = 2e-3 * min(1.0, it / 50) * cosine(it, steps, time.monotonic() - start, seconds, 0.1)
        u8 = data[torch.randint(len(data), (batch,), generator=gen)]
        x = u8.float() / 127.5 - 1.0
        z = latents(tok, u8)  # [B, n, D]
        zq, idx = quantise(tok, z)
        recon = reconstruct(tok, z + (zq - z).detach())  # straight-through
        w = pixel_weights(x)
        rec_loss = (w * (recon - x).pow(2)).mean() + 0.5 * (w * (recon - x).abs()).mean()
        vq_loss = F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())
        optimizer_step(opt, rec_loss + vq_loss, lr=lr)
        usage += torch.bincount(idx, minlength=n_embed).float()
        if (it == 1 or it % 25 == 0) and it < 0.8 * steps:
            # Restart codes nobody used since the last check on random encoder outputs.
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                flat = z.detach().reshape(-1, z.shape[-1])
                pick = torch.randint(len(flat), (len(dead),), generator=gen)
                with torch.no_grad():
                    codebook(tok).weight[dead] = flat[pick]
            usage.zero_()
        if it % 50 == 0 or it == steps:
            mse = F.mse_loss(recon, x).item()
            psnr = 10 * math.log10(4.0 / max(mse, 1e-10))
            log(f"vq step {it}/{steps} rec {rec_loss.item():.4f} vq {vq_loss.item():.4f} "
                f"psnr {psnr:.1f} dB lr {lr:.2e} {time.monotonic() - start:.0f}s")
        if time.monotonic() - start > seconds:
            log(f"vq: time budget reached after {it} steps")
            break
    tok.eval()


def finetune_decoder(model: WHAMModel, frames: np.ndarray, *, seconds: float, batch: int,
                     seed: int) -> None:
    """Train only the decoder on frozen tokens: sharper frames, and every token (hence the
    GPT trained on them) keeps its meaning."""
    tok = model.tokenizer
    opt = torch.optim.Adam(decoder_parameters(tok), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 2)
    data = torch.from_numpy(frames)  # [N, 3, H, W] uint8
    tok.train()
    start, it = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        it += 1
        lr = 1e-3 * cosine(it, 10**9, time.monotonic() - start, seconds, 0.05)
        x = data[torch.randint(len(data), (batch,), generator=gen)]
        with torch.no_grad():
            zq = codes(tok)[tok.encode(x[:, None])[:, 0]]  # [B, n, D]
        x = x.float() / 127.5 - 1.0
        recon = reconstruct(tok, zq)
        w = pixel_weights(x)
        loss = (w * (recon - x).pow(2)).mean() + 0.5 * (w * (recon - x).abs()).mean()
        optimizer_step(opt, loss, lr=lr)
        if it % 50 == 0:
            psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon, x).item(), 1e-10))
            log(f"decoder step {it} loss {loss.item():.4f} psnr {psnr:.1f} dB lr {lr:.2e} "
                f"{time.monotonic() - start:.0f}s")
    tok.eval()


def free_code_zero(model: WHAMModel, tokens: torch.Tensor) -> torch.Tensor:
    """Move the least used code to index 0 (the reference never samples code 0 as a frame's
    first token) and return the tokens renumbered to match."""
    n_embed = model.image_vocab_size
    counts = torch.bincount(tokens.flatten(), minlength=n_embed)
    rare = int(counts.argmin())
    perm = torch.arange(n_embed)
    perm[0], perm[rare] = rare, 0  # new index i holds old code perm[i]
    emb = codebook(model.tokenizer).weight
    with torch.no_grad():
        emb.copy_(emb[perm].clone())
    log(f"code 0 <- old code {rare} (used {int(counts[rare])} times); "
        f"{int((counts > 0).sum())}/{n_embed} codes in use")
    return perm.argsort()[tokens]


def encode_all(model: WHAMModel, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, T, 3, H, W) -> image tokens (N, T, n), in chunks."""
    return torch.cat([model.encode_images(images[i:i + 32]) for i in range(0, len(images), 32)])


def train_gpt(model: WHAMModel, seqs: torch.Tensor, *, steps: int, seconds: float, batch: int,
              lr_max: float, seed: int) -> None:
    """seqs: (N, T, tokens_per_step) full token steps; trains on random windows of the
    model's seq_len steps."""
    gpt = model.gpt
    gpt.train()
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(gpt.parameters(), lr=lr_max, betas=(0.9, 0.95), weight_decay=0.01)
    n, t, tps = seqs.shape
    seq_len = model.config.seq_len
    image_mask = (torch.arange(seq_len * tps) % tps < model.tokens_per_image)[1:]
    start = time.monotonic()
    for it in range(1, steps + 1):
        lr = lr_max * min(1.0, it / 100) * cosine(it, steps, time.monotonic() - start, seconds,
                                                  0.05)
        clip = torch.randint(n, (batch,), generator=gen)
        first = torch.randint(t - seq_len + 1, (batch,), generator=gen)
        rows = torch.stack([seqs[c, f:f + seq_len] for c, f in zip(clip, first, strict=True)])
        idx = rows.reshape(batch, -1)  # [B, seq_len * tps]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = gpt(idx[:, :-1])  # [B, S-1, V]
        target = idx[:, 1:][:, image_mask]
        loss = F.cross_entropy(logits[:, image_mask].float().reshape(-1, logits.shape[-1]),
                               target.reshape(-1))
        optimizer_step(opt, loss, lr=lr, clip=list(gpt.parameters()))
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
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="demo",
                        help="model shapes (default demo)")
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

    recipe = RECIPES[args.recipe]
    model = WHAMModel(recipe.config(), model_id=recipe.model_id)
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
    tokens = encode_all(model, images)  # [N, T, n]
    if not args.resume:
        tokens = free_code_zero(model, tokens)
    act = torch.from_numpy(actions_to_tokens(actions, model.image_vocab_size))  # [N, T, 16]
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
