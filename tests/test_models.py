import torch

from prunestudy.models import SeedCNN, build_model, count_parameters


def test_seed_cnn_parameter_count_and_layers():
    m = SeedCNN()
    assert count_parameters(m) == 4_293_194
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size) == (3, 32, (3, 3))
    assert (m.conv2.in_channels, m.conv2.out_channels) == (32, 64)
    assert (m.conv3.in_channels, m.conv3.out_channels) == (64, 128)
    assert (m.fc1.in_features, m.fc1.out_features) == (128 * 8 * 8, 512)
    assert (m.fc2.in_features, m.fc2.out_features) == (512, 10)
    assert m.dropout.p == 0.25


def test_seed_cnn_output_shape():
    out = SeedCNN().eval()(torch.zeros(5, 3, 64, 64))
    assert out.shape == (5, 10)


def test_torchvision_models_build_offline_with_ten_outputs():
    for name in ("resnet18", "efficientnet_b0"):
        out = build_model(name, 10).eval()(torch.zeros(2, 3, 64, 64))
        assert out.shape == (2, 10)


def test_unknown_model_names_the_choices():
    try:
        build_model("vgg")
    except ValueError as e:
        assert "seed_cnn" in str(e) and "train.model" in str(e)
    else:
        raise AssertionError("no error")


def _relu_then_pool(m: SeedCNN, x: torch.Tensor) -> torch.Tensor:
    """The seed report's order (conv, ReLU, max-pool), written out."""
    for conv in (m.conv1, m.conv2, m.conv3):
        x = m.pool(torch.relu(conv(x)))
    return m.fc2(m.dropout(torch.relu(m.fc1(torch.flatten(x, 1)))))


def test_seed_cnn_pools_before_its_relu_with_the_same_outputs_and_gradients():
    """SeedCNN applies each ReLU after its max-pool (cheaper); the two orders commute exactly, so
    the outputs and the gradients equal the seed report's order bit for bit, training included
    (dropout drawn alike), with weights whose pre-activations are negative, zero and positive."""
    torch.manual_seed(0)
    m = SeedCNN().train()
    with torch.no_grad():   # many exact zeros and negative windows: where an order could differ
        m.conv2.bias.fill_(-0.05)
        m.conv3.weight[:8].zero_()
        m.conv3.bias[:8].zero_()
    x = torch.randn(8, 3, 64, 64).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    grads = []
    for forward in (m, lambda inp: _relu_then_pool(m, inp)):
        m.zero_grad()
        torch.manual_seed(1)
        out = forward(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        grads.append((out.detach().clone(), [p.grad.clone() for p in m.parameters()]))
    (out_a, g_a), (out_b, g_b) = grads
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))
    assert any(g.abs().sum() > 0 for g in g_a)
