"""diffspeed.bench.metrics / timing / flops: fidelity metrics, timing, sync counting, FLOPs (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffspeed.bench.flops import flops_per_forward
from diffspeed.bench.metrics import psnr, rel_error, ssim
from diffspeed.bench.timing import count_syncs, peak_memory, time_callable
from diffspeed.errors import DiffspeedError


def _images(batch=2, c=3, h=32, w=32, seed=0):
    return torch.rand(batch, c, h, w, generator=torch.Generator().manual_seed(seed))


# ---- PSNR ------------------------------------------------------------------------------------


def test_psnr_identical_is_inf():
    a = _images()
    assert psnr(a, a.clone()) == math.inf
    assert psnr(a, a, reduction="none") == [math.inf, math.inf]


def test_psnr_matches_mse_formula_per_sample_mean():
    a = _images(batch=3)
    noise = 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    b = a + noise
    diff = b.double() - a.double()  # the float32 sum rounds: use the noise actually added
    per = [10 * math.log10(1.0 / float(diff[i].pow(2).mean())) for i in range(3)]
    assert psnr(b, a) == pytest.approx(sum(per) / 3, rel=1e-12)
    assert psnr(b, a, reduction="none") == pytest.approx(per, rel=1e-12)
    # data_range scales the peak
    assert psnr(b * 255, a * 255, data_range=255.0) == pytest.approx(sum(per) / 3, rel=1e-9)


def test_psnr_uniform_error_known_value():
    a = torch.zeros(1, 3, 8, 8)
    b = torch.full((1, 3, 8, 8), 0.1)  # mse = 0.01 -> 20 dB
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-6)


def test_psnr_batch_mean_skips_identical_samples():
    a = _images(batch=2)
    b = a.clone()
    b[1] += 0.1  # sample 0 identical, sample 1 at 20 dB
    assert psnr(b, a) == pytest.approx(20.0, abs=1e-4)


def test_psnr_low_precision_inputs_are_computed_in_float64():
    a = _images().half()
    b = (a.float() + 0.01).half()
    expected = psnr(b.double(), a.double())
    assert psnr(b, a) == pytest.approx(expected, rel=1e-12)


def test_shape_mismatch_raises():
    with pytest.raises(DiffspeedError, match="shapes differ"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(DiffspeedError):
        ssim(torch.zeros(2, 3), torch.zeros(2, 3))  # not an image


# ---- SSIM ------------------------------------------------------------------------------------


def test_ssim_identical_is_one():
    a = _images()
    assert ssim(a, a.clone()) == 1.0


def test_ssim_decreases_with_noise():
    a = _images(batch=2, h=48, w=48)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(a.shape, generator=g)
    values = [ssim((a + s * noise).clamp(0, 1), a) for s in (0.01, 0.05, 0.2)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_ssim_constant_images_closed_form():
    # constant images: variances are 0, so SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    x, y = 0.3, 0.6
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * x * y + c1) / (x * x + y * y + c1)
    got = ssim(torch.full((1, 1, 16, 16), x), torch.full((1, 1, 16, 16), y))
    assert got == pytest.approx(expected, rel=1e-10)


def test_ssim_video_is_mean_over_frames():
    a = torch.rand(2, 3, 4, 24, 24, generator=torch.Generator().manual_seed(5))
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(6))).clamp(0, 1)
    per_frame = [ssim(b[:, :, f], a[:, :, f]) for f in range(4)]
    assert ssim(b, a) == pytest.approx(sum(per_frame) / 4, rel=1e-12)
    assert ssim(a, a) == 1.0


def test_ssim_small_images_use_smaller_window():
    a = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert ssim(a, a) == 1.0
    assert ssim((a + 0.1).clamp(0, 1), a) < 1.0


# ---- relative error --------------------------------------------------------------------------


def test_rel_error():
    b = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel_error(b * 1.1, b) == pytest.approx(0.1, rel=1e-9)
    assert rel_error((b * 1.1).float(), b.float()) == pytest.approx(0.1, rel=1e-5)
    assert rel_error(b, b) == 0.0
    assert rel_error(torch.zeros(1, 3), torch.zeros(1, 3)) == 0.0
    assert rel_error(torch.ones(1, 3), torch.zeros(1, 3)) == math.inf
    per = rel_error(torch.stack([b[0] * 1.5, b[1]]), b[:2], reduction="none")
    assert per == pytest.approx([0.5, 0.0])


# ---- timing / syncs / FLOPs ------------------------------------------------------------------


def test_time_callable_positive_median_and_counts_calls():
    calls = []

    def fn():
        calls.append(1)
        sum(range(2000))

    res = time_callable(fn, warmup=2, repeats=5, device="cpu")
    assert len(calls) == 7
    assert len(res.all_ms) == 5 and all(t > 0 for t in res.all_ms)
    assert res.median_ms > 0 and res.min_ms <= res.median_ms <= max(res.all_ms)


def test_peak_memory_cpu_is_none():
    assert peak_memory(lambda: torch.ones(10), "cpu") is None


def test_count_syncs_counts_item_and_friends_and_restores():
    before = {name: vars(torch.Tensor).get(name) for name in ("item", "tolist", "__bool__", "cpu")}
    sync_before = torch.cuda.synchronize
    x = torch.arange(4.0)
    with count_syncs() as syncs:
        x.sum().item()
        x.sum().item()
        x.tolist()
        bool(x[0] > 1)
        x.cpu()  # already on the CPU: not a sync
    assert syncs.by_kind == {"item": 2, "tolist": 1, "__bool__": 1}
    assert syncs.count == 4
    with count_syncs() as none:
        y = x * 2 + 1
    assert none.count == 0 and y.shape == x.shape
    after = {name: vars(torch.Tensor).get(name) for name in before}
    assert after == before and torch.cuda.synchronize is sync_before
    assert x.sum().item() == 6.0


def test_count_syncs_nested():
    x = torch.ones(2)
    with count_syncs() as outer:
        x.sum().item()
        with count_syncs() as inner:
            x.sum().item()
    assert inner.count == 1
    assert outer.count == 2


def test_flops_per_forward_linear():
    lin = nn.Linear(8, 16)
    x = torch.randn(4, 8)
    expected = 2 * 4 * 8 * 16
    assert flops_per_forward(lin, lambda m: m(x)) == expected
    assert flops_per_forward(lin, lambda: lin(x)) == expected
    assert flops_per_forward(lin, (x,)) == expected
    assert flops_per_forward(lin, {"input": x}) == expected
