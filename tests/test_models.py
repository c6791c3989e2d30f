"""The architecture registry's contract: features, head and logits agree for every model."""

from __future__ import annotations

import pytest
import torch

from distill.models import MODELS, FeatureAccessError, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_contract(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_chans=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert feats.ndim == 4 and feats.shape[:2] == (2, model.feature_dim)
    assert logits.shape == (2, 7)
    assert torch.allclose(model.forward_head(feats), logits, atol=1e-5)
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.out_features == 7


def test_registry_names_win_over_torchvision() -> None:
    from distill.models import CifarResNet, TorchvisionModel

    assert isinstance(build_model("resnet18", 10), CifarResNet)
    assert isinstance(build_model("torchvision/resnet18", 10), TorchvisionModel)


def test_in_chans_and_gray_input() -> None:
    model = build_model("resnet8", num_classes=3, in_chans=1).eval()
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 3)


# torchvision families: tests/test_torchvision_teachers.py


def test_torchvision_without_feature_access_says_what_still_works() -> None:
    model = build_model("vgg11", num_classes=5)
    with pytest.raises(FeatureAccessError, match="logit-only methods"):
        model.forward_features(torch.randn(1, 3, 32, 32))


def test_unknown_architecture_lists_the_registry() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'.*resnet8"):
        build_model("resnet9000", 10)


def test_cuda_requested_without_a_gpu_is_a_clear_error() -> None:
    from distill.data import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            resolve_device("cuda")


def test_fashion_mnist_is_rendered_as_the_teachers_input() -> None:
    import numpy as np

    from demo.fashion_mnist import fashion_mnist_rgb32
    from distill.data import to_float

    raw = np.full((2, 28, 28), 200, dtype=np.uint8)
    rgb = fashion_mnist_rgb32(raw)
    assert rgb.shape == (2, 32, 32, 3) and rgb[0, 0, 0, 0] == 0 and rgb[0, 2, 2, 1] == 200
    x = to_float(rgb, 32, torch.device("cpu"))
    assert x.shape == (2, 3, 32, 32) and float(x.max()) == pytest.approx(200 / 255)
