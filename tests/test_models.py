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
