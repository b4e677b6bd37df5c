"""Image tokenizers: official module names, reference math, round trips and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.wham import InputError
from workers.wham.config import PRESETS
from workers.wham.model import random_model
from workers.wham.tokenizers.taming import AttnBlock, TamingConfig, TamingVQGAN
from workers.wham.tokenizers.vit import IMAGENET_MEAN, IMAGENET_STD, ViTConfig, ViTVQGAN


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _images(size, *, batch=2, steps=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, steps, 3, *size), dtype=np.uint8)


# --- official state-dict names -------------------------------------------------------------

def test_taming_names_and_shapes_follow_the_official_layout():
    cfg = PRESETS["tiny"].tokenizer  # ch 32, ch_mult (1, 1, 1), 1 block, attention at 4x4
    sd = TamingVQGAN(cfg).state_dict()
    expected = {
        "vq_model.encoder.conv_in.weight": (32, 3, 3, 3),
        "vq_model.encoder.down.0.block.0.norm1.weight": (32,),
        "vq_model.encoder.down.0.block.0.conv2.weight": (32, 32, 3, 3),
        "vq_model.encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
        "vq_model.encoder.down.2.attn.0.q.weight": (32, 32, 1, 1),
        "vq_model.encoder.down.2.attn.0.proj_out.bias": (32,),
        "vq_model.encoder.mid.block_1.conv1.weight": (32, 32, 3, 3),
        "vq_model.encoder.mid.attn_1.norm.weight": (32,),
        "vq_model.encoder.mid.block_2.norm2.bias": (32,),
        "vq_model.encoder.norm_out.weight": (32,),
        "vq_model.encoder.conv_out.weight": (16, 32, 3, 3),
        "vq_model.quant_conv.weight": (8, 16, 1, 1),
        "vq_model.quantize.embedding.weight": (64, 8),
        "vq_model.post_quant_conv.weight": (16, 8, 1, 1),
        "vq_model.decoder.conv_in.weight": (32, 16, 3, 3),
        "vq_model.decoder.up.2.block.1.conv1.weight": (32, 32, 3, 3),
        "vq_model.decoder.up.2.attn.1.k.weight": (32, 32, 1, 1),
        "vq_model.decoder.up.2.upsample.conv.weight": (32, 32, 3, 3),
        "vq_model.decoder.up.1.upsample.conv.weight": (32, 32, 3, 3),
        "vq_model.decoder.conv_out.weight": (3, 32, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # attention only at resolution 4 (level 2), no upsample at level 0, no temb weights
    assert not any(k.startswith("vq_model.encoder.down.0.attn") for k in sd)
    assert "vq_model.decoder.up.0.upsample.conv.weight" not in sd
    assert "vq_model.encoder.down.2.downsample.conv.weight" not in sd
    assert not any("temb" in k for k in sd)
    # decoder levels have num_res_blocks + 1 blocks
    assert {k.split(".")[5] for k in sd if k.startswith("vq_model.decoder.up.0.block.")} == {
        "0", "1"}


def test_taming_channel_changes_use_nin_shortcut():
    cfg = TamingConfig(image_size=(8, 8), n_embed=16, embed_dim=4, ch=32, ch_mult=(1, 2),
                       num_res_blocks=1, attn_resolutions=(), z_channels=8)
    sd = TamingVQGAN(cfg).state_dict()
    assert tuple(sd["vq_model.encoder.down.1.block.0.nin_shortcut.weight"].shape) == (64, 32, 1, 1)
    assert tuple(sd["vq_model.decoder.up.0.block.0.nin_shortcut.weight"].shape) == (32, 64, 1, 1)
    assert "vq_model.encoder.down.0.block.0.nin_shortcut.weight" not in sd


def test_vit_names_and_shapes_follow_the_official_layout():
    cfg = PRESETS["tiny-vit"].tokenizer  # 10x18, patch 4, 32 wide, 1 layer, 8-d codes
    sd = ViTVQGAN(cfg).state_dict()
    expected = {
        "encoder.proj1.weight": (32, 48), "encoder.proj1.bias": (32,),
        "encoder.pos_embeds.weight": (15, 32),
        "encoder.vit.0.ln_1.weight": (32,), "encoder.vit.0.attn.c_attn.weight": (96, 32),
        "encoder.vit.0.attn.c_proj.weight": (32, 32), "encoder.vit.0.ln_2.weight": (32,),
        "encoder.vit.0.mlp.c_fc.weight": (128, 32), "encoder.vit.0.mlp.c_proj.weight": (32, 128),
        "encoder.output_ln.weight": (32,), "encoder.output_ln.bias": (32,),
        "encoder.output_proj.weight": (8, 32), "encoder.output_proj.bias": (8,),
        "vq_vae._embedding.weight": (64, 8),
        "decoder.proj1.weight": (32, 8), "decoder.pos_embeds.weight": (15, 32),
        "decoder.output_proj.weight": (48, 32), "decoder.output_proj.bias": (48,),
    }
    assert set(sd) == set(expected) | {
        k.replace("encoder.", "decoder.") for k in expected if k.startswith("encoder.vit")
    } | {"decoder.proj1.bias", "decoder.output_ln.weight", "decoder.output_ln.bias"}
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.endswith(".bias") and ".vit." in k for k in sd)  # bias-free blocks


# --- reference math (slow, obvious paths) ---------------------------------------------------

def test_taming_attention_matches_the_reference_formula():
    block = AttnBlock(32)
    _randomise(block, seed=1)
    x = torch.randn(2, 32, 4, 3)
    h = block.norm(x)
    q, k, v = block.q(h), block.k(h), block.v(h)
    b, c, hh, ww = q.shape
    w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5
    w = torch.softmax(w, dim=2)
    out = torch.bmm(v.reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    torch.testing.assert_close(block(x), x + block.proj_out(out))


def test_taming_encode_is_nearest_code_of_the_encoder_output():
    tok = TamingVQGAN(PRESETS["tiny"].tokenizer)
    _randomise(tok)
    images = _images((16, 16))
    x = torch.from_numpy(images).reshape(-1, 3, 16, 16).float() / 127.5 - 1.0
    with torch.no_grad():
        z = tok.vq_model.quant_conv(tok.vq_model.encoder(x))  # [6, 8, 4, 4]
    codes = tok.vq_model.quantize.embedding.weight.detach()
    expected = torch.empty(6, 16, dtype=torch.long)
    for n in range(6):
        for i in range(4):
            for j in range(4):
                expected[n, i * 4 + j] = ((codes - z[n, :, i, j]) ** 2).sum(1).argmin()
    assert torch.equal(tok.encode(images).reshape(6, 16), expected)


def test_taming_codes_round_trip_through_the_quantiser():
    tok = TamingVQGAN(PRESETS["tiny"].tokenizer)
    _randomise(tok)
    tokens = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    z = tok.vq_model.quantize.lookup(tokens, (4, 4))
    assert z.shape == (5, 8, 4, 4)
    assert torch.equal(tok.vq_model.quantize.indices(z), tokens)


def test_taming_latent_grid_is_row_major():
    tok = TamingVQGAN(PRESETS["tiny"].tokenizer)
    _randomise(tok)
    tokens = torch.arange(16).reshape(1, 16) * 3  # distinct codes at every cell
    z = tok.vq_model.quantize.lookup(tokens, (4, 4))
    codes = tok.vq_model.quantize.embedding.weight
    for i in range(4):
        for j in range(4):
            assert torch.equal(z[0, :, i, j], codes[tokens[0, i * 4 + j]])


def test_taming_decode_matches_the_reference_math():
    tok = TamingVQGAN(PRESETS["tiny"].tokenizer)
    _randomise(tok, seed=4)
    tokens = torch.randint(0, 64, (2, 2, 16), generator=torch.Generator().manual_seed(3))
    codes = tok.vq_model.quantize.embedding.weight
    with torch.no_grad():
        z = codes[tokens.reshape(4, 4, 4)].permute(0, 3, 1, 2)  # [4, 8, 4, 4]
        x = tok.vq_model.decoder(tok.vq_model.post_quant_conv(z))
    expected = ((x.clamp(-1, 1) + 1) * 127.5).byte().reshape(2, 2, 3, 16, 16)
    assert torch.equal(tok.decode(tokens), expected)


def _reference_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """Official layout: zero-pad, unfold H then W, patches row-major, channel-major inside."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
    x = x.unfold(2, p, p).unfold(3, p, p)  # [N, 3, rows, cols, p, p]
    return x.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], -1, 3 * p * p)


def test_vit_patch_layout_and_folding_match_the_reference():
    cfg = PRESETS["tiny-vit"].tokenizer
    tok = ViTVQGAN(cfg)
    x = torch.randn(3, 3, *cfg.image_size)
    patches = tok._patchify(x)
    torch.testing.assert_close(patches, _reference_patches(x, 4), rtol=0, atol=0)
    rows, cols = cfg.grid
    folded = F.fold(patches.transpose(1, 2), output_size=(rows * 4, cols * 4),
                    kernel_size=4, stride=4)[:, :, :10, :18]
    torch.testing.assert_close(tok._unpatchify(patches), folded, rtol=0, atol=0)
    torch.testing.assert_close(tok._unpatchify(patches), x, rtol=0, atol=0)


def test_vit_encode_matches_the_reference_math():
    cfg = PRESETS["tiny-vit"].tokenizer
    tok = ViTVQGAN(cfg)
    _randomise(tok, seed=3)
    images = _images(cfg.image_size)
    x = torch.from_numpy(images).reshape(-1, 3, *cfg.image_size).float() / 255
    for c in range(3):
        x[:, c] = (x[:, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    enc = tok.encoder
    with torch.no_grad():
        h = enc.proj1(_reference_patches(x, 4)) + enc.pos_embeds.weight
        for block in enc.vit:
            # non-causal attention with explicit softmax, tanh-GELU MLP
            a_in = F.layer_norm(h, (32,), block.ln_1.weight, None, 1e-5)
            q, k, v = block.attn.c_attn(a_in).split(32, dim=2)
            q, k, v = (t.reshape(6, 15, 2, 16).transpose(1, 2) for t in (q, k, v))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)
            h = h + block.attn.c_proj((att @ v).transpose(1, 2).reshape(6, 15, 32))
            m_in = F.layer_norm(h, (32,), block.ln_2.weight, None, 1e-5)
            g = block.mlp.c_fc(m_in)
            g = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
            h = h + block.mlp.c_proj(g)
        z = F.normalize(enc.output_proj(enc.output_ln(h)), dim=-1)
        codes = F.normalize(tok.vq_vae._embedding.weight, dim=-1)
    expected = (z @ codes.t()).argmax(-1)  # nearest unit code = highest cosine
    assert torch.equal(tok.encode(images).reshape(6, 15), expected)


def test_vit_decode_matches_the_reference_math():
    cfg = PRESETS["tiny-vit"].tokenizer
    tok = ViTVQGAN(cfg)
    _randomise(tok, seed=5)
    tokens = torch.randint(0, 64, (2, 1, 15), generator=torch.Generator().manual_seed(4))
    dec = tok.decoder
    with torch.no_grad():
        codes = F.normalize(tok.vq_vae._embedding.weight, dim=1)
        one_hot = F.one_hot(tokens.reshape(2, 15), 64).float()
        h = dec.proj1(one_hot @ codes) + dec.pos_embeds.weight
        h = dec.output_proj(dec.output_ln(dec.vit(h)))  # [2, 15, 48]
        x = F.fold(h.transpose(1, 2), output_size=(12, 20), kernel_size=4, stride=4)
        x = x[:, :, :10, :18].clone()
    for c in range(3):
        x[:, c] = x[:, c] * IMAGENET_STD[c] + IMAGENET_MEAN[c]
    expected = (x.clamp(0, 1) * 255).byte().reshape(2, 1, 3, 10, 18)
    assert torch.equal(tok.decode(tokens), expected)


# --- round trips ----------------------------------------------------------------------------

def _autoencoding_vit(*, scale: float = 0.3) -> ViTVQGAN:
    """A ViT-VQGAN whose decoder and encoder invert each other on codebook entries.

    Blocks are identities (zero output projections); the encoder reads the code back through
    the transpose of the decoder's orthonormal, zero-mean patch basis, which the LayerNorms
    leave unchanged up to scale.
    """
    cfg = ViTConfig(image_size=(8, 12), patch_size=4, transf_dim=48, embedding_dim=8,
                    num_layers=1, head_size=16, vocab_size=16)
    tok = ViTVQGAN(cfg)
    gen = torch.Generator().manual_seed(0)
    basis = torch.cat([torch.ones(48, 1), torch.randn(48, 8, generator=gen)], dim=1)
    basis = torch.linalg.qr(basis).Q[:, 1:]  # [48, 8], orthonormal, orthogonal to ones
    with torch.no_grad():
        for p in tok.parameters():
            p.zero_()
        for vit in (tok.encoder, tok.decoder):
            vit.output_ln.weight.fill_(1.0)
            for block in vit.vit:
                block.ln_1.weight.fill_(1.0)
                block.ln_2.weight.fill_(1.0)
        tok.encoder.proj1.weight.copy_(torch.eye(48))
        tok.encoder.output_proj.weight.copy_(basis.t())
        tok.decoder.proj1.weight.copy_(basis)
        tok.decoder.output_proj.weight.copy_(scale * torch.eye(48))
        tok.vq_vae._embedding.weight.copy_(torch.cat([torch.eye(8), -torch.eye(8)]))
    return tok


def test_vit_tokens_decode_and_encode_back_to_the_same_tokens():
    tok = _autoencoding_vit()
    tokens = torch.randint(0, 16, (3, 4, 6), generator=torch.Generator().manual_seed(1))
    images = tok.decode(tokens)
    assert images.shape == (3, 4, 3, 8, 12) and images.dtype == torch.uint8
    assert torch.equal(tok.encode(images), tokens)
    assert torch.equal(tok.encode(images.numpy()), tokens)


def test_vit_tokens_are_row_major_over_the_patch_grid():
    tok = _autoencoding_vit()
    tokens = torch.zeros(1, 1, 6, dtype=torch.long)
    images = tok.decode(tokens)
    changed = tok.decode(torch.full((1, 1, 6), 3))
    # paste the pixels of patch (row 1, col 0) from the other image
    images[..., 4:8, 0:4] = changed[..., 4:8, 0:4]
    assert tok.encode(images).flatten().tolist() == [0, 0, 0, 3, 0, 0]


@pytest.mark.parametrize(("preset", "grid"), [("tiny", (4, 4)), ("tiny-vit", (3, 5)),
                                              ("wham-1.6b", (18, 30)), ("wham-200m", (8, 8))])
def test_tokenizer_and_model_know_their_token_grid(preset, grid):
    config = PRESETS[preset]
    tok = (TamingVQGAN if config.tokenizer.kind == "taming" else ViTVQGAN)(config.tokenizer)
    assert config.tokenizer.grid == tok.grid == grid
    assert tok.tokens_per_image == grid[0] * grid[1]
    if preset.startswith("tiny"):
        assert random_model(preset).token_grid == grid


@pytest.mark.parametrize("preset", ["tiny", "tiny-vit"])
def test_decode_shapes_and_determinism(preset):
    cfg = PRESETS[preset].tokenizer
    tok = TamingVQGAN(cfg) if cfg.kind == "taming" else ViTVQGAN(cfg)
    _randomise(tok)
    tokens = torch.randint(0, cfg.vocab_size, (2, 3, cfg.tokens_per_image))
    a, b = tok.decode(tokens), tok.decode(tokens.numpy())
    assert a.shape == (2, 3, 3, *cfg.image_size) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    encoded = tok.encode(a)
    assert encoded.shape == (2, 3, cfg.tokens_per_image) and encoded.dtype == torch.long
    assert int(encoded.min()) >= 0 and int(encoded.max()) < cfg.vocab_size


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "tiny-vit"])
def test_wrong_images_are_rejected_naming_expected_and_got(preset):
    cfg = PRESETS[preset].tokenizer
    tok = TamingVQGAN(cfg) if cfg.kind == "taming" else ViTVQGAN(cfg)
    h, w = cfg.image_size
    with pytest.raises(InputError, match=rf"expected shape \(B, T, 3, {h}, {w}\).*got \(1, 1, 3, "
                                         rf"{h}, {w + 1}\)"):
        tok.encode(np.zeros((1, 1, 3, h, w + 1), dtype=np.uint8))
    with pytest.raises(InputError, match=r"got \(1, 3, "):
        tok.encode(np.zeros((1, 3, h, w), dtype=np.uint8))
    with pytest.raises(InputError, match="uint8, got torch.float32"):
        tok.encode(torch.zeros(1, 1, 3, h, w))
    with pytest.raises(InputError, match=rf"image tokens: expected shape \(B, T, "
                                         rf"{cfg.tokens_per_image}\)"):
        tok.decode(torch.zeros(1, 1, cfg.tokens_per_image + 1, dtype=torch.long))
    with pytest.raises(InputError, match=rf"values must lie in \[0, {cfg.vocab_size}\)"):
        tok.decode(torch.full((1, 1, cfg.tokens_per_image), cfg.vocab_size))


def test_taming_config_rejects_sizes_it_cannot_tokenise():
    with pytest.raises(InputError, match="multiple of 4"):
        TamingConfig(image_size=(18, 16), ch=32, ch_mult=(1, 1, 1))
    with pytest.raises(InputError, match="not a multiple of 32"):
        TamingConfig(image_size=(16, 16), ch=48, ch_mult=(1, 1, 1))
