"""The three ways WHAM is rolled out (the official server's inference modes), and the two
orders in which a frame's image tokens may be sampled.

- `world_model`: the model predicts each next frame; the actions come from outside.
- `policy`: the model predicts each next action; the frames come from outside.
- `full`: the model predicts both.

- `sequential`: one image token per forward pass, in raster order (the model's own order).
- `diagonal`: every token of one anti-diagonal of the token grid per forward pass
  (`workers.wham.diagonal`); opt-in, an approximation.
"""

MODES = ("world_model", "policy", "full")
DECODINGS = ("sequential", "diagonal")
