"""The transformer: official parameter names, and cached paths == the full forward (fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.wham.config import GPT_SIZES, GPTConfig, gpt_config_for
from workers.wham.errors import CheckpointError
from workers.wham.gpt import GPT, KVCache

TPS = 6  # tokens per step of the toy layout used here
VOCAB = 40


def _gpt(*, version: int = 1, bias: bool = True, seed: int = 0) -> GPT:
    cfg = gpt_config_for("tiny", vocab_size=VOCAB, tokens_per_step=TPS, version=version, bias=bias)
    model = GPT(cfg).eval()
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


def _official_names(n_layer: int, *, version: int, bias: bool) -> set[str]:
    names = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    names |= {"transformer.ln_f.weight"} | ({"transformer.ln_f.bias"} if bias else set())
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        linears = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
        norms = ["ln_1", "ln_2"] if version == 1 else []
        for mod in linears:
            names |= {p + mod + ".weight"} | ({p + mod + ".bias"} if bias else set())
        for mod in norms:
            names |= {p + mod + ".weight"} | ({p + mod + ".bias"} if bias else set())
    return names


@pytest.mark.parametrize(("version", "bias"), [(1, True), (2, True), (1, False), (2, False)])
def test_state_dict_names_match_the_official_layout(version: int, bias: bool) -> None:
    model = _gpt(version=version, bias=bias)
    assert set(model.state_dict()) == _official_names(2, version=version, bias=bias)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    counted = sum(p.numel() for p in model.parameters())
    assert counted == model.config.num_params()


def test_real_sizes_and_shapes() -> None:
    assert GPT_SIZES["chinchilla-251M"] == (16, 16, 1024)
    assert GPT_SIZES["wham-4kvocab-1.6b"] == (24, 18, 2304)
    cfg = gpt_config_for("wham-4kvocab-1.6b", vocab_size=16384 + 68, tokens_per_step=556)
    assert cfg.block_size == 5560 and cfg.head_dim == 128
    assert GPTConfig(**dataclasses.asdict(cfg)) == cfg


def test_bad_configs_name_the_problem() -> None:
    with pytest.raises(CheckpointError, match="unknown transformer size 'huge'"):
        gpt_config_for("huge", vocab_size=10, tokens_per_step=2)
    with pytest.raises(CheckpointError, match="divisible by n_head"):
        GPTConfig(n_layer=1, n_head=3, n_embd=32, vocab_size=10, block_size=8)
    with pytest.raises(CheckpointError, match="version"):
        GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=10, block_size=8, version=3)


def test_mlp_uses_tanh_gelu_and_layernorm_eps_is_1e5() -> None:
    mlp = _gpt().transformer.h[0].mlp
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    h = mlp.c_fc(x)
    tanh_gelu = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
    torch.testing.assert_close(mlp(x), mlp.c_proj(tanh_gelu))
    norms = [m for m in _gpt(version=2).modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)


@pytest.mark.parametrize("version", [1, 2])
def test_chunked_and_decoded_logits_equal_the_full_forward(version: int) -> None:
    model = _gpt(version=version)
    idx = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.config, batch=4, max_seq=model.config.block_size, device="cpu",
                    dtype=torch.float32)
    k, v = cache.rows(3)
    with torch.no_grad():
        full = model(idx)  # [B, S, V]
        got = [model.forward_cached(idx[:, :20], k_cache=k, v_cache=v, start=0, all_logits=True)]
        got.append(model.forward_cached(idx[:, 20:30], k_cache=k, v_cache=v, start=20,
                                        all_logits=True))
        for p in range(30, 40):
            if p % 2:
                logits = model.decode_step(idx[:, p:p + 1], k_cache=k, v_cache=v,
                                           pos=torch.tensor([p]))
            else:
                logits = model.forward_cached(idx[:, p:p + 1], k_cache=k, v_cache=v, start=p)
            got.append(logits[:, None])
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-5, atol=1e-5)


def test_window_slide_reprefill_ignores_stale_cache() -> None:
    """Context of 10 steps: the reference drops the oldest and lays steps 1..9 out from
    position 0 again. Re-prefilling over a cache filled by the previous window must give
    exactly the full forward of the new window (no stale keys leak in)."""
    model = _gpt()
    steps = torch.randint(0, VOCAB, (2, 10, TPS), generator=torch.Generator().manual_seed(2))
    old_window = steps[:, :9].reshape(2, -1)
    new_window = steps[:, 1:].reshape(2, -1)
    cache = KVCache(model.config, batch=2, max_seq=model.config.block_size, device="cpu",
                    dtype=torch.float32)
    k, v = cache.rows(2)
    extra = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.forward_cached(old_window, k_cache=k, v_cache=v, start=0)
        for i in range(TPS - 1):  # the old window's next step partly decoded
            model.forward_cached(extra[:, i:i + 1], k_cache=k, v_cache=v, start=54 + i)
        last = model.forward_cached(new_window, k_cache=k, v_cache=v, start=0)
        decoded = [last]
        for i in range(5):  # alternate the eager and the static (masked, whole-cache) decode
            tok = extra[:, i:i + 1]
            decoded.append(
                model.decode_step(tok, k_cache=k, v_cache=v, pos=torch.tensor([54 + i]))
                if i % 2 else model.forward_cached(tok, k_cache=k, v_cache=v, start=54 + i)
            )
        full = model(torch.cat([new_window, extra], dim=1))
    torch.testing.assert_close(torch.stack(decoded, dim=1), full[:, 53:], rtol=1e-5, atol=1e-5)


def test_bfloat16_tracks_float32() -> None:
    model = _gpt()
    idx = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(idx)
        half = model.to(torch.bfloat16)(idx).float()
    assert (half - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_kv_cache_bytes_match_allocation() -> None:
    cfg = gpt_config_for("tiny", vocab_size=VOCAB, tokens_per_step=TPS)
    cache = KVCache(cfg, batch=3, max_seq=cfg.block_size, device="cpu", dtype=torch.bfloat16)
    expected = (cache.k.numel() + cache.v.numel()) * 2
    assert KVCache.bytes_for(cfg, batch=3, max_seq=cfg.block_size, dtype=torch.bfloat16) == expected
    assert cache.k.shape == (2, 3, 2, 60, 16)
