"""`Linear` with prepacked oneDNN weights: the same product as nn.Linear, the same state dict,
a row's result independent of its batch, never stale after an in-place weight change; and
`packed_view` leaves the module it is given unchanged, sharing its weights."""

from __future__ import annotations

import copy

import pytest
import torch

from workers.wham.linear import Linear, packed_view


def _layer(seed: int = 0) -> Linear:
    layer = Linear(64, 48)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        layer.weight.normal_(generator=g)
        layer.bias.normal_(generator=g)
    return layer


@pytest.fixture
def packed() -> Linear:
    layer = packed_view(_layer())
    if layer is None:
        pytest.skip("this torch build has no oneDNN linear")
    return layer


def test_prepacked_product_equals_nn_linear(packed) -> None:
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = packed(x)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, packed.weight, packed.bias))
    assert set(packed.state_dict()) == {"weight", "bias"}


def test_a_rows_result_does_not_depend_on_the_batch(packed) -> None:
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        together = packed(x)
        for i in range(7):
            assert torch.equal(packed(x[i:i + 1]), together[i:i + 1])


def test_in_place_weight_changes_repack_and_autograd_uses_the_plain_path(packed) -> None:
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        packed(x)
        packed.weight.mul_(2)
        torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, packed.weight,
                                                                         packed.bias))
    packed(x).sum().backward()  # with grad: plain F.linear, so gradients exist
    assert packed.weight.grad is not None


def test_copies_drop_the_packed_cache(packed) -> None:
    with torch.no_grad():
        packed(torch.zeros(1, 64))
    clone = copy.deepcopy(packed)
    assert "_packed" not in vars(clone) and clone.prepacked
    with torch.no_grad():
        torch.testing.assert_close(clone(torch.ones(1, 64)), packed(torch.ones(1, 64)))


def test_packed_view_shares_the_weights_and_leaves_the_module_plain() -> None:
    torch.manual_seed(0)
    plain = torch.nn.Sequential(_layer(0), torch.nn.GELU(), Linear(48, 32))
    view = packed_view(plain)
    if view is None:
        pytest.skip("this torch build has no oneDNN linear")
    assert not any(getattr(m, "prepacked", False) for m in plain.modules())
    assert all(m.prepacked for m in view.modules() if isinstance(m, Linear))
    for a, b in zip(plain.parameters(), view.parameters(), strict=True):
        assert a is b  # the same tensors: no second copy of the plain weights
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(view(x), plain(x))
        plain[0].weight.mul_(-1)  # an in-place change shows in the view
        torch.testing.assert_close(view(x), plain(x))
