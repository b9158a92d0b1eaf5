"""Reuse-cost schedules for erta_cache (diffspeed.erta_schedule)."""

import pytest
import torch

from diffspeed.calibrate import _IN_MEMORY, calibrate_erta
from diffspeed.erta_schedule import pick_schedule
from diffspeed.errors import DiffspeedError
from diffspeed.methods.erta_cache import ErtaCacheConfig, apply_with_data
from diffspeed.models.loading import load_model
from diffspeed.sampler import sample

STEPS, GUIDANCE, SEEDS, LABELS = 8, 3.0, [0, 1], [0, 1]


def test_pick_schedule_takes_the_cheapest_under_the_cap():
    costs = [None, 5.0, 1.0, 2.0, 3.0, 0.5, 9.0, None]
    assert pick_schedule(costs, 2, 3) == [False, False, True, False, False, True, False, False]
    # by cost: 5, 2, 3, 4, 1, 6; with at most 2 in a row, 4 (would join 2-3 and 5) and 1 (1-2-3) are refused
    assert [i for i, s in enumerate(pick_schedule(costs, 4, 2)) if s] == [2, 3, 5, 6]
    with pytest.raises(DiffspeedError, match="cannot be met.*max_consecutive"):
        pick_schedule([None, 1.0, 1.0, 1.0, None], 3, 1)


@pytest.fixture(scope="module")
def ranked():
    loaded = load_model("tiny-dit")
    data = calibrate_erta(loaded, num_steps=STEPS, seeds=SEEDS, labels=LABELS, guidance_scale=GUIDANCE,
                          reuse_steps=2, max_consecutive=3, warmup_steps=2, final_steps=1, validate=False)
    return loaded, data


def test_reuse_steps_schedule_has_k_reused_steps_chosen_by_cost(ranked):
    _, data = ranked
    costs = data["stats"]["reuse_cost_mse"]
    assert data["calibration"]["schedule_rule"] == "reuse_cost" and data["calibration"]["reuse_steps"] == 2
    assert [c is not None for c in costs] == [False, False, True, True, True, True, True, False]
    assert all(c > 0 for c in costs if c is not None) and len({round(c, 12) for c in costs if c is not None}) > 1
    reused = [i for i, s in enumerate(data["schedule"]) if s]
    cheapest = sorted((c for c in range(STEPS) if costs[c] is not None), key=lambda c: costs[c])[:2]
    assert sorted(reused) == sorted(cheapest)


def _plain_reuse_final_mse(loaded, data, schedule) -> float:
    """Final-latent MSE vs the full model of erta_cache with ``schedule`` and no corrections."""
    model = loaded.transformer
    cond = loaded.make_condition(LABELS, torch.device("cpu"))

    def final() -> torch.Tensor:
        return sample(model, cond, seeds=SEEDS, latent_shape=loaded.latent_shape, num_steps=STEPS,
                      guidance_scale=GUIDANCE, adapter=loaded.adapter)

    full = final()
    cfg = ErtaCacheConfig(calibration=_IN_MEMORY, use_timestep_adjust=False, use_residual_correction=False)
    handle = apply_with_data(model, cfg, loaded.adapter, dict(data, schedule=list(schedule)))
    try:
        out = final()
    finally:
        handle.remove()
    return float(((out.double() - full.double()) ** 2).mean())


def test_reuse_cost_is_the_final_error_of_reusing_that_step_alone(ranked):
    """The batched ranking equals a plain erta_cache run (no corrections) that reuses only step c."""
    loaded, data = ranked
    costs = data["stats"]["reuse_cost_mse"]
    for c in (2, 5):
        mse = _plain_reuse_final_mse(loaded, data, [i == c for i in range(STEPS)])
        assert mse > 0
        assert mse == pytest.approx(costs[c], rel=1e-3)


def test_bad_reuse_steps():
    loaded = load_model("tiny-dit")
    # 5 steps outside warm-up / final; at most 3 in a row leaves at most 4 reusable
    for bad in (0, 5, 2.5, True):
        with pytest.raises(DiffspeedError, match="reuse_steps must be an integer in 1..4"):
            calibrate_erta(loaded, num_steps=STEPS, seeds=[0], reuse_steps=bad, warmup_steps=2, final_steps=1)
    with pytest.raises(DiffspeedError, match=r"1\.\.3 .*at most 1 reused in a row"):
        calibrate_erta(loaded, num_steps=STEPS, seeds=[0], reuse_steps=4, max_consecutive=1, warmup_steps=2,
                       final_steps=1)


def test_cli_reuse_steps(tmp_path):
    from typer.testing import CliRunner

    from diffspeed.calibrate import app, load_calibration

    out = tmp_path / "c.json"
    result = CliRunner().invoke(app, ["erta", "--model", "tiny-dit", "--steps", "8", "--seeds", "2", "--guidance", "3",
                                      "--reuse-steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = load_calibration(out)
    assert sum(data["schedule"]) == 3 and data["calibration"]["schedule_rule"] == "reuse_cost"
    bad = CliRunner().invoke(app, ["erta", "--model", "tiny-dit", "--steps", "8", "--reuse-steps", "9",
                                   "--out", str(tmp_path / "d.json")])
    assert bad.exit_code == 2 and "reuse_steps must be an integer" in bad.output
