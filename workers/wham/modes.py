"""The three ways WHAM is rolled out (the official server's inference modes).

- `world_model`: the model predicts each next frame; the actions come from outside.
- `policy`: the model predicts each next action; the frames come from outside.
- `full`: the model predicts both.
"""

MODES = ("world_model", "policy", "full")
