"""Seeds say plainly what is wrong with them and how they were made to fit the model: no
Python reprs in their errors, and one count per seed of what was resized or converted."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.contracts.plan import make_plan
from pipeline.contracts.sources import SeedError, SeedRef
from pipeline.contracts.spec import spec_from_data
from pipeline.driver.discovery import discover_seeds
from workers.actor.actor import RolloutActor
from workers.actor.inputs import load_seed

DEMO = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo"


def test_a_seed_that_is_no_image_says_so_without_a_python_repr(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"hello, not a picture")
    with pytest.raises(SeedError) as caught:
        load_seed(SeedRef("x", str(path)), image_size=(16, 16), context_steps=1)
    text = str(caught.value)
    assert text == (f"seed x ({path}): not a readable image: the data is none of PNG, JPEG, "
                    "GIF, BMP, TIFF, WEBP")
    assert "object at 0x" not in text and "<_io" not in text


def test_a_loaded_seed_says_how_it_was_adapted(tmp_path: Path) -> None:
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (96, 64), (10, 20, 30, 128)).save(rgba)
    seed = load_seed(SeedRef("rgba", str(rgba)), image_size=(32, 32), context_steps=1)
    assert seed.adapted == ("resized 96x64 -> 32x32", "converted RGBA -> RGB")
    fits = tmp_path / "fits.png"
    Image.new("RGB", (32, 32)).save(fits)
    assert load_seed(SeedRef("fits", str(fits)), image_size=(32, 32), context_steps=1
                     ).adapted == ()


def test_units_count_each_seeds_adaptation_once(tmp_path: Path) -> None:
    folder = tmp_path / "seeds"
    folder.mkdir()
    pictures = sorted(DEMO.glob("*.png"))
    shutil.copy(pictures[0], folder / "a.png")  # 150x90 RGB
    with Image.open(pictures[1]) as picture:
        picture.convert("RGBA").save(folder / "b.png")
    Image.new("RGB", (16, 16)).save(folder / "c.png")  # the tiny model's size already
    spec = spec_from_data({
        "run": {"name": "t", "run_id": "adapt", "run_date": "2026-01-02"},
        "model": {"preset": "tiny", "device": "cpu"},
        "seeds": {"source": str(folder)},
        "rollouts": {"steps": 1, "per_seed": 2},
        "resources": {"batch_size": 2, "rollouts_per_unit": 1},  # a seed spans two units
        "output": {"root": str(tmp_path / "out"), "previews": False},
    })
    units = make_plan(discover_seeds(str(folder), format="images"), run_seed=0, per_seed=2,
                      unit_size=1)
    actor = RolloutActor(spec, worker="w0")
    actor.ready()
    total: Counter[str] = Counter()
    for unit in units:
        total.update(actor.run_unit(unit).adaptations)
    actor.close()
    assert total == {"resized 150x90 -> 16x16": 2, "converted RGBA -> RGB": 1}
