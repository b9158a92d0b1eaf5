"""Procedural data sets: determinism, balance, shapes/ranges and class semantics."""

import pytest
import torch

from diffspeed.data import clips, get_dataset_module, shapes


def _saturation(x01: torch.Tensor) -> torch.Tensor:
    return x01.max(dim=1).values - x01.min(dim=1).values


def test_class_names():
    assert len(shapes.CLASS_NAMES) == shapes.NUM_CLASSES == 12
    assert len(set(shapes.CLASS_NAMES)) == 12
    assert len(clips.CLASS_NAMES) == clips.NUM_CLASSES == 8
    assert len(set(clips.CLASS_NAMES)) == 8
    assert shapes.CLASS_NAMES[0] == "red-circle" and clips.CLASS_NAMES[0] == "square-right"
    assert get_dataset_module("image") is shapes and get_dataset_module("video") is clips
    with pytest.raises(ValueError):
        get_dataset_module("audio")


@pytest.mark.parametrize("mod,shape", [(shapes, (3, 32, 32)), (clips, (3, 16, 32, 32))])
def test_batches_deterministic_and_in_range(mod, shape):
    a, la = mod.sample_batch(6, seed=123)
    b, lb = mod.sample_batch(6, seed=123)
    c, _ = mod.sample_batch(6, seed=124)
    assert a.shape == (6, *shape) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert a.std() > 0.1  # not blank
    stream = mod.batch_stream(6, seed=5)
    first, second = next(stream), next(stream)
    assert torch.equal(first[0], mod.sample_batch(6, mod.stream_seed(5, 0))[0])
    assert not torch.equal(first[0], second[0])


@pytest.mark.parametrize("mod,n", [(shapes, 48), (clips, 16)])
def test_heldout_balanced_and_fixed(mod, n):
    x, labels = mod.make_dataset(n)
    x2, labels2 = mod.make_dataset(n)
    assert torch.equal(x, x2) and torch.equal(labels, labels2)
    counts = torch.bincount(labels, minlength=mod.NUM_CLASSES)
    assert counts.min() == counts.max() == n // mod.NUM_CLASSES
    # the held-out seed range never meets a training stream
    assert shapes.heldout_seed(shapes.HELDOUT_SEED, 0) > shapes.stream_seed(10**6, 10**6)


def test_training_stream_class_balance():
    _, labels = shapes.sample_batch(4800, seed=0)
    freq = torch.bincount(labels, minlength=12).float() / 4800
    assert (freq - 1 / 12).abs().max() < 0.03


def test_bad_labels_rejected():
    gen = shapes.make_generator(0, "cpu")
    with pytest.raises(ValueError):
        shapes.render_images(torch.tensor([12]), gen)
    with pytest.raises(ValueError):
        clips.render_clips(torch.tensor([-1]), gen)


def test_image_colour_matches_class():
    labels = torch.arange(12).repeat(4)
    x = shapes.render_images(labels, shapes.make_generator(1, "cpu"))
    x01 = (x + 1) / 2
    mask = _saturation(x01) > 0.45  # the shape: saturated; backgrounds are muted
    for i, label in enumerate(labels.tolist()):
        colour = shapes.COLOURS[label % 3]
        fg = x01[i][:, mask[i]]
        assert fg.shape[1] > 20, f"sample {i} has no visible shape"
        assert fg.mean(dim=1).argmax().item() == ("red", "green", "blue").index(colour)


def test_clip_motion_matches_class():
    labels = torch.arange(8).repeat(2)
    x = clips.render_clips(labels, shapes.make_generator(2, "cpu"))
    x01 = (x + 1) / 2  # (B, 3, F, H, W)
    mask = (_saturation(x01) > 0.4).float()  # (B, F, H, W)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    area = mask.sum(dim=(2, 3)).clamp(min=1)
    cx = (mask * xs).sum(dim=(2, 3)) / area
    cy = (mask * ys).sum(dim=(2, 3)) / area
    for i, label in enumerate(labels.tolist()):
        motion = clips.MOTIONS[label % 4]
        dx = (cx[i, -1] - cx[i, 0]).item()
        dy = (cy[i, -1] - cy[i, 0]).item()
        want = {"right": (dx > 6), "left": (dx < -6), "up": (dy < -6), "down": (dy > 6)}[motion]
        assert want, f"clip {i} ({clips.CLASS_NAMES[label]}) moved by ({dx:.1f}, {dy:.1f})"


def test_clip_sample_batch_matches_render_clips():
    """sample_batch skips the (syncing) label check but must render exactly what render_clips does."""
    import torch

    from diffspeed.data import clips, shapes

    x, labels = clips.sample_batch(4, 123, "cpu")
    gen = shapes.make_generator(123, "cpu")
    ref_labels = torch.randint(0, clips.NUM_CLASSES, (4,), generator=gen)
    assert torch.equal(labels, ref_labels)
    assert torch.equal(x, clips.render_clips(ref_labels, gen))


# Per-sample, per-channel means of sample_batch(5, seed=7), recorded from the generators the shipped
# reference models and judges were trained with. Any real change to the rendering (a reordered random
# draw, another shape or colour) moves these far beyond the tolerance; last-bit float differences
# between CPUs do not.
PINNED_BATCHES = {
    "shapes": ([3, 4, 1, 2, 7], [[-0.089907, -0.488561, -0.480326], [-0.233795, -0.004653, -0.179231],
                                 [-0.110531, 0.050761, -0.009022], [-0.185817, -0.051069, 0.184986],
                                 [0.147332, 0.268345, 0.10313]]),
    "clips": ([7, 4, 1, 6, 3], [[-0.107874, -0.337807, -0.361638], [-0.196089, -0.228462, -0.051236],
                                [0.084026, -0.063275, 0.203013], [0.031758, -0.025841, -0.057706],
                                [0.277565, 0.231754, 0.136081]]),
}


@pytest.mark.parametrize("mod", [shapes, clips], ids=["shapes", "clips"])
def test_generated_batch_matches_the_pinned_one(mod):
    x, labels = mod.sample_batch(5, seed=7)
    want_labels, want_means = PINNED_BATCHES[mod.__name__.rsplit(".", 1)[-1]]
    assert labels.tolist() == want_labels
    means = x.double().mean(dim=tuple(range(2, x.dim())))
    torch.testing.assert_close(means, torch.tensor(want_means, dtype=torch.float64), atol=2e-6, rtol=0)
