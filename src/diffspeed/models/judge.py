"""Judge classifiers for the reference data sets, and the Frechet judge distance.

A judge is a small plain-torch classifier trained on the procedural data of
:mod:`diffspeed.data` (``diffspeed train judge``): ``judge-image`` a 2D CNN on (3, 32, 32)
images, ``judge-video`` a 3D CNN on (3, 16, 32, 32) clips (its spatio-temporal kernels see the
motion, which the video classes need). Both take pixels in [0, 1].

* :func:`load_judge` -> :class:`Judge` with ``predict`` (class ids), ``logits`` and ``features``
  (the globally average- and max-pooled last conv activations, (B, D), D = 256).
* :func:`judge_accuracy`: fraction of samples the judge assigns to their intended class.
* :func:`frechet_distance`: Frechet distance between Gaussian fits of two feature sets (the
  "Frechet judge distance"; it is computed on *these* judges' features, so it is not an FID and
  its scale is only comparable between runs of the same judge).

Files: ``weights/judge-<kind>/config.json`` + ``model.safetensors`` (fp16, upcast on load).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import DiffspeedError, WeightFileError

JUDGE_NAMES = ["judge-image", "judge-video"]
JUDGE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

DEFAULT_IMAGE_CHANNELS = (32, 64, 128, 128)
DEFAULT_VIDEO_CHANNELS = (32, 64, 96, 128)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ImageJudgeNet(nn.Module):
    """2D CNN: conv blocks with GroupNorm + SiLU, three stride-2 stages, global average + max pool
    (max pooling makes shape detection learn several times faster than average pooling alone)."""

    def __init__(self, num_classes: int, channels: Sequence[int] = DEFAULT_IMAGE_CHANNELS, in_channels: int = 3):
        super().__init__()
        c0, c1, c2, c3 = channels

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), _gn(cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(in_channels, c0, 1),
            *block(c0, c1, 2),  # 16x16
            *block(c1, c1, 1),
            *block(c1, c2, 2),  # 8x8
            *block(c2, c2, 1),
            *block(c2, c3, 2),  # 4x4
        )
        self.head = nn.Linear(2 * c3, num_classes)
        self.feature_dim = 2 * c3

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class VideoJudgeNet(nn.Module):
    """3D CNN on (B, 3, F, H, W): 3x3x3 conv blocks (GroupNorm + SiLU), global average + max pool."""

    def __init__(self, num_classes: int, channels: Sequence[int] = DEFAULT_VIDEO_CHANNELS, in_channels: int = 3):
        super().__init__()
        c0, c1, c2, c3 = channels

        def block(cin: int, cout: int, stride: tuple[int, int, int]) -> list[nn.Module]:
            return [nn.Conv3d(cin, cout, 3, stride, 1), _gn(cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(in_channels, c0, (1, 1, 1)),
            *block(c0, c1, (1, 2, 2)),  # 16 x 16 x 16
            *block(c1, c2, (2, 2, 2)),  # 8 x 8 x 8
            *block(c2, c3, (2, 2, 2)),  # 4 x 4 x 4
        )
        self.head = nn.Linear(2 * c3, num_classes)
        self.feature_dim = 2 * c3

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_judge_net(config: dict[str, Any]) -> nn.Module:
    kind = config.get("kind")
    cls = {"image": ImageJudgeNet, "video": VideoJudgeNet}.get(kind)
    if cls is None:
        raise DiffspeedError(f"judge config kind must be 'image' or 'video', got {kind!r}")
    return cls(int(config["num_classes"]), tuple(config["channels"]))


def judge_config(kind: str, **extra: Any) -> dict[str, Any]:
    """Default config of the ``kind`` judge (class names from :mod:`diffspeed.data`)."""
    from ..data import clips, shapes

    if kind == "image":
        cfg = {"kind": "image", "num_classes": shapes.NUM_CLASSES, "class_names": list(shapes.CLASS_NAMES),
               "channels": list(DEFAULT_IMAGE_CHANNELS), "input_shape": [3, 32, 32]}
    elif kind == "video":
        cfg = {"kind": "video", "num_classes": clips.NUM_CLASSES, "class_names": list(clips.CLASS_NAMES),
               "channels": list(DEFAULT_VIDEO_CHANNELS), "input_shape": [3, 16, 32, 32]}
    else:
        raise DiffspeedError(f"judge kind must be 'image' or 'video', got {kind!r}")
    cfg["input_range"] = "pixels in [0, 1]"
    cfg.update(extra)
    return cfg


@dataclass
class Judge:
    """A loaded judge classifier; every method takes pixels in [0, 1] of any float dtype/device."""

    name: str
    net: nn.Module
    config: dict[str, Any]
    batch_size: int = 256

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def class_names(self) -> list[str]:
        return list(self.config.get("class_names", []))

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def _check(self, pixels: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixels, torch.Tensor):
            raise DiffspeedError(f"{self.name}: pixels must be a tensor, got {type(pixels).__name__}")
        want = tuple(self.config["input_shape"])
        if pixels.dim() != len(want) + 1 or tuple(pixels.shape[1:]) != want:
            raise DiffspeedError(f"{self.name}: expected pixels of shape (B, {', '.join(map(str, want))}), "
                                 f"got {tuple(pixels.shape)}")
        return pixels

    @torch.no_grad()
    def _run(self, pixels: torch.Tensor, what: str) -> torch.Tensor:
        pixels = self._check(pixels)
        outs = []
        was_training = self.net.training
        self.net.eval()
        try:
            for start in range(0, pixels.shape[0], self.batch_size):
                x = pixels[start:start + self.batch_size].to(self.device, torch.float32) * 2 - 1
                out = self.net.features(x) if what == "features" else self.net(x)
                outs.append(out.float())
        finally:
            self.net.train(was_training)
        if not outs:
            dim = self.net.feature_dim if what == "features" else self.num_classes
            return torch.empty(0, dim, device=self.device)
        return torch.cat(outs)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(pixels, "logits")

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled penultimate features, float32, on the judge's device."""
        return self._run(pixels, "features")

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,) predicted class ids (long, on CPU)."""
        return self.logits(pixels).argmax(dim=1).cpu()


def judge_folder(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    if name not in JUDGE_NAMES:
        raise DiffspeedError(f"unknown judge {name!r}; choose one of: {', '.join(JUDGE_NAMES)}")
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not (root / name).is_dir() and (root / CONFIG_FILE).is_file() and (root / JUDGE_FILE).is_file():
        return root
    return root / name


def save_judge(net: nn.Module, config: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (fp16) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / JUDGE_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_judge(name: str, *, device: str | torch.device = "cpu",
               weights_dir: str | os.PathLike | None = None) -> Judge:
    """Load a shipped judge (``judge-image`` or ``judge-video``); WeightFileError names a bad file."""
    from safetensors.torch import load_file

    folder = judge_folder(name, weights_dir)
    config_path, weights_path = folder / CONFIG_FILE, folder / JUDGE_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise WeightFileError(
                f"judge {name!r} is not trained/shipped yet: {path} is missing. Train it with "
                f"`diffspeed train judge --kind {name.split('-')[-1]}`"
            )
    try:
        config = json.loads(config_path.read_text())
        net = build_judge_net(config)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WeightFileError(f"judge config {config_path} is unreadable or invalid ({exc})") from exc
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001
        raise WeightFileError(f"weight file {weights_path} is corrupted or truncated ({type(exc).__name__}: {exc})") from exc
    expected = net.state_dict()
    if set(state) != set(expected):
        raise WeightFileError(f"weight file {weights_path} does not match {config_path} "
                              f"(missing {sorted(set(expected) - set(state))[:3]}, unexpected {sorted(set(state) - set(expected))[:3]})")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise WeightFileError(f"weight file {weights_path}: tensor {key!r} has shape {list(state[key].shape)}, "
                                  f"the config needs {list(value.shape)}")
    net.load_state_dict({k: v.float() for k, v in state.items()})
    net.to(device).eval()
    return Judge(name=name, net=net, config=config)


def judge_accuracy(judge: Judge, pixels: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Fraction of ``pixels`` (in [0, 1]) the judge assigns to ``labels``."""
    labels_t = torch.as_tensor(labels if not isinstance(labels, torch.Tensor) else labels.cpu(), dtype=torch.long).cpu()
    if labels_t.numel() != pixels.shape[0]:
        raise DiffspeedError(f"got {labels_t.numel()} labels for {pixels.shape[0]} samples")
    if labels_t.numel() == 0:
        raise DiffspeedError("judge_accuracy needs at least one sample")
    return float((judge.predict(pixels) == labels_t).float().mean())


def per_class_accuracy(judge: Judge, pixels: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> dict[str, float]:
    labels_t = torch.as_tensor(labels if not isinstance(labels, torch.Tensor) else labels.cpu(), dtype=torch.long).cpu()
    pred = judge.predict(pixels)
    out = {}
    names = judge.class_names or [str(i) for i in range(judge.num_classes)]
    for c, cname in enumerate(names):
        mask = labels_t == c
        if mask.any():
            out[cname] = float((pred[mask] == c).float().mean())
    return out


def _sqrtm_psd(mat: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(mat)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of two (N, D) feature sets (the "Frechet judge distance").

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` in float64, with symmetric
    matrix square roots by eigendecomposition (no complex parts, no scipy).
    """
    a = torch.as_tensor(feats_a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(feats_b).detach().to("cpu", torch.float64)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise DiffspeedError(f"frechet_distance needs two (N, D) feature sets of the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise DiffspeedError("frechet_distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = torch.cov(a.T).reshape(a.shape[1], a.shape[1])
    cov_b = torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    cov_a = (cov_a + cov_a.T) / 2
    cov_b = (cov_b + cov_b.T) / 2
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2
    tr_cross = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_cross
    return float(value.clamp(min=0))
