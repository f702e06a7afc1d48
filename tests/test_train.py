import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prunestudy import train
from prunestudy.models import SeedCNN


def test_normalize_maps_uint8_to_minus_one_one():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8)
    assert torch.allclose(train.normalize(x), torch.tensor([-1.0, 1.0, 128 / 255 * 2 - 1]), atol=1e-6)


def test_augment_flips_about_half_and_rotates_within_ten_degrees():
    g = torch.Generator().manual_seed(0)
    n = 400
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[..., :, :8] = 255  # a bright band on the left
    out = train.augment(x, g)
    assert out.shape == x.shape and out.dtype == torch.float32
    left = out[..., 12:20, :8].mean(dim=(1, 2, 3))
    flipped = (left < 0).float().mean().item()
    assert 0.4 < flipped < 0.6
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6


def test_augment_rotation_angle_is_bounded():
    """A single bright pixel at radius r moves along an arc of at most r*10 degrees."""
    g = torch.Generator().manual_seed(1)
    n, s = 300, 64
    x = torch.zeros(n, 3, s, s, dtype=torch.uint8)
    x[:, :, s // 2 - 1 : s // 2 + 1, s - 8 : s - 6] = 255  # right of centre, radius ~ 25 px
    out = train.augment(x, g)[:, 0]
    ys, xs = [], []
    for img in out:
        w = (img + 1).clamp(min=0)
        idx = torch.nonzero(w > 0.2)
        ys.append(idx[:, 0].float().mean() - (s - 1) / 2)
        xs.append(idx[:, 1].float().mean() - (s - 1) / 2)
    angles = torch.rad2deg(torch.atan2(torch.stack(ys), torch.stack(xs).abs()))
    assert angles.abs().max() < 11.5
    assert angles.abs().max() > 7  # the full range is used
    assert angles.std() > 3


def test_evaluate_reports_true_per_sample_mean_loss():
    torch.manual_seed(0)
    m = SeedCNN()
    x = torch.randint(0, 256, (70, 3, 64, 64), dtype=torch.uint8)
    y = torch.randint(0, 10, (70,))
    ev = train.evaluate(m, x, y, batch_size=32)
    m.eval()
    with torch.no_grad():
        logits = m(train.normalize(x))
    assert ev["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert ev["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert ev["n"] == 70 and len(ev["predictions"]) == 70
    # about ln(10) for an untrained net, not a batch-mean divided by the batch size
    assert 1.5 < ev["loss"] < 3.5


def test_fit_learns_and_records_every_step():
    g = torch.Generator().manual_seed(0)
    # two separable classes: dark vs bright images
    y = torch.randint(0, 2, (96,), generator=g)
    x = (y[:, None, None, None] * 200 + torch.randint(0, 40, (96, 3, 64, 64), generator=g)).to(torch.uint8)
    torch.manual_seed(0)
    m = SeedCNN(num_classes=2)
    h = train.fit(m, (x, y), (x, y), epochs=3, batch_size=32, lr=1e-3, seed=0, log=lambda s: None)
    assert len(h["steps"]) == 3 * 3 and len(h["epochs"]) == 3
    e = h["epochs"][-1]
    assert e["step_loss_min"] <= e["train_loss"] <= e["step_loss_max"]
    assert e["step_loss_first"] == h["steps"][6] and e["step_loss_last"] == h["steps"][8]
    assert e["test_accuracy"] > 0.9


def test_fit_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 64, 64), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        m = SeedCNN()
        runs.append(train.fit(m, (x, y), (x, y), epochs=1, batch_size=16, lr=1e-3, seed=3, log=lambda s: None)["steps"])
    assert runs[0] == runs[1]


def test_select_device():
    assert train.select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert train.select_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            train.select_device("cuda")
