"""The random-weight zoo and load_model's name / path / hub resolution."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
import torch
from torch import nn

from diffspeed.errors import DiffspeedError, UnsupportedModelError
from diffspeed.models.bundle import LoadedModel
from diffspeed.models.loading import load_model
from diffspeed.models.zoo import ZOO, build_model, latents_to_pixels, rerandomize_zero_params_, zoo_names
from diffspeed.sampler import generate

CPU = torch.device("cpu")
TINY = [n for n in zoo_names() if n.startswith("tiny-")]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add OpenMP barrier waits on a busy CPU
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # no test may touch the network, nor hang on it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_zoo_names():
    names = zoo_names()
    assert set(TINY) == {"tiny-dit", "tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-wan", "tiny-cogvideox"}
    assert "dit-xl-2" in names and "wan-1.3b" in names


@pytest.mark.parametrize("name", TINY)
def test_load_tiny_zoo_models(name):
    lm = load_model(name)
    assert isinstance(lm, LoadedModel) and lm.name == name
    assert lm.latent_shape == ZOO[name].latent_shape
    assert lm.is_video == (len(lm.latent_shape) == 4)
    cond = lm.make_condition([0, 1], CPU)
    x = torch.randn(2, *lm.latent_shape)
    with torch.no_grad():
        out = lm.adapter.predict(lm.transformer, x, torch.full((2,), 400.0), cond.cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_generate_gives_pixels():
    lm = load_model("tiny-wan")
    pix = generate(lm, [0, 1], [5, 6], num_steps=2, guidance_scale=3.0)
    assert pix.shape == (2, 3, *lm.latent_shape[1:])
    assert pix.min() >= 0 and pix.max() <= 1


@pytest.mark.parametrize("name,low,high", [("dit-xl-2", 6.7e8, 7.6e8), ("wan-1.3b", 1.3e9, 1.5e9)])
def test_real_size_models_on_meta(name, low, high):
    # nothing is allocated: parameters live on the meta device
    lm = load_model(name, device="meta", dtype=torch.bfloat16)
    params = list(lm.transformer.parameters())
    assert all(p.device.type == "meta" for p in params)
    count = sum(p.numel() for p in params)
    # diffusers' DiT-XL/2 is ~750M: the original 675M plus a per-block copy of the t/class embedders
    assert low < count < high, count
    blocks = lm.adapter.blocks(lm.transformer)
    cfg = lm.transformer.config
    if name == "dit-xl-2":
        assert len(blocks) == 28 and cfg.num_attention_heads == 16 and cfg.attention_head_dim == 72
        assert lm.latent_shape == (4, 32, 32) and lm.num_classes == 1000
        assert lm.make_condition([3], CPU).uncond["class_labels"].tolist() == [1000]
    else:
        assert len(blocks) == 30 and cfg.num_attention_heads == 12 and cfg.ffn_dim == 8960
        assert lm.latent_shape == (16, 21, 60, 104) and lm.is_video
        assert {p.dtype for n, p in lm.transformer.named_parameters() if "blocks.0.attn1.to_q" in n} == {torch.bfloat16}


def test_build_is_seeded_and_rng_neutral():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("tiny-sd3", seed=0).transformer.state_dict()
    after = torch.rand(1)
    assert torch.equal(before, after)  # the caller's RNG stream is untouched
    b = build_model("tiny-sd3", seed=0).transformer.state_dict()
    c = build_model("tiny-sd3", seed=1).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_build_in_bfloat16_keeps_fp32_modules():
    lm = build_model("tiny-wan", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in lm.transformer.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["scale_shift_table"] == torch.float32  # _keep_in_fp32_modules, as from_pretrained
    out = generate(lm, [0], [0], num_steps=2, guidance_scale=2.0)
    assert torch.isfinite(out).all()


def test_rerandomize_zero_params():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    nn.init.zeros_(net[0].weight)
    kept = net[0].bias.detach().clone()
    changed = rerandomize_zero_params_(net, seed=7)
    assert changed == ["0.weight", "1.bias"]
    assert (net[0].weight != 0).all() and torch.equal(net[0].bias, kept)
    assert torch.equal(net[1].weight, torch.ones(4))  # non-zero parameters are left alone
    other = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    nn.init.zeros_(other[0].weight)
    rerandomize_zero_params_(other, seed=7)
    assert torch.equal(other[0].weight, net[0].weight)


def test_text_condition_is_per_label_and_batch_independent():
    lm = build_model("tiny-flux")
    a = lm.make_condition([3, 4], CPU)
    b = lm.make_condition([4], CPU)
    assert set(a.cond) == {"encoder_hidden_states", "pooled_projections"}
    assert a.cond["encoder_hidden_states"].shape == (2, 8, 24)
    assert torch.equal(a.cond["encoder_hidden_states"][1], b.cond["encoder_hidden_states"][0])
    assert not torch.equal(a.cond["encoder_hidden_states"][0], a.cond["encoder_hidden_states"][1])
    assert all((v == 0).all() for v in a.uncond.values())


def test_dit_condition_and_label_range():
    lm = build_model("tiny-dit")
    cond = lm.make_condition([0, 9], CPU)
    assert cond.cond["class_labels"].tolist() == [0, 9]
    assert cond.uncond["class_labels"].tolist() == [10, 10]
    assert lm.num_classes == 10
    with pytest.raises(DiffspeedError, match="class labels"):
        lm.make_condition([10], CPU)


def test_to_pixels():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5).repeat(2, 4, 1, 1)
    pix = latents_to_pixels(x)
    assert pix.shape == (2, 3, 1, 5)
    assert torch.equal(pix[0, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    single = latents_to_pixels(torch.zeros(1, 1, 2, 3, 3))
    assert single.shape == (1, 3, 2, 3, 3) and (single == 0.5).all()


def test_unknown_name_lists_known_names():
    with pytest.raises(DiffspeedError, match="tiny-dit") as info:
        load_model("no-such-model")
    message = str(info.value)
    assert "\n" not in message and "no-such-model" in message and "wan-1.3b" in message


def test_missing_path_and_hub_id_fail_fast(tmp_path):
    with pytest.raises(DiffspeedError, match="no such model directory"):
        load_model(tmp_path / "missing" / "model")
    start = time.monotonic()
    with pytest.raises(DiffspeedError, match="diffspeed-no-such-org/no-such-model.*locally or on the Hugging Face hub"):
        load_model("diffspeed-no-such-org/no-such-model")
    assert time.monotonic() - start < 10


def _predict(lm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *lm.latent_shape, generator=gen)
    cond = lm.make_condition([1, 2], CPU)
    with torch.no_grad():
        return lm.adapter.predict(lm.transformer, x, torch.tensor([900.0, 100.0]), cond.cond)


def test_local_directory_roundtrip(tmp_path):
    lm = build_model("tiny-dit", seed=4)
    lm.transformer.save_pretrained(tmp_path / "dit")
    again = load_model(tmp_path / "dit")
    assert type(again.transformer) is type(lm.transformer)
    assert again.latent_shape == lm.latent_shape and again.num_classes == 10
    assert torch.equal(_predict(again), _predict(lm))  # bit-identical


def test_pipeline_directory_with_transformer_subfolder(tmp_path):
    lm = build_model("tiny-wan", seed=2)
    lm.transformer.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    again = load_model(str(tmp_path / "pipe"))
    assert type(again.transformer).__name__ == "WanTransformer3DModel"
    # Wan's config carries no frame count: the adapter default is the real 81-frame 480p shape
    assert again.latent_shape == (4, 21, 60, 104) and again.is_video
    # dummy conditioning: seeded per label, so the same label gives the same condition in any batch
    a = again.make_condition([5, 6], CPU).cond["encoder_hidden_states"]
    b = again.make_condition([6], CPU).cond["encoder_hidden_states"]
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    x = torch.randn(1, 4, 3, 8, 8)
    with torch.no_grad():
        out_a = again.adapter.predict(again.transformer, x, torch.full((1,), 500.0), {"encoder_hidden_states": b})
        out_b = lm.adapter.predict(lm.transformer, x, torch.full((1,), 500.0), {"encoder_hidden_states": b})
    assert torch.equal(out_a, out_b)


def test_local_directory_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffspeedError, match="config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UnsupportedModelError, match="UNet2DModel"):
        load_model(tmp_path / "unet")


def test_reference_names_are_delegated(monkeypatch):
    calls = []
    fake = types.ModuleType("diffspeed.models.reference")

    def load_reference(name, *, device="cpu", dtype=torch.float32):
        calls.append((name, device, dtype))
        return "sentinel"

    fake.load_reference = load_reference
    monkeypatch.setitem(sys.modules, "diffspeed.models.reference", fake)
    assert load_model("reference-dit", device="cpu", dtype=torch.float16) == "sentinel"
    assert calls == [("reference-dit", "cpu", torch.float16)]
