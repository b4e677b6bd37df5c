"""Teacher forcing under diagonal decoding's attention pattern: one forward pass over a window
of token steps gives every image token of a frame decoded diagonally the logits diagonal
decoding (`workers.wham.diagonal`) samples it from, so a small model can be fine-tuned for that
order (the remedy Ye et al., 2025 give for small models; scripts/finetune_diagonal.py).

Inside a diagonal frame, position i sees the frame positions j <= i with diag[j] <= diag[i]
(the context before the frame entirely); the positions after the image (the actions) see the
whole frame. A row's first token (r, 0), r >= 1, takes the logits of an extra "ghost" token:
the previous frame's token at (r - 1, cols - 1), fed at that position, seeing the context, the
frame's diagonals 0..r-1 and itself; nothing attends to a ghost. This is exactly what the
passes of `plan_passes` compute, so the keys and values of every real position are those the
KV cache holds at inference. Frames before the first diagonal one of a window are causal:
they are the prefilled context (a slid window is fed again causally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.wham.diagonal import diagonals, sees


@dataclass(frozen=True)
class TeacherForced:
    """One forward pass's inputs, and where each image token's logits come out of it."""

    inputs: torch.Tensor  # [B, L] the window's tokens but its last, then the ghosts
    positions: torch.Tensor  # [L] absolute position of each input
    mask: torch.Tensor  # [B, 1, L, L] True: input i may attend to input j
    sources: torch.Tensor  # [B, W, n] index into L of the logits of each image token
    targets: torch.Tensor  # [B, W, n] the image tokens
    valid: torch.Tensor  # [W, n] False where no input precedes the token (window's first)
    ghosts_from: int  # index of the first ghost in the inputs (the window's tokens before)


def _ghosts(window: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame, row) of every ghost: rows 1.. of each frame; none with one column (a row's
    first token's predecessor is then the token above, generated one pass earlier)."""
    rows, cols = grid
    per_frame = rows - 1 if cols > 1 else 0
    frame = torch.arange(window).repeat_interleave(per_frame)
    row = torch.arange(1, rows).repeat(window) if per_frame else torch.zeros(0, dtype=torch.long)
    return frame, row


def teacher_forced(window: torch.Tensor, previous: torch.Tensor, *, grid: tuple[int, int],
                   first_diagonal: torch.Tensor) -> TeacherForced:
    """window [B, W, tokens_per_step] token steps (image tokens first); previous [B, W, n] the
    image tokens of the frame before each one; first_diagonal [B]: frames at or after it are
    decoded diagonally (W or more: none)."""
    b, w, tps = window.shape
    rows, cols = grid
    n = rows * cols
    diag = diagonals(grid)
    j = torch.arange(n)
    s = w * tps - 1
    gframe, grow = _ghosts(w, grid)
    at = grow * cols - 1  # the ghost's frame position: (r - 1, cols - 1)
    g = gframe.numel()
    length = s + g
    device = window.device  # the index tensors below are built on the CPU, moved at the end
    inputs = torch.cat([window.reshape(b, -1)[:, :-1],
                        previous[:, gframe.to(device), at.to(device)]], dim=1)
    positions = torch.cat([torch.arange(s), gframe * tps + at])
    is_diag = torch.arange(w)[None, :] >= first_diagonal.cpu()[:, None]  # [B, W]

    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = torch.zeros(b, length, length, dtype=torch.bool)
    mask[:, :s, :s] = causal
    block = sees(diag, at=j, bound=diag)  # [n, n]: itself included (its own diagonal)
    for f in range(w):
        o = f * tps
        size = min(n, s - o)
        mask[:, o:o + size, o:o + size] = torch.where(
            is_diag[:, f, None, None], block[:size, :size], causal[o:o + size, o:o + size])
    # a ghost: the context, its frame's diagonals before its row (not its own position,
    # which is on a later diagonal), and itself
    ghosts = torch.arange(length)[None, :] < gframe[:, None] * tps  # [g, L]
    ghosts.scatter_(1, gframe[:, None] * tps + j[None, :], sees(diag, at=at, bound=grow - 1))
    ghosts[torch.arange(g), s + torch.arange(g)] = True
    mask[:, s:] = ghosts

    frame_start = torch.arange(w)[:, None] * tps
    base = frame_start + j[None, :] - 1  # [W, n] the raster predecessor
    ghost = s + torch.arange(w)[:, None] * (rows - 1) + j[None, :] // cols - 1
    row_start = (j % cols == 0) & (j >= cols) & (cols > 1)  # [n]
    sources = torch.where(is_diag[:, :, None] & row_start, ghost, base).clamp(min=0)
    return TeacherForced(inputs=inputs, positions=positions.to(device),
                         mask=mask[:, None].to(device), sources=sources.to(device),
                         targets=window[:, :, :n], valid=(base >= 0).to(device), ghosts_from=s)
