"""`wham-batch dream | convert | bench-engine` end to end, in-process, on tiny models."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from support.rollouts import one_thread  # noqa: F401 (autouse)

from pipeline.cli import main
from workers.wham import RolloutEngine, load_model, random_model, save_native


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return save_native(random_model("tiny", seed=2), tmp_path_factory.mktemp("model") / "tiny")


def _clip(path, *, steps: int = 6, size=(16, 16), width: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (steps, 3, *size), dtype=np.uint8)
    actions = np.concatenate(
        [rng.integers(0, 2, (steps, 12)), rng.integers(0, 11, (steps, 4))], axis=1
    )[:, :width]
    np.savez(path, images=images, actions=actions)
    return path


def _dream(native, tmp_path, *extra, name="out.npz"):
    out = tmp_path / name
    code = main(["dream", "--checkpoint", str(native), "--context", str(tmp_path / "clip.npz"),
                 "--out", str(out), *extra])
    return code, out


def test_dream_writes_rollouts_gif_and_one_json_line(native, tmp_path, capsys) -> None:
    _clip(tmp_path / "clip.npz")
    threads = torch.get_num_threads()
    try:  # two threads here, one below: the output must not depend on the count
        code, out = _dream(native, tmp_path, "--steps", "3", "--batch", "2", "--seed", "5",
                           "--threads", "2", "--gif", str(tmp_path / "out.gif"), "--json")
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["tokens"] == 2 * 3 * 32 and summary["generate_seconds"] > 0
    assert summary["tokens_per_s"] > 0 and summary["frames_per_s"] > 0
    with np.load(out) as data:
        assert data["image_tokens"].shape == (2, 3, 16)
        assert data["actions"].shape == (2, 3, 16)
        assert data["images"].shape == (2, 3, 3, 16, 16) and data["images"].dtype == np.uint8
        first = {k: data[k] for k in data.files}
    assert not np.array_equal(first["image_tokens"][0], first["image_tokens"][1])
    gif = iio.imread(tmp_path / "out.gif", index=None)
    assert gif.shape[0] == 6 + 3  # the whole clip is context (<= 10 steps), then 3 generated
    assert gif.shape[1:3] == (128, 128)  # 16x16 frames upscaled like the pipeline's previews

    # same seed, same output (whatever the thread count); a rollout matches the engine run
    # on its own with seed 5 + b
    threads = torch.get_num_threads()
    try:
        code, again = _dream(native, tmp_path, "--steps", "3", "--batch", "2", "--seed", "5",
                             "--threads", "1", name="again.npz")
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with np.load(again) as data:
        assert all(np.array_equal(first[k], data[k]) for k in first)
    code, single = _dream(native, tmp_path, "--steps", "3", "--seed", "6", name="one.npz")
    with np.load(single) as data:
        assert np.array_equal(data["image_tokens"][0], first["image_tokens"][1])


def test_policy_mode_acts_on_the_frames_after_the_context(native, tmp_path) -> None:
    clip = _clip(tmp_path / "clip.npz", steps=6)
    code, out = _dream(native, tmp_path, "--steps", "2", "--mode", "policy", "--greedy")
    assert code == 0
    with np.load(clip) as c, np.load(out) as data:
        # default context: 6 - 2 = 4 steps; the observations are frames 4 and 5
        assert np.array_equal(data["images"][0], c["images"][4:6])


def test_world_model_takes_actions_from_a_file(native, tmp_path) -> None:
    _clip(tmp_path / "clip.npz", steps=3)
    given = np.tile(np.array([1, 0] * 6 + [5, 5, 0, 10]), (2, 1))
    np.savez(tmp_path / "acts.npz", actions=given)
    code, out = _dream(native, tmp_path, "--steps", "2", "--mode", "world_model",
                       "--actions", str(tmp_path / "acts.npz"))
    assert code == 0
    with np.load(out) as data:
        assert np.array_equal(data["actions"][0], given)
    # without --actions: the clip's own actions after the context (3 steps = 1 + 2)
    code, out = _dream(native, tmp_path, "--steps", "2", "--mode", "world_model", name="w.npz")
    with np.load(out) as data, np.load(tmp_path / "clip.npz") as clip:
        assert code == 0 and np.array_equal(data["actions"][0], clip["actions"][1:])


@pytest.mark.parametrize("decoding", ["diagonal", "diagonal-checked"])
def test_dream_decodes_diagonally_on_request(native, tmp_path, capsys, decoding) -> None:
    clip = _clip(tmp_path / "clip.npz", steps=3)
    code, out = _dream(native, tmp_path, "--steps", "2", "--mode", "world_model",
                       "--decoding", decoding, "--json")
    assert code == 0 and json.loads(capsys.readouterr().out)["decoding"] == decoding
    with np.load(clip) as c:
        images, actions = c["images"][None], c["actions"][None]
    want = RolloutEngine(load_model(native), max_batch=1).rollout(
        context_images=images[:, :1], context_actions=actions[:, :1], steps=2,
        mode="world_model", actions=actions[:, 1:], seeds=[0], decoding=decoding)
    with np.load(out) as data:
        assert np.array_equal(data["image_tokens"][0],
                              np.stack([o.image_tokens[0].numpy() for o in want]))


@pytest.mark.parametrize(
    ("clip_kw", "args", "message"),
    [
        ({"size": (8, 8)}, [], "images must be uint8 (T, 3, 16, 16)"),
        ({"width": 15}, [], "expected shape (..., 16)"),
        ({}, ["--mode", "world_model", "--steps", "9"], "world_model mode needs 9 actions"),
        ({}, ["--mode", "policy", "--steps", "6"], "policy mode needs 6 frames after"),
        ({}, ["--context-steps", "11"], "--context-steps: need 1..6"),
        ({}, ["--steps", "0"], "--steps must be at least 1"),
        ({}, ["--temperature", "-1"], "temperature must be a finite number"),
        ({}, ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--top-k", "0"],
         "CUDA is not available" if not torch.cuda.is_available() else "top_k must be"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(native, tmp_path, capsys, clip_kw, args,
                                                message) -> None:
    _clip(tmp_path / "clip.npz", **clip_kw)
    steps = [] if "--steps" in args else ["--steps", "1"]
    code, _ = _dream(native, tmp_path, *steps, *args)
    assert code == 2
    assert message in capsys.readouterr().err


def test_out_of_range_bins_and_missing_files_are_named(native, tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    actions = np.zeros((2, 16), np.int64)
    actions[1, 13] = 11  # left stick y, bin 11 does not exist
    np.savez(tmp_path / "clip.npz", images=rng.integers(0, 256, (2, 3, 16, 16), np.uint8),
             actions=actions)
    assert _dream(native, tmp_path, "--steps", "1")[0] == 2
    err = capsys.readouterr().err
    assert "left_stick_y" in err and "is 11" in err and "clip.npz" in err
    code = main(["dream", "--checkpoint", str(native), "--context", str(tmp_path / "no.npz"),
                 "--steps", "1", "--out", str(tmp_path / "o.npz")])
    assert code == 2 and "no.npz: no such file" in capsys.readouterr().err
    code = main(["dream", "--checkpoint", str(tmp_path / "nomodel"), "--context",
                 str(tmp_path / "clip.npz"), "--steps", "1", "--out", str(tmp_path / "o.npz")])
    assert code == 2 and "nomodel" in capsys.readouterr().err


def _official_ckpt(path, model) -> None:
    """A Lightning-style checkpoint: official key prefixes, hyperparameters as plain dicts."""
    tok = model.config.tokenizer
    state = {f"predictor.gpt_model.{k}": v for k, v in model.gpt.state_dict().items()}
    for key, value in model.tokenizer.state_dict().items():
        state[f"context_encoders.images.{key}"] = value
    taming = {
        "taming_n_embed": tok.n_embed, "taming_embed_dim": tok.embed_dim,
        "taming_num_indices_per_axis": tok.grid[0],
        "taming_ddconfig": {
            "double_z": tok.double_z, "z_channels": tok.z_channels, "resolution": tok.resolution,
            "in_channels": 3, "out_ch": 3, "ch": tok.ch, "ch_mult": list(tok.ch_mult),
            "num_res_blocks": tok.num_res_blocks, "attn_resolutions": list(tok.attn_resolutions),
            "dropout": 0.0,
        },
    }
    hparams = {"predictor_args": {"model_spec": {"model_size": "tiny", "seq_len": 10}},
               "context_encoder_args": {"images": {"model_spec": taming}}}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)


def test_convert_then_dream_matches_the_source_weights(native, tmp_path, capsys) -> None:
    model = load_model(native)
    _official_ckpt(tmp_path / "WHAM_tiny.ckpt", model)
    assert main(["convert", str(tmp_path / "WHAM_tiny.ckpt"), str(tmp_path / "conv")]) == 0
    assert load_model(tmp_path / "conv").sha256 == model.sha256
    _clip(tmp_path / "clip.npz")
    _, a = _dream(native, tmp_path, "--steps", "1", name="a.npz")
    _, b = _dream(tmp_path / "conv", tmp_path, "--steps", "1", name="b.npz")
    with np.load(a) as x, np.load(b) as y:
        assert np.array_equal(x["image_tokens"], y["image_tokens"])
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "missing.ckpt"), str(tmp_path / "c2")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


def test_bench_engine_prints_one_json_line(capsys) -> None:
    for extra in ([], ["--naive"]):
        assert main(["bench-engine", "--preset", "tiny", "--batch", "2", "--steps", "1",
                     "--context-steps", "2", "--device", "cpu", "--json", *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["tokens"] == 2 * 32 and result["tokens_per_s"] > 0
        assert result["engine"] == ("naive" if extra else "cached")
        assert result["peak_memory_mb"] > 0
