"""Diagonal decoding: the image tokens of a frame sampled one anti-diagonal of the token grid
per forward pass instead of one token per pass (Ye et al., 2025, "Fast Autoregressive Video
Generation with Diagonal Decoding", arXiv 2503.14070; training-free).

The tokens of a rows x cols grid lie in raster order: token j = r * cols + c sits on diagonal
r + c, and a frame has rows + cols - 1 diagonals. Diagonal 0 (token 0) is sampled from the
logits of the step's prefill, as in sequential decoding. Pass k >= 1 samples every token of
diagonal k at once: a token's logits are those of its raster predecessor j - 1, fed at its
own absolute position and attending only to positions already generated (the context,
diagonals 0..k-1) and to itself. The predecessor of a token inside a row is its left
neighbour, generated in the pass before; the predecessor of a row's first token is the last
token of the row above, which is not generated yet (for more than one column): that position
is fed the previous frame's token at the same place (frames change little from step to step),
its key/value stays invisible to every other query, and it is overwritten when the real token
is fed. Every token generated in pass k - 1 is fed in pass k, so after the last pass the cache
holds the frame in raster layout, all but its last token, exactly like sequential decoding.

With one row or one column every predecessor is generated one pass earlier, no guess is fed,
and the passes reproduce sequential decoding token for token. `plan_passes` builds the passes
of a grid once; nothing in it depends on the step or the batch.

A wrong guess costs most at a row's first token: the rest of the row follows it. Checked
diagonal decoding (`diagonal-checked`) draws each row's first token again once the row above
is complete, from its predecessor's logits (the pass that feeds the row above's last token
computes them anyway), with the same noise. Where that draw differs, it replaces the token and
decoding goes back to the pass after the one that sampled it: every pass from there on runs
again, for the whole batch. Nothing sampled before that token depends on it, so a rollout
whose draws all stood gets the same tokens again (the same inputs through the same passes),
and a rollout's tokens do not depend on its batch; no checked token is sampled again (a row's
first token is checked cols - 1 passes after it is sampled, and decoding never goes back past
a check). Every row's first token is then the one its true predecessor's logits give; a frame
costs rows + cols - 1 passes plus cols - 1 for every row gone back to: at most rows x cols,
sequential decoding's count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DiagonalPass:
    """Forward pass k >= 1 of a frame: feed `queries`, sample diagonal k (`targets`)."""

    queries: torch.Tensor  # [P] frame positions fed, ascending
    guessed: torch.Tensor  # [P] bool: not generated yet, fed the previous frame's token
    targets: torch.Tensor  # [T] frame positions sampled: diagonal k
    source: torch.Tensor  # [T] index into queries of each target's predecessor (target - 1)
    visible: torch.Tensor  # [P, n] bool: the frame positions each query attends to
    first: int  # the smallest target (a host int: its sampling range is every target's)
    span: int  # frame positions up to the last query: max(queries) + 1
    check: int = -1  # index into queries of a row's last token, fed with its whole raster
    # prefix generated: its logits are those of the next row's first token (-1: none)
    check_target: int = 0  # that first token's frame position
    rewind: int = 0  # index in the plan of the pass after the one that sampled it

    def cache_mask(self, *, start: int, length: int) -> torch.Tensor:
        """[P, length] over cache positions for a frame laid out from `start`: the context
        before it, then the frame's `visible` part; nothing after the frame."""
        n = self.visible.shape[1]
        mask = self.visible.new_zeros(self.visible.shape[0], length)
        mask[:, :start] = True
        mask[:, start:start + n] = self.visible[:, :length - start]
        return mask


def sees(diag: torch.Tensor, *, at: torch.Tensor, bound: torch.Tensor | int) -> torch.Tensor:
    """[P, n]: the frame positions j a token fed at frame position at[p] attends to, itself
    aside: those at or before it whose diagonal is at most bound[p] (the diagonals generated
    when it is fed). diag [n] is `diagonals(grid)`."""
    j = torch.arange(diag.numel(), device=diag.device)
    bound = torch.as_tensor(bound, device=diag.device).expand(at.shape)
    return (j[None, :] <= at[:, None]) & (diag[None, :] <= bound[:, None])


def diagonals(grid: tuple[int, int]) -> torch.Tensor:
    """The diagonal r + c of every raster position of a rows x cols grid: [rows * cols]."""
    rows, cols = grid
    j = torch.arange(rows * cols)
    return j // cols + j % cols


def plan_passes(grid: tuple[int, int], *, device: torch.device | str) -> list[DiagonalPass]:
    """The rows + cols - 2 passes after the prefill that sample diagonals 1.. of a frame.

    Pass k feeds diagonal k - 1, which holds the last token of row k - cols (with more than
    one column): every position before it is generated by then, so its logits are the ones
    sequential decoding draws row k - cols + 1's first token from (`check`, `check_target`,
    `rewind`: what checked diagonal decoding draws again, and where it goes back to)."""
    rows, cols = grid
    diag = diagonals(grid)
    n = diag.numel()
    j = torch.arange(n)
    passes = []
    for k in range(1, int(diag.max()) + 1):
        row = k - cols + 1  # the row whose first token pass k can check
        checks = cols > 1 and 1 <= row < rows
        generated = diag <= k - 1
        targets = (diag == k).nonzero().flatten()
        # diagonal k - 1 goes into the cache now; each target needs its predecessor's logits
        queries = torch.cat([(diag == k - 1).nonzero().flatten(), targets - 1]).unique()
        passes.append(DiagonalPass(
            queries=queries.to(device),
            guessed=(~generated[queries]).to(device),
            targets=targets.to(device),
            source=torch.searchsorted(queries, targets - 1).to(device),
            visible=(sees(diag, at=queries, bound=k - 1)
                     | (j[None, :] == queries[:, None])).to(device),  # [P, n]
            first=int(targets[0]),
            span=int(queries[-1]) + 1,
            check=int(torch.searchsorted(queries, row * cols - 1)) if checks else -1,
            check_target=row * cols if checks else 0,
            rewind=row if checks else 0,  # the first token of row r: diagonal r, pass r
        ))
    return passes
