"""Registry of teacher and student architectures, all with the same feature access.

KD³ needs two things from every network (KD3_SPEC.md section 2): the last-stage feature map
``F(x)`` (before pooling, after the final ReLU) and the final linear classifier ``h``, so that
``logits = h(GAP(F(x)))``. Every model here exposes them the same way:

- ``model.forward_features(x) -> (B, C, H, W)``;
- ``model.forward_head(feats) -> (B, K)`` (global average pooling, then ``model.classifier``);
- ``model.classifier``: the ``nn.Linear``; ``model.feature_dim``: ``C``.

Architectures: CIFAR-style ResNets (3x3 stem, no max-pool: resnet8/14/20/32 with widths
16-32-64, their x4 variants with 64-128-256, resnet18/34 with BasicBlocks and 64..512), a
MobileNetV2 and WRN-d-w for small inputs, and the torchvision classification models by their
torchvision name (families with a pooled linear head: ResNet/ResNeXt/Wide-ResNet, RegNet,
MobileNetV2, EfficientNet, DenseNet; other torchvision models build, but without feature access
only logit-only methods apply). ``build_model(name, num_classes, in_chans)`` builds any of them;
where a registry name is also a torchvision name (``resnet18``, ``resnet34``) the registry wins and
``torchvision/resnet18`` names torchvision's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = fn
        return fn

    return deco


class FeatureAccessError(ValueError):
    """The architecture does not expose a feature map + linear classifier (KD³ cannot use it)."""


class Backbone(nn.Module):
    """Base: subclasses set ``classifier`` and implement ``forward_features``."""

    classifier: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        custom = getattr(self, "_features", None)  # set by set_feature_access
        if custom is None:
            raise FeatureAccessError(f"{type(self).__name__} has no feature access")
        return custom(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(feats, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def feature_dim(self) -> int:
        return int(self.classifier.in_features)


# --------------------------------------------------------------------------------------------
# CIFAR-style ResNets
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(Backbone):
    """3x3 stem, no max-pool, ``len(widths)`` stages of BasicBlocks (the first at stride 1)."""

    def __init__(self, blocks: list[int], widths: list[int], stem: int, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, cin = [], stem
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            stage = [BasicBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            layers.append(nn.Sequential(*stage))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))  # (B, C, H/4, W/4) for 3 stages


def _cifar(depth_n: int, widths: list[int], stem: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
        return CifarResNet([depth_n] * len(widths), widths, stem, num_classes, in_chans)

    return build


for _name, _n in (("resnet8", 1), ("resnet14", 2), ("resnet20", 3), ("resnet32", 5)):
    register_model(_name)(_cifar(_n, [16, 32, 64], 16))
    register_model(f"{_name}x4")(_cifar(_n, [64, 128, 256], 32))


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], 64, num_classes, in_chans)


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet([3, 4, 6, 3], [64, 128, 256, 512], 64, num_classes, in_chans)


# --------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation blocks
# --------------------------------------------------------------------------------------------


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class WideResNet(Backbone):
    def __init__(self, depth: int, width: int, num_classes: int, in_chans: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            stages.append(nn.Sequential(*[WideBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1)
                                          for j in range(n)]))  # fmt: skip
            cin = w
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin)
        self.classifier = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.stages(self.conv1(x))))


for _d, _w in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10)):
    register_model(f"wrn_{_d}_{_w}")(
        lambda num_classes=10, in_chans=3, d=_d, w=_w: WideResNet(d, w, num_classes, in_chans)
    )


# --------------------------------------------------------------------------------------------
# MobileNetV2 for small inputs (stride 1 stem and first stages, as in the KD literature's CIFAR version)
# --------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_skip = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]  # fmt: skip
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_skip else self.block(x)


@register_model("mobilenetv2")
class MobileNetV2Small(Backbone):
    # (expansion, channels, repeats, stride); strides 1 where ImageNet uses 2, for 32x32 inputs
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> None:
        super().__init__()
        stem = int(32 * width)
        layers: list[nn.Module] = [nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(True)]
        cin = stem
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, int(c * width), s if i == 0 else 1, t))
                cin = int(c * width)
        last = 1280 if width <= 1.0 else int(1280 * width)
        layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# --------------------------------------------------------------------------------------------
# torchvision models, by their torchvision name
# --------------------------------------------------------------------------------------------


class TorchvisionModel(Backbone):
    """A torchvision classifier with the registry's feature access where its family allows it."""

    def __init__(self, name: str, num_classes: int, in_chans: int) -> None:
        super().__init__()
        import torchvision

        self.name = name
        self.net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        net = self.net
        self._features: Callable[[torch.Tensor], torch.Tensor] | None = None
        if hasattr(net, "layer4") and isinstance(getattr(net, "fc", None), nn.Linear):  # ResNet family
            self.classifier = net.fc
            if in_chans != 3:
                old = net.conv1
                net.conv1 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)

            def resnet_features(x: torch.Tensor) -> torch.Tensor:
                x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
                return net.layer4(net.layer3(net.layer2(net.layer1(x))))

            self._features = resnet_features
        elif hasattr(net, "trunk_output") and isinstance(getattr(net, "fc", None), nn.Linear):  # RegNet
            self.classifier = net.fc
            self._features = lambda x: net.trunk_output(net.stem(x))
        elif name.startswith(("mobilenet_v2", "efficientnet")) and isinstance(net.classifier[-1], nn.Linear):
            self.classifier = net.classifier[-1]
            self._features = net.features
        elif name.startswith("densenet"):
            self.classifier = net.classifier
            self._features = lambda x: F.relu(net.features(x))
        else:
            last = [m for m in net.modules() if isinstance(m, nn.Linear)]
            if not last:
                raise FeatureAccessError(f"torchvision model {name!r} has no linear classifier")
            self.classifier = last[-1]
        if in_chans != 3 and not hasattr(net, "layer4"):
            raise ValueError(f"torchvision model {name!r}: in_chans={in_chans} is only supported for ResNets")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self._features is None:
            raise FeatureAccessError(
                f"torchvision model {self.name!r} has no last feature map + linear head that KD3 can reach; "
                "logit-only methods (kd) still work"
            )
        return self._features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def set_feature_access(model: Backbone, feature_layer: str, classifier_layer: str, probe_size: int = 32) -> None:
    """Point ``forward_features`` / ``classifier`` at named submodules (teacher.feature_layer, ...).

    For networks whose defaults are not known. The pair must reproduce the logits as
    ``classifier(GAP(features))``, which is what KD³ relies on; this is checked on a random input.
    """
    try:
        feat_mod = model.get_submodule(feature_layer)
        head = model.get_submodule(classifier_layer)
    except AttributeError as e:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise FeatureAccessError(f"{e}; some module names of this model: {', '.join(names)}") from None
    if not isinstance(head, nn.Linear):
        raise FeatureAccessError(f"classifier_layer {classifier_layer!r} is a {type(head).__name__}, not nn.Linear")
    captured: dict[str, torch.Tensor] = {}

    def features(x: torch.Tensor) -> torch.Tensor:
        hook = feat_mod.register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))
        try:
            model.forward(x)
        finally:
            hook.remove()
        return captured.pop("f")

    model.classifier = head  # type: ignore[assignment]
    model._features = features  # type: ignore[attr-defined]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, model_in_chans(model), probe_size, probe_size)
        try:
            feats = features(x)
            same = feats.ndim == 4 and torch.allclose(model.forward_head(feats), model(x), atol=1e-3, rtol=1e-3)
        except RuntimeError:  # shapes that do not even fit together
            same = False
        if not same:
            raise FeatureAccessError(
                f"GAP({feature_layer}) -> {classifier_layer} does not reproduce the model's logits; KD3 needs the "
                "map that the final linear layer pools; logit-only methods (kd) still work"
            )
    model.train(was_training)


def model_in_chans(model: nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return int(first.in_channels)


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, num_classes: int, in_chans: int = 3) -> Backbone:
    """Any registry architecture, or a torchvision classification model by its name."""
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, in_chans=in_chans)  # type: ignore[return-value]
    tv_name = name.removeprefix("torchvision/")  # "torchvision/resnet18": torchvision's, not ours
    if tv_name in torchvision_names():
        return TorchvisionModel(tv_name, num_classes, in_chans)
    raise ValueError(f"unknown architecture {name!r}; registry: {', '.join(sorted(MODELS))}; or a torchvision name")
