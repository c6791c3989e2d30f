"""Registry of teacher and student architectures, all with the same feature access.

KD³ needs two things from every network: the last-stage feature map ``F(x)`` (before pooling,
after the final activation) and the final linear classifier ``h``, so that
``logits = h(GAP(F(x)))``. Every model here exposes them the same way:

- ``model.forward_features(x) -> (B, C, H, W)``;
- ``model.forward_head(feats) -> (B, K)`` (global average pooling, then ``model.classifier``);
- ``model.classifier``: the ``nn.Linear``; ``model.feature_dim``: ``C``.

Architectures: CIFAR-style ResNets (3x3 stem, no max-pool: resnet8/14/20/32 with widths
16-32-64, their x4 variants with 64-128-256, resnet18/34 with BasicBlocks and 64..512), a
MobileNetV2 and WRN-d-w for small inputs, and the torchvision classification models by their
torchvision name. ``build_model(name, num_classes, in_chans)`` builds any of them; where a
registry name is also a torchvision name (``resnet18``, ``resnet34``) the registry wins and
``torchvision/resnet18`` names torchvision's.

A torchvision model keeps torchvision's state-dict keys exactly, so the user's own
``torch.save(model.state_dict())`` loads by name. Feature access exists where the head really is
one linear layer after global average pooling: ResNet/ResNeXt/Wide-ResNet, RegNet, ShuffleNetV2,
MobileNetV2, MNASNet, EfficientNet (v1, v2), DenseNet, Swin, and ConvNeXt (whose head LayerNorm
is folded into the map, see ``_convnext_features``). MobileNetV3, MaxViT, VGG, AlexNet and
SqueezeNet (a non-linear head) and ViT (the class token) are logit-only: ``forward_features``
raises ``FeatureAccessError`` naming the methods that still work (kd, dfnd). The remaining
families (GoogLeNet, Inception v3) get access by naming their layers (``set_feature_access``).
``architectures_like`` names the architectures whose keys a checkpoint has, for error messages.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.overrides import TorchFunctionMode

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
            stages.append(
                nn.Sequential(
                    *[WideBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
                )
            )
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
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
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

# Why the logit-only torchvision families have no map that GAP + one linear layer turns into their logits.
LOGIT_ONLY = {
    "MobileNetV3": "its head is Linear -> Hardswish -> Dropout -> Linear after pooling, a non-linear MLP",
    "VisionTransformer": "it classifies the class token, not a pooled feature map",
    "MaxVit": "its head is LayerNorm -> Linear -> Tanh -> Linear after pooling, a non-linear MLP",
    "VGG": "its head is an MLP with ReLUs on the flattened map",
    "AlexNet": "its head is an MLP with ReLUs on the flattened map",
    "SqueezeNet": "its head is a convolution followed by ReLU, with no linear layer",
}


class TorchvisionModel(Backbone):
    """A torchvision classifier with torchvision's own state-dict layout and, by family, feature access.

    The wrapper shares the torchvision net's tables of submodules, parameters and buffers instead of
    holding the net as a submodule, so ``state_dict()`` has exactly the plain model's keys
    (``conv1.weight``, ``fc.bias``, ``classifier.1.weight``) and a checkpoint saved from
    ``torchvision.models.resnet18()`` loads by name. ``net`` (the torchvision module itself) and
    ``classifier`` (its final linear layer) are plain references, not registered submodules: a
    registered ``net`` would prefix every key with ``net.`` and a registered ``classifier`` would
    store the final layer twice. Checkpoints in that older layout are still accepted on load.
    """

    def __init__(self, name: str, num_classes: int, in_chans: int) -> None:
        super().__init__()
        import torchvision

        with warnings.catch_warnings():  # GoogLeNet and Inception announce a change of their random init
            warnings.filterwarnings("ignore", "The default weight initialization", FutureWarning)
            net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if in_chans != 3:
            if not isinstance(net, torchvision.models.ResNet):
                raise ValueError(f"torchvision model {name!r}: in_chans={in_chans} is only supported for ResNets")
            old = net.conv1
            net.conv1 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        self.name = name
        self.net = net
        for table in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, table, getattr(net, table))  # the same dicts: one set of weights, its keys
        object.__setattr__(self, "_version", net._version)  # the state-dict metadata torchvision's loaders read
        self.family, self.classifier = _torchvision_head(net)  # type: ignore[assignment]  # None: logit-only
        self._features: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by set_feature_access
        self.register_load_state_dict_pre_hook(_accept_prefixed_layout)

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("net", "classifier"):  # references into the shared tables, never submodules of their own
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)  # type: ignore[arg-type]

    def get_submodule(self, target: str) -> nn.Module:
        # by torchvision's names: ``classifier`` here is the final Linear, torchvision's may be a Sequential;
        # ``net.layer4`` (the names of the older wrapped layout) still resolves
        target = target.removeprefix("net.")
        return self.net.get_submodule(target) if target else self

    def train(self, mode: bool = True) -> TorchvisionModel:
        super().train(mode)
        self.net.training = mode  # the net's own flag, which some forwards read (Inception's auxiliary logits)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self._features is not None:
            return self._features(x)
        net, family = self.net, self.family
        if family == "resnet":
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            return net.layer4(net.layer3(net.layer2(net.layer1(x))))
        if family == "regnet":
            return net.trunk_output(net.stem(x))
        if family == "shufflenet":
            return net.conv5(net.stage4(net.stage3(net.stage2(net.maxpool(net.conv1(x))))))
        if family == "features":  # MobileNetV2, EfficientNet (v1 and v2)
            return net.features(x)
        if family == "mnasnet":
            return net.layers(x)
        if family == "densenet":
            return F.relu(net.features(x))
        if family == "swin":  # its LayerNorm acts on every position before pooling
            return net.permute(net.norm(net.features(x)))
        if family == "convnext":
            return _convnext_features(net, x)
        raise self._logit_only()

    @property
    def feature_dim(self) -> int:
        if self._features is None and self.family is None:
            raise self._logit_only()
        return int(self.classifier.in_features)

    def _logit_only(self) -> FeatureAccessError:
        why = LOGIT_ONLY.get(type(self.net).__name__, "kd3 does not know where this family's pooled map is")
        return FeatureAccessError(
            f"torchvision model {self.name!r} has no feature map that global average pooling and one linear layer "
            f"turn into its logits ({why}); KD3 cannot use it, the logit-only methods kd and dfnd can. If the "
            "model does have such a pair of layers, name them with teacher.feature_layer and teacher.classifier_layer"
        )


def _torchvision_head(net: nn.Module) -> tuple[str | None, nn.Linear | None]:
    """(family, final Linear) where ``classifier(GAP(forward_features(x)))`` reproduces the logits.

    Logit-only families get ``None`` and their last Linear (if any), which still tells how many
    outputs the model has. tests/test_torchvision_teachers.py checks every family numerically.
    """
    from torchvision import models as tv

    def seq_head(seq: nn.Module) -> nn.Linear | None:  # Sequential(Dropout, Linear), as torchvision builds it
        if not (isinstance(seq, nn.Sequential) and len(seq) == 2 and isinstance(seq[0], nn.Dropout)):
            return None
        return seq[1] if isinstance(seq[1], nn.Linear) else None

    if isinstance(net, tv.ResNet) and isinstance(net.fc, nn.Linear):  # also ResNeXt and Wide ResNet
        return "resnet", net.fc
    if isinstance(net, tv.RegNet) and isinstance(net.fc, nn.Linear):
        return "regnet", net.fc
    if isinstance(net, tv.ShuffleNetV2) and isinstance(net.fc, nn.Linear):
        return "shufflenet", net.fc
    if isinstance(net, (tv.MobileNetV2, tv.EfficientNet)) and seq_head(net.classifier) is not None:
        return "features", seq_head(net.classifier)
    if isinstance(net, tv.MNASNet) and seq_head(net.classifier) is not None:
        return "mnasnet", seq_head(net.classifier)
    if isinstance(net, tv.DenseNet) and isinstance(net.classifier, nn.Linear):
        return "densenet", net.classifier
    if isinstance(net, tv.SwinTransformer) and isinstance(net.head, nn.Linear):
        return "swin", net.head
    head = getattr(net, "classifier", None)
    if (
        isinstance(net, tv.ConvNeXt)
        and isinstance(head, nn.Sequential)
        and len(head) == 3
        and isinstance(head[0], nn.LayerNorm)
        and isinstance(head[2], nn.Linear)
    ):
        return "convnext", head[2]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return None, linears[-1] if linears else None


def _convnext_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ConvNeXt's last-stage map, put through the head's LayerNorm with the statistics of its pooled vector.

    The head is ``GAP -> LayerNorm -> Linear``. A LayerNorm of one vector is an affine map of it
    (per-sample mean and scale, per-channel weight and bias), and affine maps commute with global
    average pooling, so applying that same map to every position gives a map whose GAP is exactly
    the normalised pooled vector: ``Linear(GAP(map))`` are the logits, and the map keeps the last
    stage's spatial layout.
    """
    feats = net.features(x)  # type: ignore[operator]
    norm: nn.LayerNorm = net.classifier[0]  # type: ignore[index,assignment]
    pooled = feats.mean((2, 3), keepdim=True)
    mu = pooled.mean(1, keepdim=True)
    var = pooled.var(1, keepdim=True, unbiased=False)
    out = (feats - mu) * torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        out = out * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)  # elementwise_affine
    return out


def _accept_prefixed_layout(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
    """Load hook: rename a state dict in the layout older versions saved (``net.`` prefixes, ``classifier.*`` twice)."""
    if any(k.startswith(prefix + "net.") for k in state_dict):
        state_dict.update(
            strip_net_prefix({k: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}, prefix)
        )


def strip_net_prefix(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A TorchvisionModel state dict in the older wrapped layout -> torchvision's own layout.

    That layout held the net as ``net.*`` and repeated its final layer as ``classifier.weight`` and
    ``classifier.bias``; dicts without ``net.`` keys are returned unchanged.
    """
    net = prefix + "net."
    if not any(k.startswith(net) for k in tensors):
        return tensors
    alias = (prefix + "classifier.weight", prefix + "classifier.bias")
    return {(prefix + k.removeprefix(net) if k.startswith(net) else k): v for k, v in tensors.items() if k not in alias}


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

    model.classifier = head
    model._features = features  # type: ignore[assignment]
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


# --------------------------------------------------------------------------------------------
# which architecture does a state dict belong to?
# --------------------------------------------------------------------------------------------


class _MetaFactories(TorchFunctionMode):
    """Tensor factories without an explicit device build on ``meta``: a model's layout without its memory.

    Narrower than ``with torch.device("meta")``, which also moves the arithmetic some constructors
    do on real numbers (RegNet computes its widths with ``torch.arange(...).tolist()``).
    """

    FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=256)
def _layout(name: str, num_classes: int, in_chans: int) -> dict[str, tuple[int, ...]] | None:
    """``{key: shape}`` of ``build_model(name, ...)``'s state dict, built without allocating weights."""
    try:
        with _MetaFactories(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # initialisers on meta tensors may warn; nothing a user can act on
            model = build_model(name, num_classes, in_chans)
    except (ValueError, RuntimeError, NotImplementedError, TypeError):  # e.g. in_chans a family does not take
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _optional(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BatchNorm fills it in when a checkpoint lacks it


def architectures_like(
    shapes: dict[str, tuple[int, ...]], num_classes: int, in_chans: int = 3
) -> list[tuple[str, list[str]]]:
    """Architectures whose state dict has exactly these keys, as ``(arch, shape differences)``, best first.

    ``arch`` is spelled as ``teacher.arch`` takes it (``torchvision/resnet18`` where the registry
    has a ``resnet18`` of its own). Candidates are the registry and the torchvision families whose
    top-level module names are the checkpoint's (built on the meta device, so this costs no
    memory and well under a second); an empty list means no known architecture has these keys.
    """
    tops = {k.split(".", 1)[0] for k in shapes}
    names = list(MODELS)
    families: dict[str, list[str]] = {}
    for tv_name in torchvision_names():
        families.setdefault(re.split(r"[\d_]", tv_name, maxsplit=1)[0], []).append(tv_name)
    for members in families.values():  # one model per family decides whether the family is a candidate
        sample = _layout(members[0], num_classes, 3)
        if sample is not None and {k.split(".", 1)[0] for k in sample} == tops:
            names += [f"torchvision/{m}" if m in MODELS else m for m in members]
    wanted = {k for k in shapes if not _optional(k)}
    found = []
    for name in names:
        layout = _layout(name, num_classes, in_chans)
        if layout is None or {k for k in layout if not _optional(k)} != wanted or not set(shapes) <= set(layout):
            continue
        diffs = [f"{k} {tuple(shapes[k])} vs {layout[k]}" for k in shapes if tuple(shapes[k]) != layout[k]]
        found.append((name, diffs))
    return sorted(found, key=lambda t: len(t[1]))
