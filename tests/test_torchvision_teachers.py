"""Plain torchvision checkpoints as teachers: their own key layout, feature access by family, honest refusals."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from distill.models import FeatureAccessError, TorchvisionModel, architectures_like, build_model, set_feature_access
from distill.teacher import TeacherError, TeacherSpec, load_teacher

MEAN, STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # the teacher sees exactly the images the plain model sees

# families where GAP(forward_features) -> classifier must reproduce the logits
WITH_FEATURES = [
    "torchvision/resnet18",
    "resnext50_32x4d",
    "mobilenet_v2",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
    "densenet121",
    "shufflenet_v2_x0_5",
    "mnasnet0_5",
    "swin_t",
]
# families whose head is not one linear layer after pooling: logits only, and a message that says so
LOGIT_ONLY = ["mobilenet_v3_small", "vit_b_16", "maxvit_t", "squeezenet1_0", "alexnet"]


def _randomise_statistics(model: nn.Module) -> None:
    """Move norm layers away from their identity initialisation, so a misplaced norm or ReLU shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


@pytest.mark.parametrize("name", WITH_FEATURES)
def test_feature_map_and_classifier_reproduce_the_logits(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=4).eval()
    _randomise_statistics(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = model.forward_features(x), model(x)
        assert feats.ndim == 4 and feats.shape[:2] == (2, model.feature_dim) and feats.shape[-1] > 1
        assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 4
        assert float(logits.abs().max()) > 1e-2  # not a comparison of near-zero outputs
        assert torch.allclose(model.forward_head(feats), logits, atol=1e-5, rtol=1e-4)


def test_convnext_map_is_needed_because_the_plain_map_does_not_reproduce_the_logits() -> None:
    torch.manual_seed(0)
    model = build_model("convnext_tiny", num_classes=4).eval()
    _randomise_statistics(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # GAP(features) -> Linear skips the head's LayerNorm: not the logits
        assert not torch.allclose(model.forward_head(model.net.features(x)), model(x), atol=1e-3)


@pytest.mark.parametrize("name", LOGIT_ONLY)
def test_logit_only_families_say_which_methods_still_work(name: str) -> None:
    model = build_model(name, num_classes=4).eval()
    for access in (lambda: model.forward_features(torch.randn(1, 3, 64, 64)), lambda: model.feature_dim):
        with pytest.raises(FeatureAccessError, match=r"KD3 cannot use it, the logit-only methods kd and dfnd can"):
            access()
    size = 224 if name.startswith(("vit", "maxvit")) else 64  # ViT takes only 224; MaxViT's windows need it too
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 4)


def test_named_layers_give_access_only_where_the_logits_are_reproduced() -> None:
    model = build_model("mobilenet_v3_small", num_classes=4)
    with pytest.raises(FeatureAccessError, match="does not reproduce the model's logits"):
        set_feature_access(model, "features", "classifier.3")  # the last Linear sits behind Hardswish
    googlenet = build_model("googlenet", num_classes=4)  # no default access, but a pooled map and one Linear
    with pytest.raises(FeatureAccessError, match="name them with teacher.feature_layer"):
        googlenet.forward_features(torch.randn(1, 3, 64, 64))
    set_feature_access(googlenet, "inception5b", "fc", probe_size=64)
    assert googlenet.feature_dim == 1024
    resnet = build_model("torchvision/resnet18", num_classes=4)
    set_feature_access(resnet, "layer4", "fc")  # torchvision's own module names
    assert resnet.classifier is resnet.fc and list(resnet.state_dict()) == list(
        torchvision.models.resnet18(num_classes=4).state_dict()
    )


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "vit_b_16"])
def test_state_dict_is_torchvisions_own(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = torchvision.models.get_model(name, weights=None, num_classes=4)
    ours = build_model(f"torchvision/{name}", num_classes=4)
    assert isinstance(ours, TorchvisionModel) and not any(n == "net" for n, _ in ours.named_children())
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert ours.state_dict(keep_vars=True)[next(iter(plain.state_dict()))] is next(ours.net.parameters())


def _save_plain(tmp_path: Path, name: str) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    plain = torchvision.models.get_model(name, weights=None, num_classes=4).eval()
    _randomise_statistics(plain)
    path = tmp_path / f"{name}.pt"
    torch.save(plain.state_dict(), path)
    return plain, path


@pytest.mark.parametrize(
    ("name", "arch"),
    [
        ("resnet18", "torchvision/resnet18"),
        ("mobilenet_v3_small", "mobilenet_v3_small"),
        ("mobilenet_v2", "torchvision/mobilenet_v2"),
    ],
)
def test_a_plain_torchvision_checkpoint_loads_with_the_same_logits(tmp_path: Path, name: str, arch: str) -> None:
    plain, path = _save_plain(tmp_path, name)
    teacher = load_teacher(TeacherSpec(str(path), num_classes=4, arch=arch), MEAN, STD, input_size=64)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(teacher(x), plain(x), atol=1e-5)
        if name == "mobilenet_v3_small":
            with pytest.raises(FeatureAccessError, match="kd and dfnd"):
                teacher.features(x)
        else:
            f, logits = teacher.features_and_logits(x)
            assert torch.allclose(logits, plain(x), atol=1e-5) and teacher.classifier.out_features == 4


def test_the_registry_name_wins_and_the_error_names_the_torchvision_one(tmp_path: Path) -> None:
    _, path = _save_plain(tmp_path, "resnet18")
    with pytest.raises(
        TeacherError,
        match=r"does not match architecture 'resnet18'.*set teacher.arch: "
        r"torchvision/resnet18",
    ):
        load_teacher(TeacherSpec(str(path), num_classes=4, arch="resnet18"), MEAN, STD)
    with pytest.raises(
        TeacherError,
        match=r"keys are those of 'torchvision/resnet18', but 2 shapes differ "
        r"\(first: fc.weight \(4, 512\) vs \(7, 512\)",
    ):
        load_teacher(TeacherSpec(str(path), num_classes=7, arch="resnet18"), MEAN, STD)
    ours = tmp_path / "cifar.pt"
    torch.save(build_model("resnet18", 4).state_dict(), ours)  # and the other way round
    with pytest.raises(TeacherError, match=r"set teacher.arch: resnet18$"):
        load_teacher(TeacherSpec(str(ours), num_classes=4, arch="torchvision/resnet18"), MEAN, STD)


def test_the_guess_picks_the_exact_member_of_a_family() -> None:
    plain = torchvision.models.resnext50_32x4d(num_classes=4)  # resnet50 has the same keys, other shapes
    shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    found = architectures_like(shapes, 4)
    assert found[0] == ("resnext50_32x4d", []) and "resnet50" in [n for n, _ in found]
    assert architectures_like({"encoder.weight": (3, 3)}, 4) == []


def test_unknown_keys_say_that_nothing_known_matches(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(TeacherError, match="no registry or torchvision architecture has exactly these keys"):
        load_teacher(TeacherSpec(str(path), num_classes=4, arch="resnet8"), MEAN, STD)


def test_kd3s_own_checkpoints_round_trip_and_the_older_prefixed_layout_still_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=4).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    fresh = build_model("mobilenet_v2", num_classes=4).eval()
    fresh.load_state_dict(model.state_dict())
    parent = nn.ModuleDict({"backbone": build_model("mobilenet_v2", num_classes=4)}).eval()  # as in KD3Student
    parent.load_state_dict({f"backbone.{k}": v for k, v in model.state_dict().items()})
    older = {f"net.{k}": v for k, v in model.state_dict().items()}
    older |= {"classifier.weight": model.classifier.weight, "classifier.bias": model.classifier.bias}
    nested = build_model("mobilenet_v2", num_classes=4).eval()
    nested_parent = nn.ModuleDict({"backbone": nested})
    nested_parent.load_state_dict({f"backbone.{k}": v for k, v in older.items()})
    path = tmp_path / "older.pt"
    torch.save(older, path)
    teacher = load_teacher(TeacherSpec(str(path), num_classes=4, arch="mobilenet_v2"), MEAN, STD, input_size=64)
    with torch.no_grad():
        for m in (fresh, parent["backbone"], nested, teacher):
            assert torch.allclose(m(x), expected, atol=1e-6)


def test_copies_moves_and_traces_keep_one_set_of_weights() -> None:
    torch.manual_seed(0)
    model = build_model("torchvision/resnet18", num_classes=4).eval()
    x = torch.rand(2, 3, 32, 32)
    clone = copy.deepcopy(model)
    assert clone.classifier is clone.fc and clone.net._modules is clone._modules
    with torch.no_grad():
        clone.fc.weight.add_(1.0)  # the copy's forward, features and classifier all see its own weights
        assert torch.allclose(clone.forward_head(clone.forward_features(x)), clone(x), atol=1e-5)
        assert not torch.allclose(clone(x), model(x))
    model.double()
    assert model.net.fc.weight.dtype == torch.float64 and model.classifier.weight.dtype == torch.float64
    model.float().train()
    assert model.net.training and model.layer1.training
    model.eval()
    assert not model.net.training
    with warnings.catch_warnings(), torch.no_grad():  # the export path traces the student
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
        assert torch.allclose(traced(x), model(x), atol=1e-5)
        assert set(dict(traced.named_parameters())) == set(dict(model.named_parameters()))
