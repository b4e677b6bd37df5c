"""The three ways WHAM is rolled out (the official server's inference modes), and the three
orders in which a frame's image tokens may be sampled.

- `world_model`: the model predicts each next frame; the actions come from outside.
- `policy`: the model predicts each next action; the frames come from outside.
- `full`: the model predicts both.

- `sequential`: one image token per forward pass, in raster order (the model's own order).
- `diagonal`: every token of one anti-diagonal of the token grid per forward pass
  (`workers.wham.diagonal`); opt-in, an approximation.
- `diagonal-checked`: diagonal, with each row's first token drawn again from its true
  predecessor once the row above is complete, and the passes after it run again where that
  draw differs; more passes than `diagonal`, never more than `sequential`.
"""

MODES = ("world_model", "policy", "full")
DECODINGS = ("sequential", "diagonal", "diagonal-checked")
