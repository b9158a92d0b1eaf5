"""Reference models and judges: loading, conditioning, weight-file errors, Frechet distance, and
(once shipped) the quality of the trained weights."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffspeed.errors import DiffspeedError, WeightFileError
from diffspeed.models import reference
from diffspeed.models.judge import (
    JUDGE_NAMES,
    build_judge_net,
    frechet_distance,
    judge_accuracy,
    judge_config,
    load_judge,
    save_judge,
)
from diffspeed.models.reference import REFERENCE_NAMES, load_reference

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1)
TINY_WAN = dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=1, rope_max_seq_len=32)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A weights root with random-weight tiny reference models and tiny judges in shipped format."""
    from diffspeed.train.image import save_transformer
    from diffspeed.train.video import ClassConditionedVideo, save_video_model

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_transformer(reference.build_image_model(**TINY_DIT), root / "reference-image")
    video = ClassConditionedVideo(reference.build_video_model(**TINY_WAN), 8, 2, reference.VIDEO_TEXT_DIM)
    save_video_model(video, root / "reference-video")
    for kind in ("image", "video"):
        cfg = judge_config(kind, channels=[4, 4, 8, 8])
        save_judge(build_judge_net(cfg), cfg, root / f"judge-{kind}")
    return root


def test_names():
    assert REFERENCE_NAMES == ["reference-image", "reference-video"]
    assert reference.reference_names() == REFERENCE_NAMES
    with pytest.raises(DiffspeedError, match="reference-image"):
        load_reference("reference-audio")


def test_missing_weights_say_how_to_train(tmp_path):
    with pytest.raises(WeightFileError, match="not trained/shipped yet.*train image"):
        load_reference("reference-image", weights_dir=tmp_path)
    (tmp_path / "reference-video").mkdir()
    with pytest.raises(WeightFileError, match="config.json is missing"):
        load_reference("reference-video", weights_dir=tmp_path)
    with pytest.raises(WeightFileError, match="not trained"):
        load_judge("judge-image", weights_dir=tmp_path)


def test_load_image_model_and_conditions(tiny_weights):
    from diffspeed.sampler import generate

    loaded = load_reference("reference-image", weights_dir=tiny_weights)
    assert loaded.latent_shape == (3, 32, 32) and not loaded.is_video
    assert loaded.judge == "judge-image" and loaded.num_classes == 12
    assert next(loaded.transformer.parameters()).dtype == torch.float32  # upcast from fp16 files
    cond = loaded.make_condition([0, "blue-cross", 5], torch.device("cpu"))
    assert cond.cond["class_labels"].tolist() == [0, 11, 5]
    assert cond.uncond["class_labels"].tolist() == [12, 12, 12]
    for bad in (12, -1, "purple-circle", 1.5):
        with pytest.raises(DiffspeedError, match="valid labels"):
            loaded.make_condition([bad], torch.device("cpu"))
    pix = generate(loaded, [0, "green-square"], [1, 2], num_steps=2, guidance_scale=3.0)
    assert pix.shape == (2, 3, 32, 32) and torch.isfinite(pix).all()
    assert pix.min() >= 0 and pix.max() <= 1
    half = load_reference("reference-image", weights_dir=tiny_weights, dtype=torch.bfloat16)
    assert next(half.transformer.parameters()).dtype == torch.bfloat16


def test_load_video_model_and_conditions(tiny_weights):
    from diffspeed.sampler import generate

    loaded = load_reference("reference-video", weights_dir=tiny_weights)
    assert loaded.latent_shape == (3, 16, 32, 32) and loaded.is_video
    assert loaded.judge == "judge-video" and loaded.class_names[0] == "square-right"
    cond = loaded.make_condition(["triangle-down", 1], torch.device("cpu"))
    table = loaded.extras["class_embeddings"]
    assert torch.equal(cond.cond["encoder_hidden_states"][0], table[7])
    assert torch.equal(cond.uncond["encoder_hidden_states"][1], table[-1])
    with pytest.raises(DiffspeedError, match="valid labels"):
        loaded.make_condition([8], torch.device("cpu"))
    pix = generate(loaded, [0, 5], [1, 2], num_steps=1, guidance_scale=2.0)
    assert pix.shape == (2, 3, 16, 32, 32) and torch.isfinite(pix).all()


def _copy(root: Path, name: str, dst: Path) -> Path:
    shutil.copytree(root / name, dst / name)
    return dst / name


def test_truncated_weights(tiny_weights, tmp_path):
    folder = _copy(tiny_weights, "reference-image", tmp_path)
    path = folder / reference.MODEL_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="diffusion_pytorch_model.safetensors"):
        load_reference("reference-image", weights_dir=tmp_path)
    path.write_bytes(b"")
    with pytest.raises(WeightFileError, match="diffusion_pytorch_model.safetensors"):
        load_reference("reference-image", weights_dir=tmp_path)


def test_wrong_shapes(tiny_weights, tmp_path):
    from diffspeed.train.image import save_transformer

    folder = _copy(tiny_weights, "reference-image", tmp_path)
    other = tmp_path / "other"
    save_transformer(reference.build_image_model(num_attention_heads=2, attention_head_dim=8, num_layers=1), other)
    shutil.copy(other / reference.MODEL_FILE, folder / reference.MODEL_FILE)
    with pytest.raises(WeightFileError, match=r"diffusion_pytorch_model.safetensors.*shape"):
        load_reference("reference-image", weights_dir=tmp_path)
    # a config that is not JSON
    (folder / "config.json").write_text("{not json")
    with pytest.raises(WeightFileError, match="config.json"):
        load_reference("reference-image", weights_dir=tmp_path)


def test_video_class_table_errors(tiny_weights, tmp_path):
    from safetensors.torch import save_file

    folder = _copy(tiny_weights, "reference-video", tmp_path)
    save_file({"class_embeddings": torch.zeros(5, 2, 64)}, str(folder / reference.CLASS_EMBEDDINGS_FILE))
    with pytest.raises(WeightFileError, match="class_embeddings.safetensors"):
        load_reference("reference-video", weights_dir=tmp_path)
    (folder / reference.CLASS_EMBEDDINGS_FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(WeightFileError, match="class_embeddings.safetensors"):
        load_reference("reference-video", weights_dir=tmp_path)
    (folder / reference.CLASS_EMBEDDINGS_FILE).unlink()
    with pytest.raises(WeightFileError, match="class_embeddings.safetensors is missing"):
        load_reference("reference-video", weights_dir=tmp_path)


def test_judge_api_and_errors(tiny_weights, tmp_path):
    judge = load_judge("judge-image", weights_dir=tiny_weights)
    x = torch.rand(5, 3, 32, 32)
    assert judge.predict(x).shape == (5,) and judge.predict(x).dtype == torch.long
    assert judge.features(x).shape == (5, 16)
    acc = judge_accuracy(judge, x, judge.predict(x).tolist())
    assert acc == 1.0
    with pytest.raises(DiffspeedError, match="shape"):
        judge.predict(torch.rand(2, 3, 16, 16))
    vjudge = load_judge("judge-video", weights_dir=tiny_weights)
    assert vjudge.features(torch.rand(2, 3, 16, 32, 32)).shape == (2, 16)
    with pytest.raises(DiffspeedError, match="unknown judge"):
        load_judge("judge-audio")
    folder = _copy(tiny_weights, "judge-image", tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(WeightFileError, match="model.safetensors"):
        load_judge("judge-image", weights_dir=tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    save_judge(build_judge_net(dict(cfg, channels=[4, 4, 8, 16])), cfg, folder)  # weights no longer match config
    with pytest.raises(WeightFileError, match="model.safetensors"):
        load_judge("judge-image", weights_dir=tmp_path)


def test_frechet_distance():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=gen)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # two Gaussians with diagonal covariances: |mu|^2 + sum (sqrt(va) - sqrt(vb))^2
    scale = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    b = torch.randn(4000, 6, generator=gen) * scale + 1.0
    expected = 6 * 1.0 + float(((1 - scale) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    # rank-deficient covariance (fewer samples than dims) stays finite and non-negative
    assert frechet_distance(torch.randn(3, 10), torch.randn(4, 10)) >= 0
    with pytest.raises(DiffspeedError):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))


# ---- the shipped, trained weights (skipped until they are shipped) ------------------------------

def _require_shipped(*names: str) -> None:
    missing = [n for n in names if not (reference.WEIGHTS_DIR / n).is_dir()]
    if missing:
        pytest.skip(f"trained weights not shipped yet ({', '.join(missing)} not in {reference.WEIGHTS_DIR}); "
                    "run scripts/train_reference_gpu.sh and unpack the tars there")


def test_shipped_weights_size_budget():
    _require_shipped("reference-image")
    total = sum(f.stat().st_size for f in reference.WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, f"shipped weights take {total / 2**20:.1f} MiB > 30 MiB"


@pytest.mark.parametrize("judge_name", JUDGE_NAMES)
def test_shipped_judges_accurate_on_real_data(judge_name):
    _require_shipped(judge_name)
    from diffspeed.data import get_dataset_module

    judge = load_judge(judge_name)
    assert judge.config.get("heldout_accuracy", 0) >= 0.98
    data = get_dataset_module(judge.config["kind"])
    x, labels = data.make_dataset(48 if judge.config["kind"] == "image" else 16)
    assert judge_accuracy(judge, (x + 1) / 2, labels) >= 0.9


def test_shipped_image_model_generates_its_classes():
    _require_shipped("reference-image", "judge-image")
    from diffspeed.sampler import generate

    loaded = load_reference("reference-image")
    judge = load_judge("judge-image")
    labels = [0, 3, 6, 9, 1, 5, 8, 10]
    pix = generate(loaded, labels, list(range(100, 108)), num_steps=10, guidance_scale=4.0)
    correct = int((judge.predict(pix) == torch.tensor(labels)).sum())
    assert correct >= 6, f"only {correct}/8 samples judged as their class"


def test_shipped_video_model_generates_its_classes():
    _require_shipped("reference-video", "judge-video")
    from diffspeed.sampler import generate

    loaded = load_reference("reference-video")
    judge = load_judge("judge-video")
    labels = list(range(8))
    pix = generate(loaded, labels, list(range(200, 208)), num_steps=10, guidance_scale=4.0)
    correct = int((judge.predict(pix) == torch.tensor(labels)).sum())
    # The shipped video model reaches 87.9% judge accuracy on 256 clips at 25 steps (issue 3's bar: 80%,
    # benchmarks/results/reference_models.json); these 8 clips at 10 steps on CPU give 7/8.
    assert correct >= 6, f"only {correct}/8 clips judged as their class"
    assert (pix[:, :, 1:] - pix[:, :, :-1]).abs().mean() > 0.003, "generated clips do not move"
