import torch

import diffspeed
from diffspeed.methods import CompileConfig
from diffspeed.sampler import generate

from method_tester import MethodTests


class TestCompileMethod(MethodTests):
    expect_change = False  # compiling must not change the function...
    changed_stat = "compiled_calls"  # ...but every call must go through the compiled path
    steps = 3

    def make_config(self):
        return CompileConfig(backend="eager")


def test_compiled_matches_eager(tiny_dit):
    base = generate(tiny_dit, [0], [0], num_steps=2)
    with diffspeed.apply(tiny_dit.transformer, CompileConfig(backend="aot_eager")) as h:
        out = generate(tiny_dit, [0], [0], num_steps=2)
        assert h.stats["compiled_calls"] == 2
    torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
