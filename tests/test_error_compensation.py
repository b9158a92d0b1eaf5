"""Cumulative quantization-error compensation: calibration (diffspeed.quant.compensation) and the
``error_compensation`` method."""

import copy
import json

import pytest
import torch
from torch import nn

import diffspeed
from diffspeed.calibrate import model_identity
from diffspeed.errors import DiffspeedError
from diffspeed.methods import ErrorCompensationConfig
from diffspeed.quant.compensation import CompensationTable, calibrate_compensation, fit_channel_affine
from diffspeed.sampler import generate

from method_tester import MethodTests, RoundLinear, count_host_syncs, load_tiny

STEPS, GUIDANCE = 8, 3.0
CAL_SEEDS = [0, 1, 2, 3]
HELD_OUT = [100, 101, 102, 103]  # never seen by calibration


def quantize_blocks(model: nn.Module, bits: int) -> nn.Module:
    """A copy of ``model`` with every linear of the transformer blocks rounded to ``bits`` bits."""
    q = copy.deepcopy(model)
    for name, mod in list(q.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and "transformer_blocks" in f"{name}.{child_name}":
                setattr(mod, child_name, RoundLinear(child, bits))
    return q


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (x - y).pow(2).mean()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """reference-image (trained), a 4-bit copy, and a table calibrated on CAL_SEEDS."""
    loaded = load_tiny("reference-image")
    quant = quantize_blocks(loaded.transformer, 4)
    table = calibrate_compensation(loaded.transformer, quant, loaded=loaded, seeds=CAL_SEEDS,
                                   labels=[s % 12 for s in CAL_SEEDS], num_steps=STEPS, guidance_scale=GUIDANCE)
    path = tmp_path_factory.mktemp("comp") / "ref-8.json"
    table.save(path)
    qloaded = copy.copy(loaded)
    qloaded.transformer = quant
    return loaded, qloaded, table, str(path)


def _gen(loaded, seeds):
    return generate(loaded, [s % 12 for s in seeds], list(seeds), num_steps=STEPS, guidance_scale=GUIDANCE)


# ---- calibration ------------------------------------------------------------------------------------
def test_fit_recovers_affine_and_shrinks_to_identity():
    torch.manual_seed(0)
    v = torch.randn(4, 3, 16, 16)
    a_true = torch.tensor([0.9, 1.1, 1.0]).view(1, 3, 1, 1)
    b_true = torch.tensor([0.05, -0.1, 0.0]).view(1, 3, 1, 1)
    a, b = fit_channel_affine(v, a_true * v + b_true, ridge=0.0)
    assert torch.allclose(a.float(), a_true.flatten(), atol=1e-6) and torch.allclose(b.float(), b_true.flatten(), atol=1e-6)
    # a huge ridge pulls the fit back to the identity; a moderate one lands in between
    a, b = fit_channel_affine(v, a_true * v + b_true, ridge=1e9)
    assert torch.allclose(a.float(), torch.ones(3), atol=1e-4) and torch.allclose(b.float(), torch.zeros(3), atol=1e-4)
    a, _ = fit_channel_affine(v, a_true * v + b_true, ridge=4.0)  # prior worth as much as the 4 samples
    assert 0.9 < float(a[0]) < 1.0 and 1.0 < float(a[1]) < 1.1


def test_calibration_lowers_error_on_calibration_samples(setup):
    _, _, table, _ = setup
    assert table.num_steps == STEPS and table.latent_channels == 3
    assert table.sampler == {"sampler": "flow_euler", "shift": 1.0, "guidance_scale": GUIDANCE, "cfg": "batched"}
    assert table.stats["final_mse_corrected"] < table.stats["final_mse_uncorrected"]
    assert not table.is_identity()


def test_held_out_psnr_improves(setup):
    """The point of the method: on seeds calibration never saw, the 4-bit model lands closer to the
    full-precision output. Observed on these seeds: 25.29 dB -> 25.99 dB (+0.70 dB)."""
    loaded, qloaded, _, path = setup
    ref = _gen(loaded, HELD_OUT)
    plain = _gen(qloaded, HELD_OUT)
    with diffspeed.apply(qloaded.transformer, ErrorCompensationConfig(table=path)) as handle:
        corrected = _gen(qloaded, HELD_OUT)
        assert handle.stats["steps_corrected"] == STEPS
    gain = psnr(corrected, ref) - psnr(plain, ref)
    print(f"held-out PSNR: plain {psnr(plain, ref):.2f} dB, compensated {psnr(corrected, ref):.2f} dB, gain {gain:+.2f} dB")
    assert gain > 0.35, f"compensation gained only {gain:.3f} dB on held-out seeds"


def test_wrong_step_count_names_the_fix(setup):
    _, qloaded, table, path = setup
    with pytest.raises(DiffspeedError, match="calibrated for 8 steps, this run has 10: recalibrate with --steps 10"):
        table.check_steps(10, path)
    with diffspeed.apply(qloaded.transformer, ErrorCompensationConfig(table=path)):
        with pytest.raises(DiffspeedError, match="calibrated for 8 steps, this run has 10"):
            generate(qloaded, [0], [0], num_steps=10, guidance_scale=GUIDANCE)
        generate(qloaded, [0], [0], num_steps=STEPS, guidance_scale=GUIDANCE)  # still usable after the refusal


def test_other_model_is_refused(setup):
    _, _, _, path = setup
    tiny = load_tiny("tiny-dit")
    with pytest.raises(DiffspeedError, match="calibrated for DiTTransformer2DModel/.*recalibrate"):
        diffspeed.apply(tiny.transformer, ErrorCompensationConfig(table=path))


def test_hook_does_not_sync(setup):
    _, qloaded, _, path = setup
    _gen(qloaded, [0])  # warm up
    with count_host_syncs() as base:
        _gen(qloaded, [0])
    with diffspeed.apply(qloaded.transformer, ErrorCompensationConfig(table=path)):
        _gen(qloaded, [0])  # warm up (builds the per-step coefficient tensors)
        with count_host_syncs() as with_method:
            _gen(qloaded, [0])
    assert with_method.n == base.n, f"the hook added {with_method.n - base.n} host syncs"


def test_table_json_round_trip_and_bad_files(setup, tmp_path):
    _, _, table, path = setup
    again = CompensationTable.load(path)
    assert again.to_dict() == table.to_dict()
    data = json.loads(open(path).read())
    data["a"] = data["a"][:-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DiffspeedError, match="'a' must be 8 lists of 3"):
        CompensationTable.load(bad)
    bad.write_text(json.dumps({**data, "format": "other/9"}))
    with pytest.raises(DiffspeedError, match="has format 'other/9'"):
        CompensationTable.load(bad)
    with pytest.raises(DiffspeedError, match="does not exist"):
        CompensationTable.load(tmp_path / "missing.json")


def test_config_validation():
    with pytest.raises(DiffspeedError, match="needs `table`"):
        ErrorCompensationConfig(table="")


# ---- the shared method suite, with a hand-made table for tiny-dit (learned-sigma output: 2C channels) ----
@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    loaded = load_tiny("tiny-dit")
    n, c = 8, loaded.latent_shape[0]
    table = CompensationTable(
        num_steps=n, latent_channels=c, model=model_identity(loaded.transformer, "tiny-dit"),
        a=[[1.0 + 0.02 * (i % 3) + 0.01 * j for j in range(c)] for i in range(n)],
        b=[[0.01 * (j - 1) for j in range(c)] for _ in range(n)],
    )
    path = tmp_path_factory.mktemp("comp-tiny") / "tiny-8.json"
    table.save(path)
    return str(path)


class TestErrorCompensationMethod(MethodTests):
    changed_stat = "steps_corrected"
    steps = 8

    @pytest.fixture(autouse=True)
    def _table(self, tiny_table):
        self.table_path = tiny_table

    def make_config(self):
        return ErrorCompensationConfig(table=self.table_path)

    def test_state_resets_between_generations(self, loaded):
        # the shared version also generates with steps + 3, which the table (8 steps) must refuse
        with diffspeed.apply(loaded.transformer, self.make_config()):
            first = self.run(loaded)
            assert torch.equal(first, self.run(loaded)), "state leaked from one generation into the next"
            with pytest.raises(DiffspeedError, match=f"calibrated for {self.steps} steps, this run has {self.steps + 3}"):
                self.run(loaded, steps=self.steps + 3)
            assert torch.equal(self.run(loaded), first)

    def test_separate_cfg_equals_batched(self, loaded):
        # the affine commutes with CFG: correcting each branch = correcting the guided velocity
        with diffspeed.apply(loaded.transformer, self.make_config()):
            batched = self.run(loaded, cfg_mode="batched")
            separate = self.run(loaded, cfg_mode="separate")
        assert torch.allclose(batched, separate, atol=1e-5)
