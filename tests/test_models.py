"""Model shapes and sizes."""

import pytest
import torch

from training.mnist.models import FastCNN, ReferenceCNN, build_mnist_model


@pytest.mark.parametrize("name", ["default", "reference"])
def test_mnist_models_map_images_to_ten_logits(name):
    model = build_mnist_model(name)
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)


def test_reference_is_the_seed_network():
    model = ReferenceCNN()
    assert model.classifier[0].in_features == 9216 and model.classifier[0].out_features == 128
    assert [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv2d)] == [32, 64]


def test_default_is_much_smaller_than_reference():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(FastCNN()) * 20 < count(ReferenceCNN())


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match="unknown MNIST model"):
        build_mnist_model("vgg")
