"""Write the demo seed frames: small procedural game-like scenes, the same bytes every run.

    python scripts/make_demo_seeds.py [--out configs/seeds/demo] [--count 6]

Each scene: a sky gradient, hills, a ground strip with platforms, a few pickups and a
player figure, at the WHAM aspect ratio (300x180 scaled down to 150x90).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 150, 90
PALETTES = (  # sky top, sky bottom, hills, ground
    ((40, 70, 160), (150, 200, 240), (60, 130, 70), (110, 80, 50)),
    ((20, 20, 60), (90, 60, 120), (50, 50, 90), (70, 70, 80)),
    ((230, 140, 60), (250, 220, 150), (150, 100, 60), (190, 150, 90)),
    ((90, 160, 200), (220, 240, 250), (230, 235, 240), (170, 190, 210)),
)


def scene(index: int) -> Image.Image:
    rng = np.random.default_rng(1000 + index)
    sky_top, sky_bottom, hill, ground = PALETTES[index % len(PALETTES)]
    t = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]  # (H,1,1)
    sky = (1 - t) * np.array(sky_top) + t * np.array(sky_bottom)  # (H,1,3)
    pixels = np.broadcast_to(sky, (HEIGHT, WIDTH, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(pixels))
    draw = ImageDraw.Draw(img)
    horizon = int(HEIGHT * rng.uniform(0.55, 0.7))
    for _ in range(3):
        cx, r = rng.uniform(0, WIDTH), rng.uniform(20, 45)
        draw.ellipse((cx - r, horizon - r * 0.6, cx + r, horizon + r * 0.6), fill=hill)
    draw.rectangle((0, horizon, WIDTH, HEIGHT), fill=ground)
    for _ in range(int(rng.integers(2, 5))):
        x, y = rng.uniform(0, WIDTH - 30), rng.uniform(20, horizon - 10)
        draw.rectangle((x, y, x + rng.uniform(15, 35), y + 4), fill=(200, 200, 200),
                       outline=(60, 60, 60))
    for _ in range(int(rng.integers(3, 7))):
        x, y = rng.uniform(5, WIDTH - 5), rng.uniform(10, horizon)
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(250, 220, 40))
    px = rng.uniform(20, WIDTH - 20)
    body = tuple(int(c) for c in rng.integers(60, 255, size=3))
    draw.rectangle((px - 4, horizon - 16, px + 4, horizon - 4), fill=body)  # body
    draw.ellipse((px - 4, horizon - 24, px + 4, horizon - 16), fill=(240, 200, 170))  # head
    draw.rectangle((px - 4, horizon - 4, px - 1, horizon), fill=(30, 30, 30))  # legs
    draw.rectangle((px + 1, horizon - 4, px + 4, horizon), fill=(30, 30, 30))
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="configs/seeds/demo", help="output folder")
    parser.add_argument("--count", type=int, default=6, help="number of scenes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        # No timestamps or text chunks, so the files are byte-identical across runs.
        scene(i).save(out / f"scene_{i:02d}.png", optimize=True)
    print(f"wrote {args.count} scenes to {out}")


if __name__ == "__main__":
    main()
