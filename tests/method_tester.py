"""Shared tests every method's test class inherits (after diffusers' CacheTesterMixin idea).

Subclass :class:`MethodTests`, implement :meth:`make_config`, and set ``changed_stat`` to a counter
in ``handle.stats`` that proves the method did real work (e.g. blocks skipped). The suite checks:
apply gives finite outputs; remove restores bit-identical outputs; applying twice raises; state
resets between generations (same seeds -> same output, a different step count works); the method
changes something when it should; cond/uncond as separate calls keep separate state; JSON round trip.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch

import diffspeed
from diffspeed.errors import AlreadyAppliedError
from diffspeed.methods.base import MethodConfig
from diffspeed.recipe import Recipe
from diffspeed.sampler import generate


@contextlib.contextmanager
def count_host_syncs(names: tuple[str, ...] = ("item", "__bool__")) -> Iterator[SimpleNamespace]:
    """Count calls of the host-syncing ``torch.Tensor`` methods ``names`` (``.item()``, ``bool()``, ...)
    made inside the block; yields a counter whose ``n`` is the count so far. Restores them on exit.

    Warm up first (one generation outside the block): lazy imports may sync once.
    """
    counter = SimpleNamespace(n=0)
    saved = {name: (name in vars(torch.Tensor), getattr(torch.Tensor, name)) for name in names}

    def counting(original):
        def fn(self, *args, **kwargs):
            counter.n += 1
            return original(self, *args, **kwargs)

        return fn

    try:
        for name, (_, original) in saved.items():
            setattr(torch.Tensor, name, counting(original))
        yield counter
    finally:
        for name, (own, original) in saved.items():
            if own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)


def load_tiny(name: str):
    """Load a zoo model with the global RNG seeded (shared by the method test modules)."""
    from diffspeed.models.loading import load_model

    torch.manual_seed(0)
    return load_model(name)


class RoundLinear(torch.nn.Module):
    """A test-local lossy weight quantizer: per-row symmetric ``bits``-bit codes (int8 storage) and
    float32 row scales, dequantized on the fly (shared by the quantization test modules)."""

    def __init__(self, lin: torch.nn.Linear, bits: int) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / qmax
        self.bits = bits
        self.register_buffer("codes", torch.round(w / scale).clamp(-qmax - 1, qmax).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        return torch.nn.functional.linear(x, (self.codes.float() * self.scale).to(x.dtype), self.bias)


def assert_did_work(stats, key: str) -> None:
    """The work counter ``key`` of a method's stats must be > 0: a no-op method leaves it at 0."""
    assert stats.get(key, 0) > 0, f"stat {key!r} shows no work done: {dict(stats)}"


class MethodTests:
    model_name: str = "tiny-dit"
    steps: int = 8
    guidance: float = 3.0
    seeds: tuple[int, ...] = (0, 1)
    # output must differ from the full model's (False for exact methods, e.g. slicing)
    expect_change: bool = True
    # a key of handle.stats that must be > 0 after a generation (real work skipped/changed)
    changed_stat: str | None = None

    def make_config(self) -> MethodConfig:
        raise NotImplementedError

    # ---- helpers -------------------------------------------------------------------------
    @pytest.fixture
    def loaded(self):
        return load_tiny(self.model_name)

    def run(self, loaded, steps: int | None = None, cfg_mode: str = "batched") -> torch.Tensor:
        labels = [i % (loaded.num_classes or 4) for i in range(len(self.seeds))]
        return generate(loaded, labels, list(self.seeds), num_steps=steps or self.steps,
                        guidance_scale=self.guidance, cfg_mode=cfg_mode)

    # ---- the shared suite ----------------------------------------------------------------
    def test_apply_gives_finite_outputs(self, loaded):
        handle = diffspeed.apply(loaded.transformer, self.make_config())
        out = self.run(loaded)
        assert torch.isfinite(out).all()
        stats = dict(handle.stats)
        handle.remove()
        # finiteness alone holds for a no-op: the work counter must move too
        assert self.changed_stat, "a method test must name the work counter in changed_stat"
        assert_did_work(stats, self.changed_stat)

    def test_remove_restores_bit_identical(self, loaded):
        base = self.run(loaded)
        handle = diffspeed.apply(loaded.transformer, self.make_config())
        self.run(loaded)
        handle.remove()
        after = self.run(loaded)
        assert torch.equal(base, after), "remove() must restore bit-identical outputs"

    def test_apply_twice_raises(self, loaded):
        handle = diffspeed.apply(loaded.transformer, self.make_config())
        with pytest.raises(AlreadyAppliedError):
            diffspeed.apply(loaded.transformer, self.make_config())
        handle.remove()
        diffspeed.apply(loaded.transformer, self.make_config()).remove()  # re-applying after remove works

    def test_state_resets_between_generations(self, loaded):
        with diffspeed.apply(loaded.transformer, self.make_config()):
            first = self.run(loaded)
            second = self.run(loaded)
            assert torch.equal(first, second), "state leaked from one generation into the next"
            other = self.run(loaded, steps=self.steps + 3)
            assert torch.isfinite(other).all()
            assert torch.equal(self.run(loaded), first)

    def test_changes_something(self, loaded):
        base = self.run(loaded)
        handle = diffspeed.apply(loaded.transformer, self.make_config())
        out = self.run(loaded)
        stats = dict(handle.stats)
        handle.remove()
        # expect_change alone is not enough (a method that just perturbs the output passes it) and an
        # exact method has no output change to check: every subclass must name a real work counter
        assert self.changed_stat, "a method test must name the work counter in changed_stat"
        assert_did_work(stats, self.changed_stat)
        if self.expect_change:
            assert not torch.equal(base, out), "method had no effect on the output"
        else:
            # an exact method must match the full model's output
            torch.testing.assert_close(out, base, msg="an exact method changed the output")

    def test_separate_cfg_branches(self, loaded):
        with diffspeed.apply(loaded.transformer, self.make_config()) as handle:
            out = self.run(loaded, cfg_mode="separate")
            assert torch.isfinite(out).all()
            ctx = diffspeed.get_context(loaded.transformer)
            assert ctx.num_steps == self.steps
            stats = dict(handle.stats)
        # the method must still do its work with cond/uncond as separate calls
        assert self.changed_stat, "a method test must name the work counter in changed_stat"
        assert_did_work(stats, self.changed_stat)

    def test_json_round_trip(self):
        cfg = self.make_config()
        recipe = Recipe((cfg,))
        again = Recipe.from_json(recipe.to_json())
        assert again.methods == (cfg,)
