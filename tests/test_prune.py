import pytest
import torch

from prunestudy import prune, train
from prunestudy.models import SeedCNN


def _model(seed=0):
    torch.manual_seed(seed)
    return SeedCNN()


@pytest.mark.parametrize("amount", [0.2, 0.5, 0.9])
def test_l1_reaches_asked_sparsity_exactly_per_layer(amount):
    m = _model()
    names = prune.apply(m, amount=amount)
    assert names == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    sp = prune.sparsity(m)
    for name, layer in sp["layers"].items():
        assert layer["zeros"] == round(amount * layer["size"]), name
    assert sp["global_sparsity"] == pytest.approx(amount, abs=1e-4)
    assert sp["params_total"] == 4_293_194
    assert sp["params_total"] - sp["params_nonzero"] == sp["zeros"]


def test_l1_removes_the_smallest_magnitudes():
    m = _model()
    w = m.conv2.weight.detach().abs().clone()
    prune.apply(m, amount=0.3, targets="conv")
    kept = m.conv2.weight.detach() != 0
    assert w[~kept].max() <= w[kept].min()
    assert prune.sparsity(m, "linear")["global_sparsity"] == 0  # linear layers untouched


def test_targets_and_bad_input():
    assert [n for n, _ in prune.target_layers(_model(), "linear")] == ["fc1", "fc2"]
    with pytest.raises(ValueError, match="prune.targets"):
        prune.target_layers(_model(), "bias")
    with pytest.raises(ValueError, match="prune.amount"):
        prune.apply(_model(), amount=1.0)
    with pytest.raises(ValueError, match="prune.method"):
        prune.apply(_model(), method="magic")


def test_masks_hold_through_real_optimizer_steps():
    m = _model()
    prune.apply(m, amount=0.5)
    zero_before = {n: mask.logical_not() for n, mask in prune.masks(m).items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    orig_before = m.fc1.weight_orig.detach().clone()
    train.fit(m, (x, y), (x[:16], y[:16]), epochs=2, batch_size=16, lr=1e-2, seed=0, log=lambda s: None)
    # the optimizer really moved the underlying weights, pruned positions included ...
    assert not torch.equal(orig_before, m.fc1.weight_orig.detach())
    assert (m.fc1.weight_orig.detach()[zero_before["fc1"]] != 0).any()
    # ... yet every pruned weight is still exactly zero, and stays so once made permanent
    modules = dict(m.named_modules())
    for name, zero in zero_before.items():
        assert (modules[name].weight.detach()[zero] == 0).all(), name
    prune.make_permanent(m)
    assert prune.sparsity(m)["global_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert "fc1.weight_orig" not in m.state_dict()
    SeedCNN().load_state_dict(m.state_dict())  # loads into a plain dense model


def test_restore_reattaches_saved_masks():
    m = _model()
    prune.apply(m, amount=0.4)
    saved = prune.masks(m)
    state = prune.make_permanent(m).state_dict()
    fresh = SeedCNN()
    fresh.load_state_dict(state)
    prune.restore(fresh, saved)
    assert torch.equal(prune.masks(fresh)["conv3"], saved["conv3"])
