"""Training the demo world model for a few steps on a run's outputs, through the loader (the
example of docs/training-data.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import REPO

from pipeline.contracts.plan import plan_for_spec
from pipeline.contracts.spec import spec_from_data
from pipeline.dataset import RolloutWindows
from pipeline.driver.discovery import discover_seeds
from workers.actor.actor import RolloutActor
from workers.wham import load_model
from workers.wham.actions import action_token_ranges

DEMO = REPO / "models" / "demo"


def _run_demo(tmp_path: Path) -> str:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for p in sorted((REPO / "configs" / "seeds" / "toygame").glob("*.png")):
        shutil.copy(p, seeds / p.name)
    spec = spec_from_data({
        "run": {"name": "t", "run_id": "act", "run_date": "2026-01-02"},
        "model": {"checkpoint": str(DEMO), "device": "cpu"}, "seeds": {"source": str(seeds)},
        "rollouts": {"steps": 7, "per_seed": 1}, "resources": {"batch_size": 6},
        "output": {"root": str(tmp_path / "out"), "frames": "parquet"}})
    actor = RolloutActor(spec)
    for unit in plan_for_spec(spec, discover_seeds(str(seeds), format="images")):
        actor.run_unit(unit)
    actor.close()
    return spec.output.root


def test_train_the_demo_model_for_a_few_steps(tmp_path: Path) -> None:
    root = _run_demo(tmp_path)
    windows = RolloutWindows(root, window=4, stride=2)
    loader = torch.utils.data.DataLoader(windows.torch(shuffle=True), batch_size=8)
    batch = next(iter(loader))
    assert batch["frames"].shape == (8, 4, 3, 32, 32) and batch["frames"].dtype == torch.uint8

    model = load_model(DEMO)
    # The frames are what the tokens say: a seed frame (stored losslessly, no watermark)
    # encodes to exactly the tokens its row holds.
    seed_rows = ~batch["generated"]
    assert seed_rows.any()
    encoded = model.encode_images(batch["frames"][seed_rows][:, None])[:, 0]
    torch.testing.assert_close(encoded.cpu(), batch["image_tokens"][seed_rows])

    gpt, n = model.gpt, model.tokens_per_image
    offsets = torch.from_numpy(action_token_ranges(model.image_vocab_size)[:, 0])
    steps = torch.cat([batch["image_tokens"], batch["actions"] + offsets], dim=-1)  # [B,T,tps]
    idx = steps.reshape(len(steps), -1)  # [B, T * tps]
    image_target = (torch.arange(idx.shape[1]) % model.tokens_per_step < n)[1:]
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    gpt.train()
    losses = []
    for _ in range(6):
        logits = gpt(idx[:, :-1])  # [B, L-1, V]
        loss = F.cross_entropy(logits[:, image_target].reshape(-1, logits.shape[-1]),
                               idx[:, 1:][:, image_target].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
