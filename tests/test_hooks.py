import torch
from torch import nn

from diffspeed.hooks import is_wrapped, wrap_forward


def test_wrappers_compose_and_remove_in_any_order():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    ref = lin(x)
    h1 = wrap_forward(lin, lambda inner, inp: inner(inp) + 1)
    h2 = wrap_forward(lin, lambda inner, inp: inner(inp) * 2)
    assert torch.allclose(lin(x), (ref + 1) * 2)
    h1.remove()
    assert torch.allclose(lin(x), ref * 2)
    h2.remove()
    assert torch.equal(lin(x), ref)
    assert not is_wrapped(lin) and "forward" not in lin.__dict__
    h2.remove()  # idempotent


def test_existing_instance_forward_is_kept():
    lin = nn.Linear(4, 4)
    custom = lambda inp: inp * 0  # noqa: E731
    lin.forward = custom
    h = wrap_forward(lin, lambda inner, inp: inner(inp) + 3)
    assert torch.equal(lin(torch.ones(1, 4)), torch.full((1, 4), 3.0))
    h.remove()
    assert lin.forward is custom
