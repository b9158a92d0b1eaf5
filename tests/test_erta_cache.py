"""erta_cache (ERTACache) and its offline calibration (diffspeed.calibrate)."""

import copy
import json

import pytest
import torch

import diffspeed
from diffspeed.calibrate import (
    FORMAT,
    app,
    build_schedule,
    calibrate_erta,
    load_calibration,
    model_config_hash,
    save_calibration,
)
from diffspeed.errors import DiffspeedError, IncompatibleMethodsError
from diffspeed.methods import BlockCacheConfig, ErtaCacheConfig, StepCacheConfig
from diffspeed.methods.erta_cache import scale_model_output
from diffspeed.models.loading import load_model
from diffspeed.recipe import Recipe
from diffspeed.sampler import generate, sample

from method_tester import MethodTests, count_host_syncs

STEPS, GUIDANCE, SEEDS, LABELS = 8, 3.0, [0, 1], [0, 1]  # what MethodTests generates with


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """One calibration of tiny-dit on MethodTests' own seeds/labels; a high threshold so that it reuses."""
    loaded = load_model("tiny-dit")
    data = calibrate_erta(loaded, num_steps=STEPS, seeds=SEEDS, labels=LABELS, guidance_scale=GUIDANCE,
                          threshold=50.0, max_consecutive=3, warmup_steps=2, final_steps=1)
    path = tmp_path_factory.mktemp("erta") / "tiny-dit-8.json"
    save_calibration(data, path)
    return path, data


@pytest.fixture
def calib_path(calibration):
    return calibration[0]


@pytest.fixture
def calib_data(calibration):
    return copy.deepcopy(calibration[1])


def _write(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


class TestErtaCacheDiT(MethodTests):
    changed_stat = "skipped_blocks"
    steps = STEPS
    guidance = GUIDANCE

    @pytest.fixture(autouse=True)
    def _calibration(self, calib_path):
        self.calibration_path = str(calib_path)

    def make_config(self):
        return ErtaCacheConfig(calibration=self.calibration_path)

    def test_state_resets_between_generations(self, loaded):
        # the shared version also generates with steps + 3, which erta_cache must refuse: its schedule and
        # coefficients are per calibrated step; the refusal must leave the method usable
        with diffspeed.apply(loaded.transformer, self.make_config()):
            first = self.run(loaded)
            assert torch.equal(first, self.run(loaded)), "state leaked from one generation into the next"
            with pytest.raises(DiffspeedError, match=f"made for {self.steps} steps.*{self.steps + 3} steps"):
                self.run(loaded, steps=self.steps + 3)
            assert torch.equal(self.run(loaded), first)


# ---- calibration ---------------------------------------------------------------------------------
def test_calibration_contents(calibration, tiny_dit):
    path, data = calibration
    assert data["format"] == FORMAT
    assert data["model"] == {"class": "DiTTransformer2DModel", "config_hash": model_config_hash(tiny_dit.transformer),
                             "name": "tiny-dit"}
    assert data["num_steps"] == STEPS and data["guidance_scale"] == GUIDANCE
    schedule = data["schedule"]
    # warm-up 2, final 1, cap 3 with a threshold that never binds: 0,1 computed; 2,3,4 reused; 5; 6; 7 computed
    assert schedule == [False, False, True, True, True, False, True, False]
    assert schedule == build_schedule(data["stats"]["rel_l1_change"], threshold=50.0, max_consecutive=3,
                                      warmup_steps=2, final_steps=1)
    for k, reused in enumerate(schedule):
        if reused:
            assert len(data["residual_coeffs"][k]) == 2 and 0.5 <= data["dt_scale"][k] <= 1.5
        else:
            assert data["residual_coeffs"][k] is None and data["dt_scale"][k] == 1.0
    assert data["calibration"]["seeds"] == SEEDS and data["calibration"]["labels"] == LABELS
    assert data["calibration"]["threshold"] == 50.0
    # the closed-form fit can only lower the residual error on the calibration data (plain reuse is a candidate)
    stats = data["stats"]
    for k in range(STEPS):
        if schedule[k]:
            assert stats["residual_rel_error_corrected"][k] <= stats["residual_rel_error_plain"][k] + 1e-12


def test_build_schedule_rules():
    # threshold accumulates over reused steps; a computed step resets it
    changes = [None, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
    assert build_schedule(changes, threshold=0.12, max_consecutive=5, warmup_steps=1, final_steps=0) == [
        False, True, True, False, True, True, False, True]
    assert build_schedule(changes, threshold=1e-9, warmup_steps=1, final_steps=0) == [False] * 8
    assert build_schedule(changes, threshold=1e9, max_consecutive=1, warmup_steps=3, final_steps=2) == [
        False, False, False, True, False, True, False, False]


def test_calibration_json_round_trip(calibration, tmp_path):
    path, data = calibration
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = load_calibration(path)
    assert loaded == json.loads(json.dumps(data))  # JSON-able, nothing lost
    again = tmp_path / "sub" / "again.json"
    save_calibration(loaded, again)
    assert load_calibration(again) == loaded
    assert [p.name for p in again.parent.iterdir()] == ["again.json"]  # atomic write left no temp file
    save_calibration(loaded, again)  # overwrite works
    assert load_calibration(again) == loaded


def test_calibration_refuses_with_cache_applied(tiny_dit):
    with diffspeed.apply(tiny_dit.transformer, StepCacheConfig()):
        with pytest.raises(DiffspeedError, match="step_cache is applied"):
            calibrate_erta(tiny_dit, num_steps=4, seeds=[0])
    with pytest.raises(DiffspeedError, match="threshold must be > 0"):
        calibrate_erta(tiny_dit, num_steps=4, seeds=[0], threshold=0)
    with pytest.raises(DiffspeedError, match="at least one seed"):
        calibrate_erta(tiny_dit, num_steps=4, seeds=[])


# ---- refusals ------------------------------------------------------------------------------------
def test_refuses_other_model_class(calib_path):
    other = load_model("tiny-pixart")
    with pytest.raises(DiffspeedError, match=r"made for DiTTransformer2DModel/\w+ \(tiny-dit\), this model is "
                                             r"PixArtTransformer2DModel/.*diffspeed calibrate erta --model"):
        diffspeed.apply(other.transformer, ErtaCacheConfig(calibration=str(calib_path)))
    assert not diffspeed.methods.applied_methods(other.transformer)


def test_refuses_other_config(calib_path):
    from diffspeed.models.zoo import ZOO, construct

    spec = ZOO["tiny-dit"]
    model = construct(spec.class_name, dict(spec.config, num_layers=3))  # same class, another config
    with pytest.raises(DiffspeedError, match=f"this model is DiTTransformer2DModel/{model_config_hash(model)}"):
        diffspeed.apply(model, ErtaCacheConfig(calibration=str(calib_path)))


def test_refuses_other_step_count(tiny_dit, calib_path):
    with diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=str(calib_path))):
        with pytest.raises(DiffspeedError, match=r"made for 8 steps, but this generation has 6 steps.*--steps 6"):
            generate(tiny_dit, [0], [0], num_steps=6, guidance_scale=GUIDANCE)
        out = generate(tiny_dit, [0], [0], num_steps=8, guidance_scale=GUIDANCE)  # still usable
        assert torch.isfinite(out).all()


def test_refuses_unknown_step_count(tiny_dit, calib_path):
    model = tiny_dit.transformer
    with diffspeed.apply(model, ErtaCacheConfig(calibration=str(calib_path))):
        x = torch.randn(1, 4, 8, 8)
        with pytest.raises(DiffspeedError, match="step count.*diffspeed.generation"):
            model(x, timestep=torch.tensor([1000.0]), class_labels=torch.tensor([0]))  # auto mode, no num_steps
        with diffspeed.generation(model, num_steps=STEPS):  # the documented fix
            out = model(x, timestep=torch.tensor([1000.0]), class_labels=torch.tensor([0]), return_dict=False)[0]
        assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="diffspeed-erta/0"), "has format 'diffspeed-erta/0'.*reads 'diffspeed-erta/1'"),
        (lambda d: d.pop("format"), "has format None"),
        (lambda d: d["schedule"].pop(), "'schedule' must be a list of 8 booleans"),
        (lambda d: d["dt_scale"].__setitem__(2, -1.0), "'dt_scale' must be a list of 8 finite positive"),
        (lambda d: d["residual_coeffs"].__setitem__(2, [1.0]), r"residual_coeffs\[2\]"),
        (lambda d: d["schedule"].__setitem__(0, True), "step 0 cannot be reused"),
        (lambda d: d.update(model="x"), "'model' must hold"),
    ],
)
def test_refuses_invalid_files(tiny_dit, calib_data, tmp_path, mutate, message):
    mutate(calib_data)
    path = _write(tmp_path, calib_data)
    with pytest.raises(DiffspeedError, match=message) as exc:
        diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=path))
    assert "calibrate erta" in str(exc.value) and path in str(exc.value)
    assert not diffspeed.methods.applied_methods(tiny_dit.transformer)


def test_refuses_missing_and_corrupted_files(tiny_dit, calib_path, tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(DiffspeedError, match="nope.json does not exist; create it with `diffspeed calibrate erta"):
        diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=missing))
    corrupted = tmp_path / "corrupted.json"
    corrupted.write_text(calib_path.read_text()[:200])  # truncated
    with pytest.raises(DiffspeedError, match="is not valid JSON.*corrupted.*calibrate erta"):
        diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=str(corrupted)))
    corrupted.write_bytes(b"\x80\x81\x00garbage")
    with pytest.raises(DiffspeedError, match="calibrate erta"):
        diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=str(corrupted)))
    with pytest.raises(DiffspeedError, match="is a directory"):
        diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=str(tmp_path)))


def test_bad_config_values():
    with pytest.raises(DiffspeedError, match="needs `calibration`"):
        ErtaCacheConfig()
    with pytest.raises(DiffspeedError, match="use_timestep_adjust must be true or false"):
        ErtaCacheConfig(calibration="x.json", use_timestep_adjust="yes")


def test_incompatible_with_other_step_caches(tiny_dit, calib_path):
    cfg = ErtaCacheConfig(calibration=str(calib_path))
    for other in (StepCacheConfig(), BlockCacheConfig()):
        with pytest.raises(IncompatibleMethodsError, match="erta_cache"):
            Recipe((cfg, other))
        with diffspeed.apply(tiny_dit.transformer, other):
            with pytest.raises(IncompatibleMethodsError, match=other.method):
                diffspeed.apply(tiny_dit.transformer, cfg)


# ---- behaviour -----------------------------------------------------------------------------------
def test_schedule_is_the_calibrated_one(tiny_dit, calib_path, calib_data):
    schedule = calib_data["schedule"]
    n_reused = sum(schedule)
    model = tiny_dit.transformer
    ctx = diffspeed.get_context(model)
    n_blocks = len(tiny_dit.adapter.blocks(model))
    ran = []  # (step, branch) of every real execution of block 0 (its attention only runs when not skipped)
    hook = tiny_dit.adapter.blocks(model)[0][1].attn1.register_forward_hook(
        lambda *a: ran.append((ctx.step_index, ctx.branch)))
    try:
        with diffspeed.apply(model, ErtaCacheConfig(calibration=str(calib_path))) as h:
            generate(tiny_dit, LABELS, SEEDS, num_steps=STEPS, guidance_scale=GUIDANCE)  # batched CFG
            assert h.stats["skipped_steps"] == n_reused and h.stats["computed_steps"] == STEPS - n_reused
            assert h.stats["skipped_blocks"] == n_reused * n_blocks
            assert [s for s, _ in ran] == [k for k in range(STEPS) if not schedule[k]]
            ran.clear()
            generate(tiny_dit, LABELS, SEEDS, num_steps=STEPS, guidance_scale=GUIDANCE, cfg_mode="separate")
            states = ctx.branch_states(h.state_key)
            assert set(states) == {"cond", "uncond"}
            for branch, st in states.items():  # one schedule, per-branch state
                assert st["skipped"] == n_reused and st["computed"] == STEPS - n_reused
                assert [s for s, b in ran if b == branch] == [k for k in range(STEPS) if not schedule[k]]
            assert states["cond"]["r_m"][0] is not states["uncond"]["r_m"][0]
            assert h.stats["skipped_steps"] == n_reused + 2 * n_reused  # the batched run + 2 branches
    finally:
        hook.remove()


def _final_latents(loaded, config=None):
    cond = loaded.make_condition(LABELS, torch.device("cpu"))
    handle = diffspeed.apply(loaded.transformer, config) if config is not None else None
    try:
        return sample(loaded.transformer, cond, seeds=SEEDS, latent_shape=loaded.latent_shape, num_steps=STEPS,
                      guidance_scale=GUIDANCE, adapter=loaded.adapter)
    finally:
        if handle is not None:
            handle.remove()


def test_corrections_reduce_error_on_calibration_seeds(tiny_dit, calib_path, calib_data):
    """Robust by construction: calibration keeps a correction only if it lowers the final error on these
    samples (else it resets it to identity and corrected == plain exactly)."""
    full = _final_latents(tiny_dit)
    plain = _final_latents(tiny_dit, ErtaCacheConfig(calibration=str(calib_path), use_timestep_adjust=False,
                                                     use_residual_correction=False))
    corrected = _final_latents(tiny_dit, ErtaCacheConfig(calibration=str(calib_path)))
    err_plain = float(((plain - full) ** 2).mean())
    err_corr = float(((corrected - full) ** 2).mean())
    assert err_plain > 0
    assert err_corr <= err_plain * (1 + 1e-6)
    validation = calib_data["stats"]["validation"]
    assert validation["mse"]["plain"] == pytest.approx(err_plain, rel=1e-4)  # same runs, per sample vs batched
    if validation["kept"] == "both":  # what this tiny model calibrates to today; then the gain is real
        assert err_corr < err_plain
        assert corrected.shape == full.shape


def test_each_override_changes_the_integration(tiny_dit, calib_path, calib_data):
    if calib_data["stats"]["validation"]["kept"] != "both":
        pytest.skip("calibration kept only part of the corrections for this model")
    both = _final_latents(tiny_dit, ErtaCacheConfig(calibration=str(calib_path)))
    no_dt = _final_latents(tiny_dit, ErtaCacheConfig(calibration=str(calib_path), use_timestep_adjust=False))
    no_res = _final_latents(tiny_dit, ErtaCacheConfig(calibration=str(calib_path), use_residual_correction=False))
    assert not torch.equal(both, no_dt) and not torch.equal(both, no_res)


@pytest.mark.parametrize("form", ["scalar", "channel"])
def test_identity_calibration_equals_plain_reuse(tiny_dit, calib_data, tmp_path, form):
    """dt_scale 1 and coefficients (1, 0) / per-channel weights (1, 0, 0) are exactly plain reuse: the
    corrections are the only difference."""
    calib_data["dt_scale"] = [1.0] * STEPS
    calib_data["residual_coeffs"] = [[1.0, 0.0] if c is not None else None for c in calib_data["residual_coeffs"]]
    if form == "scalar":
        calib_data["channel_coeffs"] = None
    else:
        calib_data["channel_coeffs"] = [[[1.0 if i == 0 else 0.0] * len(w[0]) for i in range(len(w))]
                                        if w is not None else None for w in calib_data["channel_coeffs"]]
    path = _write(tmp_path, calib_data)
    identity = _final_latents(tiny_dit, ErtaCacheConfig(calibration=path))
    plain = _final_latents(tiny_dit, ErtaCacheConfig(calibration=path, use_timestep_adjust=False,
                                                     use_residual_correction=False))
    assert torch.equal(identity, plain)


def test_channel_correction_contents_and_use(tiny_dit, calib_data, tmp_path):
    """The default per-channel fit: one weight per hidden channel for each feature it had history for, a
    lower residual error than the scalar pair on the calibration data, and the method really applies it."""
    hidden = tiny_dit.transformer.config.num_attention_heads * tiny_dit.transformer.config.attention_head_dim
    assert calib_data["residual_correction"] == "channel" and calib_data["calibration"]["correction_order"] == 1
    computed_before = 0
    for k, reused in enumerate(calib_data["schedule"]):
        w = calib_data["channel_coeffs"][k]
        if not reused:
            assert w is None
            computed_before += 1
            continue
        assert len(w) == min(2, computed_before) and all(len(row) == hidden for row in w)
        assert len({round(v, 6) for v in w[0]}) > 1  # really per channel, not one number repeated
    scalar = calibrate_erta(tiny_dit, num_steps=STEPS, seeds=SEEDS, labels=LABELS, guidance_scale=GUIDANCE,
                            threshold=50.0, max_consecutive=3, correction="scalar", validate=False)
    assert scalar["channel_coeffs"] is None and scalar["schedule"] == calib_data["schedule"]
    # at the first reused step both fits see the same state (later ones follow their own corrected paths):
    # the scalar pair is fitted alike, and per-channel least squares, which contains it, fits better
    k = calib_data["schedule"].index(True)
    assert scalar["residual_coeffs"][k] == calib_data["residual_coeffs"][k]
    errors = [d["stats"]["residual_rel_error_corrected"][k] for d in (calib_data, scalar)]
    assert errors[0] < errors[1]
    # validation kept the per-channel weights here (the loop above read them): they are what runs
    with_channel = _final_latents(tiny_dit, ErtaCacheConfig(calibration=_write(tmp_path, calib_data)))
    calib_data["channel_coeffs"] = None
    without = _final_latents(tiny_dit, ErtaCacheConfig(calibration=_write(tmp_path, calib_data, "s.json")))
    assert not torch.equal(with_channel, without)


def test_channel_correction_bad_input(tiny_dit, calib_data, tmp_path):
    with pytest.raises(DiffspeedError, match="correction must be 'channel'.*'scalar'"):
        calibrate_erta(tiny_dit, num_steps=4, seeds=[0], correction="tensor")
    with pytest.raises(DiffspeedError, match="correction_order must be 1.*or 2"):
        calibrate_erta(tiny_dit, num_steps=4, seeds=[0], correction_order=3)
    k = calib_data["schedule"].index(True)
    calib_data["channel_coeffs"][k] = [[1.0, 0.0], [0.0]]
    with pytest.raises(DiffspeedError, match=rf"channel_coeffs\[{k}\] must be null or 1-3 equally long"):
        diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=_write(tmp_path, calib_data)))
    calib_data["channel_coeffs"][k] = [[1.0] * 5]  # well formed, but not this model's channel count
    with diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=_write(tmp_path, calib_data, "w.json"))):
        with pytest.raises(DiffspeedError, match="5 per-channel coefficients.*recalibrate"):
            sample(tiny_dit.transformer, tiny_dit.make_condition(LABELS, torch.device("cpu")), seeds=SEEDS,
                   latent_shape=tiny_dit.latent_shape, num_steps=STEPS, guidance_scale=GUIDANCE,
                   adapter=tiny_dit.adapter)


def test_output_scaling_handles_every_return_type(tiny_dit, calib_path, calib_data):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    model = tiny_dit.transformer  # learned sigma: 8 output channels, the first 4 are the prediction
    out = torch.randn(2, 8, 8, 8)
    scaled = scale_model_output(out, 2.0, model)
    assert torch.equal(scaled[:, :4], out[:, :4] * 2.0) and torch.equal(scaled[:, 4:], out[:, 4:])
    tup = scale_model_output((out,), 2.0, model)
    assert isinstance(tup, tuple) and torch.equal(tup[0], scaled)
    obj = scale_model_output(Transformer2DModelOutput(sample=out.clone()), 2.0, model)
    assert torch.equal(obj.sample, scaled) and torch.equal(obj["sample"], scaled) and torch.equal(obj[0], scaled)
    with pytest.raises(DiffspeedError, match="cannot find the prediction"):
        scale_model_output({"x": 1}, 2.0, model)

    # through the method: a reused step gives the same output with return_dict True and False
    k = calib_data["schedule"].index(True)
    ctx = diffspeed.get_context(model)
    x, labels = torch.randn(1, 4, 8, 8), torch.tensor([0])
    with diffspeed.apply(model, ErtaCacheConfig(calibration=str(calib_path))) as h:
        ctx.begin(STEPS, explicit=True)
        try:
            for i in range(k + 1):
                ctx.set_step(i, 1000.0 * (1 - i / STEPS))
                t = torch.tensor([1000.0 * (1 - i / STEPS)])
                as_tuple = model(x, timestep=t, class_labels=labels, return_dict=False)[0]
            as_obj = model(x, timestep=t, class_labels=labels, return_dict=True).sample
        finally:
            ctx.explicit = False
        assert h.stats["skipped_steps"] == 2 and h.stats["dt_adjusted_steps"] == 2
    assert torch.equal(as_tuple, as_obj)


def test_no_host_sync_in_hot_path(tiny_dit, calib_path):
    """Decisions come from the static schedule: no .item()/bool() on tensors during sampling."""
    with diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=str(calib_path))) as h:
        generate(tiny_dit, [0], [0], num_steps=STEPS, guidance_scale=GUIDANCE, check_finite=False)  # warm-up
        with count_host_syncs() as syncs:
            generate(tiny_dit, [0], [0], num_steps=STEPS, guidance_scale=GUIDANCE, check_finite=False)
            generate(tiny_dit, [0], [0], num_steps=STEPS, guidance_scale=GUIDANCE, check_finite=False,
                     cfg_mode="separate")
    assert syncs.n == 0
    assert h.stats["skipped_steps"] > 0 and h.stats["corrected_steps"] > 0


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_writes_a_valid_file(tmp_path, tiny_dit):
    from typer.testing import CliRunner

    out = tmp_path / "tmp.json"
    result = CliRunner().invoke(app, ["erta", "--model", "tiny-dit", "--steps", "8", "--seeds", "2",
                                      "--guidance", "3", "--threshold", "50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    data = load_calibration(out)
    assert data["num_steps"] == 8 and data["calibration"]["seeds"] == [0, 1]
    assert data["model"]["name"] == "tiny-dit" and sum(data["schedule"]) > 0
    with diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=str(out))) as h:
        generate(tiny_dit, [0], [0], num_steps=8, guidance_scale=3.0)
    assert h.stats["skipped_steps"] == sum(data["schedule"])
    assert data["residual_correction"] in ("channel", "scalar")  # scalar only if validation preferred it

    scalar_out = tmp_path / "scalar.json"
    result = CliRunner().invoke(app, ["erta", "--model", "tiny-dit", "--steps", "8", "--seeds", "2", "--guidance", "3",
                                      "--threshold", "50", "--correction", "scalar", "--out", str(scalar_out)])
    assert result.exit_code == 0, result.output
    assert load_calibration(scalar_out)["channel_coeffs"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--seeds", "0"], "--seeds must be a positive integer"),
        (["--threshold", "-1"], "--threshold must be > 0"),
        (["--out", "x.txt"], "--out must end with .json"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--correction", "tensor"], "correction must be 'channel'"),
        (["--correction-order", "3"], "correction_order must be 1"),
    ],
)
def test_cli_bad_input(tmp_path, monkeypatch, args, message):
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["erta", "--model", "tiny-dit", "--steps", "4", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.json"))


# ---- CFG branch-difference (guidance) reuse --------------------------------------------------------
@pytest.fixture(scope="module")
def guidance_calibration():
    """tiny-dit calibrated so that computed step 5 (between reused runs 2-4 and 6) reuses the branch difference."""
    loaded = load_model("tiny-dit")
    data = calibrate_erta(loaded, num_steps=STEPS, seeds=SEEDS, labels=LABELS, guidance_scale=GUIDANCE,
                          threshold=50.0, max_consecutive=3, warmup_steps=2, final_steps=1, guidance_threshold=50.0)
    return data


def test_build_guidance_schedule_rules():
    from diffspeed.calibrate import build_guidance_schedule

    changes = [None, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
    none_reused = [False] * 8
    # reused steps add to the accumulator but are never marked; computed ones in the window are, under the cap
    assert build_guidance_schedule(changes, none_reused, threshold=1.0, max_consecutive=2, warmup_steps=2,
                                   final_steps=1) == [False, False, True, True, False, True, True, False]
    assert build_guidance_schedule(changes, none_reused, threshold=0.12, max_consecutive=5, warmup_steps=1,
                                   final_steps=0) == [False, True, True, False, True, True, False, True]
    reused = [False, False, True, True, False, True, False, False]
    # steps 2-3 reused (acc 0.10), step 4 would reach 0.15 >= 0.12: computes both halves; 5 reused; 6 marked
    assert build_guidance_schedule(changes, reused, threshold=0.12, max_consecutive=5, warmup_steps=1,
                                   final_steps=0) == [False, True, False, False, False, False, True, False]
    assert not any(build_guidance_schedule(changes, none_reused, threshold=0.01, warmup_steps=1, final_steps=0))


def test_guidance_calibration_contents(guidance_calibration):
    data = guidance_calibration
    assert data["schedule"] == [False, False, True, True, True, False, True, False]
    assert data["guidance_reuse"] == [False] * 5 + [True, False, False]
    assert data["calibration"]["guidance_threshold"] == 50.0
    assert data["stats"]["guidance_reused_steps"] == 1
    change = data["stats"]["guidance_change"]
    assert change[0] is None and all(c is not None and c > 0 for c in change[1:])
    validation = data["stats"]["validation"]
    assert validation["mse_without_guidance_reuse"] >= 0 and validation["mse"][validation["kept"]] >= 0


def test_guidance_reuse_runs_only_the_cond_half(tiny_dit, guidance_calibration, tmp_path):
    from diffspeed.bench.peers import WorkCounter

    path = _write(tmp_path, guidance_calibration)
    with WorkCounter(tiny_dit.transformer, tiny_dit.adapter) as wc:
        with_half = _final_latents(tiny_dit, ErtaCacheConfig(calibration=path))
        rows_half = wc.counts()["mlp_rows"]
        wc.reset()
        without = _final_latents(tiny_dit, ErtaCacheConfig(calibration=path, use_guidance_reuse=False))
        rows_full = wc.counts()["mlp_rows"]
    # one computed step of the batched CFG call ran half its rows through every block
    per_step = rows_full // sum(not s for s in guidance_calibration["schedule"])
    assert rows_full - rows_half == per_step // 2
    assert torch.isfinite(with_half).all() and not torch.equal(with_half, without)
    with diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=path)) as h:
        _final_latents(tiny_dit)
    assert h.stats["guidance_reused_steps"] == 1 and h.stats["guidance_reuse_unavailable"] == 0


def test_guidance_reuse_is_exact_when_the_branches_agree(tiny_dit, guidance_calibration, tmp_path):
    """uncond == cond makes every branch difference 0, so rebuilding the uncond half loses nothing."""
    from diffspeed.models.bundle import Conditioning

    path = _write(tmp_path, guidance_calibration)
    cond = tiny_dit.make_condition(LABELS, torch.device("cpu"))
    same = Conditioning(cond=cond.cond, uncond=cond.cond)

    def run(config):
        with diffspeed.apply(tiny_dit.transformer, config) as h:
            out = sample(tiny_dit.transformer, same, seeds=SEEDS, latent_shape=tiny_dit.latent_shape,
                         num_steps=STEPS, guidance_scale=GUIDANCE, adapter=tiny_dit.adapter)
        return out, h.stats

    half, stats = run(ErtaCacheConfig(calibration=path))
    full, _ = run(ErtaCacheConfig(calibration=path, use_guidance_reuse=False))
    assert stats["guidance_reused_steps"] == 1
    torch.testing.assert_close(half, full, rtol=1e-5, atol=1e-5)


def test_guidance_reuse_needs_batched_cfg(tiny_dit, guidance_calibration, tmp_path):
    """Separate CFG calls have no batch to halve: both branches compute, counted as unavailable."""
    path = _write(tmp_path, guidance_calibration)
    kwargs = dict(num_steps=STEPS, guidance_scale=GUIDANCE, cfg_mode="separate", check_finite=False)
    with diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=path)) as h:
        out = generate(tiny_dit, LABELS, SEEDS, **kwargs)
    with diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=path, use_guidance_reuse=False)):
        ref = generate(tiny_dit, LABELS, SEEDS, **kwargs)
    assert h.stats["guidance_reused_steps"] == 0 and h.stats["guidance_reuse_unavailable"] == 2
    assert torch.equal(out, ref)


def test_guidance_reuse_hot_path_is_sync_free(tiny_dit, guidance_calibration, tmp_path):
    path = _write(tmp_path, guidance_calibration)
    with diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=path)) as h:
        generate(tiny_dit, [0], [0], num_steps=STEPS, guidance_scale=GUIDANCE, check_finite=False)
        with count_host_syncs() as syncs:
            generate(tiny_dit, [0], [0], num_steps=STEPS, guidance_scale=GUIDANCE, check_finite=False)
    assert syncs.n == 0 and h.stats["guidance_reused_steps"] == 2


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.__setitem__("guidance_reuse", [False] * (STEPS - 1)), "'guidance_reuse' must be a list of 8"),
        (lambda d: d.__setitem__("guidance_reuse", [True] + [False] * (STEPS - 1)), "step 0 cannot reuse"),
        (lambda d: d.__setitem__("guidance_reuse", [1] * STEPS), "'guidance_reuse' must be a list of 8 booleans"),
    ],
)
def test_refuses_bad_guidance_reuse(tiny_dit, guidance_calibration, tmp_path, mutate, message):
    data = copy.deepcopy(guidance_calibration)
    mutate(data)
    with pytest.raises(DiffspeedError, match=message):
        diffspeed.apply(tiny_dit.transformer, ErtaCacheConfig(calibration=_write(tmp_path, data)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance_threshold": 0.0}, "--guidance-threshold must be > 0"),
        ({"guidance_threshold": float("nan")}, "--guidance-threshold must be > 0"),
        ({"guidance_threshold": 0.1, "guidance_scale": 1.0}, "needs guidance > 1"),
        ({"guidance_threshold": 0.1, "guidance_max_consecutive": 0}, "guidance_max_consecutive must be an integer"),
    ],
)
def test_guidance_calibration_bad_input(tiny_dit, kwargs, message):
    args = {"num_steps": 4, "seeds": [0], "guidance_scale": GUIDANCE, **kwargs}
    with pytest.raises(DiffspeedError, match=message):
        calibrate_erta(tiny_dit, **args)


def test_use_guidance_reuse_must_be_bool(calib_path):
    with pytest.raises(DiffspeedError, match="use_guidance_reuse must be true or false"):
        ErtaCacheConfig(calibration=str(calib_path), use_guidance_reuse="yes")


def test_stale_difference_extrapolates_linearly():
    from diffspeed.methods.erta_cache import remember, stale_difference

    hist = []
    remember(hist, 1, torch.tensor([1.0]))
    assert torch.equal(stale_difference(hist, 4, order=1), torch.tensor([1.0]))  # one stored: reused as is
    remember(hist, 3, torch.tensor([2.0]))
    remember(hist, 5, (torch.tensor([4.0]), None))
    remember(hist, 6, (torch.tensor([5.0]), None))
    assert [s for s, _ in hist] == [5, 6]  # only the last two are kept
    assert torch.equal(stale_difference(hist, 8, order=0)[0], torch.tensor([5.0]))
    ext = stale_difference(hist, 8, order=1)
    assert torch.equal(ext[0], torch.tensor([7.0])) and ext[1] is None


def test_cli_guidance_threshold(tmp_path):
    from typer.testing import CliRunner

    out = tmp_path / "g.json"
    result = CliRunner().invoke(app, ["erta", "--model", "tiny-dit", "--steps", "8", "--seeds", "2", "--guidance", "3",
                                      "--threshold", "50", "--guidance-threshold", "50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = load_calibration(out)
    assert data["guidance_reuse"] == [False] * 5 + [True, False, False] and data["guidance_order"] == 0
    assert "1 computed steps run the cond half only" in result.output
    bad = CliRunner().invoke(app, ["erta", "--model", "tiny-dit", "--steps", "4", "--guidance", "1",
                                   "--guidance-threshold", "0.1", "--out", str(tmp_path / "b.json")])
    assert bad.exit_code == 2 and "needs guidance > 1" in bad.output


def test_difference_sources_are_the_full_steps_a_guidance_step_reads():
    from diffspeed.methods.erta_cache import difference_sources

    #            0      1      2     3      4      5     6      7
    schedule = [False, False, True, False, False, True, False, False]
    guidance = [False, False, False, False, True, False, True, False]
    # step 4 reads step 3 (order 0) or 1 and 3 (order 1); step 6 reads 3 again (step 4 only ran half)
    assert difference_sources(schedule, guidance, 0) == {3}
    assert difference_sources(schedule, guidance, 1) == {1, 3}
    assert difference_sources(schedule, [False] * 8, 0) == set()


def test_channel_correction_order_two_uses_the_curvature(tiny_dit, tmp_path):
    """Order 2 fits a third (curvature) weight once three computed steps exist, and the method keeps the
    residual it needs: with the curvature weights zeroed the output changes (they are really applied)."""
    data = calibrate_erta(tiny_dit, num_steps=STEPS, seeds=SEEDS, labels=LABELS, guidance_scale=GUIDANCE,
                          threshold=50.0, max_consecutive=3, warmup_steps=3, final_steps=1, correction_order=2,
                          validate=False)
    assert data["calibration"]["correction_order"] == 2
    counts = [len(w) for w in data["channel_coeffs"] if w is not None]
    assert counts and all(c == 3 for c in counts)  # three computed warm-up steps before the first reuse
    out = _final_latents(tiny_dit, ErtaCacheConfig(calibration=_write(tmp_path, data)))
    for w in data["channel_coeffs"]:
        if w is not None:
            w[2] = [0.0] * len(w[2])
    flat = _final_latents(tiny_dit, ErtaCacheConfig(calibration=_write(tmp_path, data, "flat.json")))
    assert torch.isfinite(out).all() and not torch.equal(out, flat)


def test_channel_residual_in_the_residual_basis():
    """The method applies feature weights (value, slope, curvature) as weights on the residuals
    themselves: the same sum, no differences formed; half-precision inputs accumulate in float32."""
    from diffspeed.methods.erta_cache import channel_residual, history_weights, residual_features, residual_history

    g = torch.Generator().manual_seed(0)
    r = [torch.randn(2, 16, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    for k in (1, 2, 3):
        w = torch.randn(k, 8, generator=g, dtype=torch.float64)
        want = sum(f * w_i for f, w_i in zip(residual_features(*r, k), w))
        got = channel_residual(residual_history(*r, k), history_weights(w).double())
        assert torch.allclose(got, want, atol=1e-5)  # history_weights rounds to float32
    assert residual_history(r[0], None, None, 2) is None and residual_features(r[0], r[1], None, 3) is None

    w = history_weights(torch.stack([1 + 0.003 * torch.randn(8, generator=g), 0.3 * torch.randn(8, generator=g)]))
    half = [x.bfloat16() for x in r[:2]]
    out = channel_residual(half, w)
    assert out.dtype == torch.bfloat16
    # one bf16 rounding of the result, not of weights near 1 (which alone would cost ~2^-9 relative)
    assert torch.equal(out, channel_residual([h.float() for h in half], w).bfloat16())
    assert not torch.equal(out, half[0] * w[0].bfloat16() + half[1] * w[1].bfloat16())
