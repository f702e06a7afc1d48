import copy
import io
import json

import pytest
import torch

from prunestudy import methods, models, prune, train
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


# --- methods, models, exports (the pruning study's library) -----------------------------------
torch.set_num_threads(1)
MASKED = ["l1_unstructured", "global_magnitude", "random_unstructured", "ln_structured"]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _net(name="seed_cnn", seed=0):
    torch.manual_seed(seed)
    return models.build_model(name, 10).eval()


def _roundtrip(state, meta):
    """Through bytes the way the stages store them: tensors via torch.save, meta via JSON."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True), json.loads(json.dumps(meta))


def test_global_magnitude_one_threshold_over_all_layers():
    m = _model()
    before = {n: mod.weight.detach().abs().clone() for n, mod in prune.target_layers(m)}
    prune.apply(m, "global_magnitude", 0.6)
    sp = prune.sparsity(m)
    assert sp["zeros"] == round(0.6 * sp["targeted_weights"])
    assert len({round(v["sparsity"], 3) for v in sp["layers"].values()}) > 1  # not per layer
    mods = dict(m.named_modules())
    pruned = torch.cat([before[n][mods[n].weight == 0] for n in before])
    kept = torch.cat([before[n][mods[n].weight != 0] for n in before])
    assert pruned.max() <= kept.min()


def test_random_is_seeded_reproducible_and_unlike_magnitude():
    a, b, c, l1 = _model(), _model(), _model(), _model()
    state = torch.random.get_rng_state()   # after the models' own seeded initialisation
    prune.apply(a, "random_unstructured", 0.5, seed=3)
    prune.apply(b, "random_unstructured", 0.5, seed=3)
    prune.apply(c, "random_unstructured", 0.5, seed=4)
    prune.apply(l1, "l1_unstructured", 0.5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    ma, mb, mc, ml = (prune.masks(x) for x in (a, b, c, l1))
    for name in ma:
        assert torch.equal(ma[name], mb[name])
        assert not torch.equal(ma[name], mc[name]) and not torch.equal(ma[name], ml[name])
        assert int((~ma[name]).sum()) == round(0.5 * ma[name].numel())


def test_ln_structured_zeroes_whole_rows_and_spares_the_classifier():
    m = _model()
    names = prune.apply(m, "ln_structured", 0.5)
    assert names == ["conv1", "conv2", "conv3", "fc1"]
    for name, mod in prune.target_layers(m):
        rows = mod.weight.detach().flatten(1)
        zero_rows = (rows == 0).all(1)
        assert ((rows != 0).all(1) | zero_rows).all(), name  # rows are all zero or untouched
        assert int(zero_rows.sum()) == (0 if name == "fc2" else round(0.5 * rows.shape[0])), name
    assert m(X).shape == (2, 10)


@pytest.mark.parametrize("arch", ["seed_cnn", "resnet18"])
@pytest.mark.parametrize("method", methods.names())
def test_every_method_keeps_ten_outputs(arch, method):
    m = _net(arch)
    prune.apply(m, method, 0.5, "all")
    assert m(X).shape == (2, 10)
    head = dict(m.named_modules())[prune.classifier_name(m)]
    assert head.out_features == 10


@pytest.mark.parametrize("arch", ["seed_cnn", "resnet18", "efficientnet_b0"])
def test_channel_shrinks_the_model_and_its_export_reloads_without_pickle(arch):
    from prunestudy import efficiency

    dense = _net(arch)
    m = copy.deepcopy(dense)
    prune.apply(m, "channel", 0.5)
    assert models.count_parameters(m) < 0.5 * models.count_parameters(dense)
    assert efficiency.flops(m)["macs"] < 0.5 * efficiency.flops(dense)["macs"]
    state, meta = _roundtrip(*prune.export(m))
    with pytest.raises(RuntimeError):  # not the base architecture any more
        models.build_model(arch, 10).load_state_dict(state)
    rebuilt = prune.rebuild(arch, 10, meta["architecture"])
    rebuilt.load_state_dict(state)
    out = rebuilt.eval()(X)
    assert out.shape == (2, 10) and torch.equal(out, m(X))


@pytest.mark.parametrize("targets, conv3, fc1", [("conv", 64, 512), ("linear", 128, 256), ("all", 64, 256)])
def test_channel_targets_decide_which_layers_lose_channels(targets, conv3, fc1):
    m = _net()
    prune.apply(m, "channel", 0.5, targets)
    assert (m.conv3.out_channels, m.fc1.out_features, m.fc2.out_features) == (conv3, fc1, 10)
    assert m.fc1.in_features == conv3 * 8 * 8 and m(X).shape == (2, 10)


@pytest.mark.parametrize("method", MASKED)
def test_masked_export_loads_into_a_dense_model_with_identical_outputs(method):
    m = _net()
    prune.apply(m, method, 0.5)
    state, meta = _roundtrip(*prune.export(m))
    assert prune.masks(m) and meta["masked_layers"] == sorted(prune.masks(m))  # the model keeps its masks
    dense = models.build_model("seed_cnn", 10).eval()
    dense.load_state_dict(state)
    assert torch.equal(dense(X), m(X))
    assert prune.sparsity(dense)["params_nonzero"] == meta["params_nonzero"]


def test_round_amounts_compose_to_the_target():
    parts = prune.round_amounts(0.8, 4)
    assert len(parts) == 4 and torch.tensor([1 - p for p in parts]).prod().item() == pytest.approx(0.2)
    assert prune.round_amounts(0.5, 1) == [0.5]
    with pytest.raises(ValueError, match="rounds"):
        prune.round_amounts(0.5, 0)
    with pytest.raises(ValueError, match="prune.amount"):
        prune.round_amounts(1.0, 3)


@pytest.mark.parametrize("method", ["l1_unstructured", "global_magnitude", "random_unstructured"])
def test_iterative_rounds_reach_the_target_sparsity(method):
    m = _model()
    for amount in prune.round_amounts(0.5, 3):
        prune.apply(m, method, amount)
    assert prune.sparsity(m)["global_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_iterative_channel_rounds_remove_a_fraction_of_the_remaining_channels():
    m = _net()
    for amount in prune.round_amounts(0.5, 2):
        prune.apply(m, "channel", amount)
    for layer, full in ((m.conv1, 32), (m.conv2, 64), (m.conv3, 128)):
        assert abs(layer.out_channels - full / 2) <= 1
    assert m(X).shape == (2, 10)


def test_rewind_restores_early_weights_and_buffers_keeping_masks():
    net = _net("resnet18")
    early = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.bn1.running_mean.add_(5.0)
    prune.apply(net, "l1_unstructured", 0.5, "conv")
    saved = prune.masks(net)
    prune.rewind(net, early)
    assert all(torch.equal(saved[n], mask) for n, mask in prune.masks(net).items())
    assert torch.equal(net.conv1.weight_orig, early["conv1.weight"])
    assert torch.equal(net.conv1.weight, early["conv1.weight"] * saved["conv1"])  # survivors rewound, zeros kept
    assert torch.equal(net.bn1.running_mean, early["bn1.running_mean"])
    assert torch.equal(net.fc.weight, early["fc.weight"])
    with pytest.raises(ValueError, match="rewind"):
        shrunk = _net()
        prune.apply(shrunk, "channel", 0.5)
        prune.rewind(shrunk, _net().state_dict())


def _bad_calls():
    masked = _net()
    prune.apply(masked, "l1_unstructured", 0.2)
    return [
        (_net(), dict(method="l1_unstructured", amount=1.0), "prune.amount"),
        (_net(), dict(method="channel", amount=-0.1), "prune.amount"),
        (_net(), dict(method="channel", amount="0.5"), "prune.amount"),
        (_net(), dict(method="magic", amount=0.5), "prune.method must be one of l1_unstructured, global_magnitude"),
        (_net(), dict(method="channel", amount=0.5, targets="bias"), "prune.targets must be one of conv, linear, all"),
        (_net("resnet18"), dict(method="channel", amount=0.5, targets="linear"), "valid targets here: conv, all"),
        (_net("resnet18"), dict(method="ln_structured", amount=0.5, targets="linear"), "cannot apply"),
        (masked, dict(method="channel", amount=0.5), "make_permanent"),
    ]


def test_bad_inputs_raise_before_the_model_changes():
    for model, kwargs, message in _bad_calls():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        n_masks = len(prune.masks(model))
        with pytest.raises(ValueError, match=message):
            prune.apply(model, **kwargs)
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), kwargs
        assert len(prune.masks(model)) == n_masks


def test_check_validates_without_a_model():
    prune.check("channel", 0.5, "linear", "seed_cnn")
    prune.check("global_magnitude", 0, "all")
    for args, message in [(("channel", 0.5, "linear", "resnet18"), "cannot apply to resnet18"),
                          (("channel", 0.5, "linear", "efficientnet_b0"), "cannot apply"),
                          (("channel", 0.5, "all", "vgg"), "train.model must be one of seed_cnn"),
                          (("l1", 0.5, "all", "seed_cnn"), "prune.method"),
                          (("l1_unstructured", 1, "all", None), "prune.amount")]:
        with pytest.raises(ValueError, match=message):
            prune.check(*args)


def test_rebuild_rejects_a_foreign_architecture_and_clone_copies_masked_models():
    with pytest.raises(ValueError, match="wrong architecture"):
        prune.rebuild("seed_cnn", 10, prune.architecture(_net("resnet18")))
    m = _net()
    prune.apply(m, "l1_unstructured", 0.3)
    c = prune.clone(m)  # copy.deepcopy alone fails right after pruning
    assert torch.equal(c(X), m(X)) and prune.masks(c).keys() == prune.masks(m).keys()
