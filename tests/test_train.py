import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunestudy import train
from prunestudy.models import SeedCNN

TIMING = ("seconds", "images_per_s")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads that wait for each other
    make tiny steps ~100x slower; results are deterministic either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tiny(nn.Module):
    """A small CNN for 16x16 inputs, with batch norm (buffers, a 0-dim counter among them) and
    dropout (so the RNG state matters)."""

    def __init__(self, classes: int = 3, bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(8 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2), 1)))


def tiny_data(n: int, seed: int, classes: int = 3, size: int = 16):
    """Learnable uint8 images: brightness tells the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (y[:, None, None, None] * 90 + torch.randint(0, 60, (n, 3, size, size), generator=g)).to(torch.uint8)
    return x, y


def quiet(_):
    pass


def without_timing(history: dict) -> dict:
    return {**history, "epochs": [{k: v for k, v in row.items() if k not in TIMING} for row in history["epochs"]]}


# --- augmentation --------------------------------------------------------------------------------
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


def _test_image() -> np.ndarray:
    """64x64x3 uint8 (the crops' size): a horizontal gradient, a bright off-centre square and a
    dark bar (asymmetric, so flips and rotations both change it)."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, 32, dtype=np.uint8)[None, :]
    img[..., 1] = 80
    img[4:12, 18:28] = (250, 250, 30)
    img[20:24, 2:14, 2] = 200
    return np.kron(img, np.ones((2, 2, 1), np.uint8))


def _torchvision_stats(img: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and std over n draws of the seed report's torchvision pipeline."""
    from PIL import Image
    from torchvision import transforms as T

    torch.manual_seed(0)
    tf = T.Compose([T.RandomHorizontalFlip(), T.RandomRotation(10), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    pil = Image.fromarray(img)
    out = torch.stack([tf(pil) for _ in range(n)])
    return out.mean(0), out.std(0)


def test_augment_statistics_match_torchvision_per_sample_pipeline():
    """Ours vs torchvision's RandomHorizontalFlip + RandomRotation(10) + ToTensor + Normalize(0.5,
    0.5) applied per sample to the same image, 3000 draws each: per-pixel mean and std images.

    Tolerance: with 3000 draws the standard error of a per-pixel mean is <= 1/sqrt(3000) ~ 0.018
    (values in [-1, 1]), and torchvision rotates with nearest-neighbour interpolation, ours
    bilinearly. Measured: mean |diff| 0.006-0.007 for the mean image and 0.009 for the std
    image (two seeds); the bounds (0.015 / 0.018) are ~2x that. Each of these breaks is caught
    (measured): rotation within 5 or 20 degrees instead of 10 (0.025 / 0.045), no rotation
    (0.05), no flip or always flip (0.24), no normalisation (0.70).
    """
    img = _test_image()
    n = 3000
    tv_mean, tv_std = _torchvision_stats(img, n)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(n, 1, 1, 1)

    def ours(**kw):
        out = train.augment(x, torch.Generator().manual_seed(1), **kw)
        return (out.mean(0) - tv_mean).abs().mean().item(), (out.std(0) - tv_std).abs().mean().item()

    d_mean, d_std = ours()
    assert d_mean < 0.015 and d_std < 0.018, (d_mean, d_std)
    # the comparison is sensitive: narrower or wider rotations, and no flip, are caught
    assert min(ours(max_deg=5.0)) > 0.02 and min(ours(max_deg=20.0)) > 0.03
    no_flip = train.apply_augment(x, torch.zeros(n, dtype=torch.bool), (torch.rand(n) * 2 - 1) * math.radians(10))
    assert (no_flip.mean(0) - tv_mean).abs().mean().item() > 0.1


def test_augment_draws_match_torchvision_distributions():
    """Flip probability 0.5 and angle ~ U(-10, 10) degrees, as torchvision's draws."""
    from torchvision import transforms as T

    n = 20000
    flip, angle = train.augment_draws(n, torch.Generator().manual_seed(0))
    ours = torch.rad2deg(angle)
    torch.manual_seed(0)
    tv = torch.tensor([T.RandomRotation.get_params([-10.0, 10.0]) for _ in range(n)])
    # binomial: sd of the fraction = 0.5/sqrt(n) = 0.0035; 4 sd
    assert abs(flip.float().mean().item() - 0.5) < 0.014
    assert ours.abs().max() <= 10 and ours.abs().max() > 9.99
    # uniform on [-10, 10]: mean 0 (sd 0.04), sd 5.77; deciles within 0.3 degrees of torchvision's
    assert abs(ours.mean().item()) < 0.2 and abs(ours.std().item() - 20 / math.sqrt(12)) < 0.1
    q = torch.linspace(0.1, 0.9, 9)
    assert (torch.quantile(ours, q) - torch.quantile(tv, q)).abs().max() < 0.3


def test_apply_augment_rotates_as_torchvision_rotate():
    """A given angle rotates like torchvision's rotate (same direction and centre, bilinear)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = torch.from_numpy(_test_image()).permute(2, 0, 1)[None]
    for deg in (-9.0, 4.0):
        ours = train.apply_augment(x, torch.tensor([False]), torch.tensor([math.radians(deg)]))[0]
        ref = TF.rotate(x[0].float() / 255, deg, interpolation=InterpolationMode.BILINEAR) * 2 - 1
        assert (ours - ref).abs().mean() < 0.01
        other = TF.rotate(x[0].float() / 255, -deg, interpolation=InterpolationMode.BILINEAR) * 2 - 1
        assert (ours - other).abs().mean() > 0.03  # the direction matters
    flipped = train.apply_augment(x, torch.tensor([True]), torch.tensor([0.0]))[0]
    assert torch.allclose(flipped, train.normalize(x[0].flip(-1)), atol=1e-5)


# --- evaluation ----------------------------------------------------------------------------------
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
    # channels-last (the training's format, and the stages' when it trained so): the same figures
    nhwc = train.evaluate(m, x, y, batch_size=32, channels_last=True)
    assert nhwc["loss"] == pytest.approx(ev["loss"], rel=1e-5) and (nhwc["predictions"] == ev["predictions"]).all()


def test_the_stages_evaluate_in_the_trainings_memory_format(monkeypatch):
    from prunestudy import stages

    formats = []
    monkeypatch.setattr(train, "evaluate", lambda net, x, y, **kw: formats.append(kw["channels_last"]))
    speeds = ({"channels_last": "auto"}, {"channels_last": True}, {"channels_last": False}, {})
    for speed in speeds:
        stages._evaluate(None, (None, None), speed)
    assert formats == [True, True, False, False]   # {}: a training recorded before its options were
    assert [stages._memory_format(s) for s in speeds] == ["channels_last"] * 2 + ["contiguous"] * 2   # latency


# --- fit -----------------------------------------------------------------------------------------
def test_fit_learns_and_records_every_step():
    g = torch.Generator().manual_seed(0)
    # two separable classes: dark vs bright images
    y = torch.randint(0, 2, (96,), generator=g)
    x = (y[:, None, None, None] * 200 + torch.randint(0, 40, (96, 3, 64, 64), generator=g)).to(torch.uint8)
    torch.manual_seed(0)
    m = SeedCNN(num_classes=2)
    h = train.fit(m, (x, y), (x, y), epochs=3, batch_size=32, lr=1e-3, seed=0, log=quiet)
    assert len(h["steps"]) == 3 * 3 and len(h["epochs"]) == 3
    e = h["epochs"][-1]
    assert e["step_loss_min"] <= e["train_loss"] <= e["step_loss_max"]
    assert e["step_loss_first"] == h["steps"][6] and e["step_loss_last"] == h["steps"][8]
    assert e["test_accuracy"] > 0.9
    assert h["speed"]["precision"] == "fp32" and h["world_size"] == 1 and h["samples_per_rank"] == [3 * 96]


def _plain_loop(model, x, y, *, epochs, batch_size, lr, seed):
    """The plain fp32 loop fit had before the speed options (its reference behaviour)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(train.augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps.append(float(loss.detach().float()))
    return steps


@pytest.mark.parametrize("options", [{}, {"precision": "fp32", "channels_last": False, "compile": False,
                                          "fused": False}])
def test_fp32_reproduces_the_plain_loop_exactly(options):
    """Defaults and explicit fp32 with every option off: bit-identical losses and weights."""
    x, y = tiny_data(70, 0)  # 70 = 4 batches of 16 + a partial batch of 6
    torch.manual_seed(5)
    ref = Tiny()
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_steps = _plain_loop(ref, x, y, epochs=2, batch_size=16, lr=1e-2, seed=5)
    m = Tiny()
    m.load_state_dict(init)
    h = train.fit(m, (x, y), (x, y), epochs=2, batch_size=16, lr=1e-2, seed=5, log=quiet, **options)
    assert h["steps"] == ref_steps
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_fit_is_deterministic_for_a_seed():
    x, y = tiny_data(40, 0)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(train.fit(Tiny(), (x, y), (x, y), epochs=1, batch_size=16, lr=1e-3, seed=3, log=quiet)["steps"])
    assert runs[0] == runs[1]


def test_auto_on_the_cpu_stays_within_float_tolerance_of_the_plain_loop():
    """auto on the CPU = fp32 + channels_last + fused Adam: other rounding, same training.
    Measured: step losses within 3e-7 relative and weights within 3e-8 after 10 steps;
    tolerance 1e-4. (Without batch norm: a conv bias followed by batch norm has a zero gradient
    up to rounding, which Adam turns into full-size random steps.)"""
    x, y = tiny_data(70, 0)
    torch.manual_seed(5)
    ref = Tiny(bn=False)
    m = Tiny(bn=False)
    m.load_state_dict(ref.state_dict())
    ref_steps = _plain_loop(ref, x, y, epochs=2, batch_size=16, lr=1e-2, seed=5)
    h = train.fit(m, (x, y), (x, y), epochs=2, batch_size=16, lr=1e-2, seed=5, log=quiet,
                  precision="auto", channels_last="auto", compile="auto", fused="auto")
    assert {k: h["speed"][k] for k in ("precision", "channels_last", "compile", "fused")} == \
        {"precision": "fp32", "channels_last": True, "compile": False, "fused": True}
    assert h["steps"] == pytest.approx(ref_steps, rel=1e-4)
    assert h["steps"] != ref_steps or not torch.equal(m.conv.weight, ref.conv.weight)  # not the plain path
    assert all(torch.allclose(m.state_dict()[k], v, atol=1e-4) for k, v in ref.state_dict().items())


def test_bf16_and_channels_last_train_and_leave_the_model_contiguous():
    x, y = tiny_data(96, 0)
    torch.manual_seed(0)
    m = Tiny()
    h = train.fit(m, (x, y), (x, y), epochs=3, batch_size=16, lr=1e-2, seed=0, log=quiet,
                  precision="bf16", channels_last=True)
    assert h["speed"]["precision"] == "bf16" and h["speed"]["channels_last"] is True
    assert h["epochs"][-1]["test_accuracy"] > 0.9
    assert m.conv.weight.is_contiguous()
    assert all(math.isfinite(s) for s in h["steps"])


def test_resolve_speed_choices_and_errors(monkeypatch):
    cpu = train.resolve_speed("cpu", "auto", "auto", "auto", fused="auto")
    assert (cpu["precision"], cpu["channels_last"], cpu["compile"], cpu["fused"], cpu["grad_scaler"]) == \
        ("fp32", True, False, True, False)
    plain = train.resolve_speed("cpu")
    assert [plain[k] for k in ("precision", "channels_last", "compile", "fused")] == ["fp32", False, False, False]
    assert train.resolve_speed("cpu", "fp32", True, True)["compile_mode"] == "default"
    assert train.resolve_speed("cpu", "bf16")["notes"]  # says why it is slow here
    with pytest.raises(ValueError, match="fp16.*not supported on the CPU"):
        train.resolve_speed("cpu", "fp16")
    with pytest.raises(ValueError, match="choose one of"):
        train.resolve_speed("cpu", "fp8")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = train.resolve_speed("cuda", "auto", "auto", True, batch_size=32)
    assert (gpu["precision"], gpu["channels_last"], gpu["compile_mode"]) == ("bf16", True, "reduce-overhead")
    assert train.resolve_speed("cuda", "fp16", compile=True, batch_size=4096)["compile_mode"] == "default"
    assert train.resolve_speed("cuda", "fp16")["grad_scaler"] is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert train.resolve_speed("cuda", "auto")["precision"] == "fp16"


def test_on_step_sees_global_steps_and_can_snapshot_weights():
    x, y = tiny_data(40, 0)  # 3 steps per epoch at batch 16
    torch.manual_seed(0)
    m = Tiny()
    seen, snapshot = [], {}

    def on_step(step, model):
        seen.append(step)
        assert model is m
        if step == 2:
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})

    train.fit(m, (x, y), (x, y), epochs=2, batch_size=16, lr=1e-2, seed=0, log=quiet, on_step=on_step)
    assert seen == [1, 2, 3, 4, 5, 6]
    assert not torch.equal(snapshot["conv.weight"], m.conv.weight)


def test_progress_bar_when_asked_and_log_line_always(capsys, monkeypatch):
    monkeypatch.delenv("PRUNESTUDY_PROGRESS", raising=False)
    x, y = tiny_data(40, 0)
    lines = []
    train.fit(Tiny(), (x, y), (x, y), epochs=1, batch_size=16, lr=1e-2, seed=0, log=lines.append, progress=True)
    err = capsys.readouterr().err
    assert "[train] epoch 1/1" in err and "img" in err
    assert len(lines) == 1 and "test acc" in lines[0] and "img/s" in lines[0]
    train.fit(Tiny(), (x, y), (x, y), epochs=1, batch_size=16, lr=1e-2, seed=0, log=lines.append)
    assert capsys.readouterr().err == ""  # auto: no bar when stderr is not a terminal
    monkeypatch.setenv("PRUNESTUDY_PROGRESS", "log")  # papermill under `prunestudy run`: a few updates
    train.fit(Tiny(), (x, y), (x, y), epochs=1, batch_size=16, lr=1e-2, seed=0, log=lines.append)
    assert "[train] epoch 1/1" in capsys.readouterr().err and len(lines) == 3


# --- weights -------------------------------------------------------------------------------------
def test_load_weights_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    src = Tiny()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = train.load_weights(Tiny(), tmp_path / "w.pt")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        train.load_weights(Tiny(), tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"shape of fc\.weight: file \(3, 512\) != model \(5, 512\)"):
        train.load_weights(Tiny(classes=5), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="missing in file: fc1.weight"):
        train.load_weights(SeedCNN(), tmp_path / "w.pt")
    torch.save({"net": src}, tmp_path / "pickled.pt")  # a pickled module, not a state_dict
    with pytest.raises(ValueError, match="weights_only"):
        train.load_weights(Tiny(), tmp_path / "pickled.pt")


# --- checkpoints ---------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


def _fit_tiny(checkpoint=None, on_step=None, epochs=3, lr=1e-2, model_seed=0):
    torch.manual_seed(model_seed)
    m = Tiny()
    h = train.fit(m, tiny_data(70, 0), tiny_data(30, 1), epochs=epochs, batch_size=16, lr=lr, seed=7, log=quiet,
                  checkpoint=checkpoint, on_step=on_step)
    return m, h


def test_checkpoint_resume_in_process_matches_uninterrupted_run(tmp_path):
    ref_model, ref = _fit_tiny()
    ckpt = tmp_path / "ckpt.pt"

    def stop_in_epoch_two(step, model):
        if step == 7:  # 5 steps per epoch
            raise Interrupt

    with pytest.raises(Interrupt):
        _fit_tiny(ckpt, stop_in_epoch_two)
    saved = torch.load(ckpt, weights_only=True)  # plain tensors, numbers, lists, dicts
    assert saved["epoch"] == 1 and saved["step"] == 5 and len(saved["history"]["steps"]) == 5
    steps = []
    m, h = _fit_tiny(ckpt, lambda s, _: steps.append(s))
    assert steps == list(range(6, 16))  # global steps continue
    assert without_timing(h) == without_timing(ref)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in ref_model.state_dict().items())
    # a finished checkpoint: nothing left to train, same history
    steps.clear()
    assert without_timing(_fit_tiny(ckpt, lambda s, _: steps.append(s))[1]) == without_timing(ref) and not steps


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    _fit_tiny(ckpt, epochs=1)
    with pytest.raises(ValueError, match=r"different training configuration \(lr: checkpoint 0.01 != now 0.02"):
        _fit_tiny(ckpt, epochs=1, lr=2e-2)
    with pytest.raises(ValueError, match="initial_weights"):
        _fit_tiny(ckpt, epochs=1, model_seed=1)


JOB = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_train import Tiny, tiny_data, _fit_tiny
    from prunestudy import atomic
    torch.set_num_threads(1)
    out, ckpt, sentinel = sys.argv[1], sys.argv[2], sys.argv[3]

    def hang_in_epoch_two(step, model):
        if sentinel != "-" and step == 7:  # 5 steps per epoch: epoch 2 has started
            open(sentinel, "w").close()
            time.sleep(120)  # killed here

    m, h = _fit_tiny(None if ckpt == "-" else ckpt, hang_in_epoch_two)
    atomic.save_tensors(out + ".pt", m.state_dict())
    atomic.write_json(out + ".json", h)
""")


@pytest.mark.e2e
def test_sigkill_mid_epoch_then_rerun_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB.format(tests=str(Path(__file__).parent)))
    run = [sys.executable, str(script)]
    ckpt, sentinel = tmp_path / "ckpt.pt", tmp_path / "epoch2-started"
    ref = subprocess.Popen(run + [str(tmp_path / "ref"), "-", "-"])
    victim = subprocess.Popen(run + [str(tmp_path / "res"), str(ckpt), str(sentinel)])
    try:
        deadline = time.monotonic() + 60
        while not sentinel.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sentinel.exists() and ckpt.exists(), "the job never reached epoch 2"
    finally:
        victim.send_signal(signal.SIGKILL)  # mid-epoch 2: the checkpoint of epoch 1 exists
        victim.wait()
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    subprocess.run(run + [str(tmp_path / "res"), str(ckpt), "-"], check=True, timeout=60)
    assert ref.wait(timeout=60) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ref", "res"))
    assert without_timing(a) == without_timing(b) and len(a["steps"]) == 15
    wa, wb = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("ref", "res"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_select_device():
    assert train.select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert train.select_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            train.select_device("cuda")
    assert train.is_main_process() and train.rank_and_world() == (0, 1)
