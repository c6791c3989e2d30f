"""KD³'s student wiring and loss module (KD3_SPEC.md sections 2 and 4).

- ``Projector``: SimKD-style ``conv1x1 → BN → ReLU → conv3x3 → BN → ReLU → conv1x1 → BN → ReLU``
  from the student's last-stage width to the teacher's (width C_t/2 inside, no conv biases).
- ``KD3Student``: backbone + projector + the teacher's final linear layer, copied and frozen
  (classifier sharing), plus the 128-d contrastive head ``g_S``. Its logits are
  ``h_T(GAP(P(F_S(x))))`` in training, selection and at test time; the deployed student is this
  module minus the head. With ``shared_classifier=False`` (the ablation) the student trains its
  own linear layer on the same pooled projection instead.
- ``KD3Loss``: ``L = w_fa · L_WFA + λ_mix · L_ins``, a dict of named terms; zero-weight terms are
  skipped. With ``feature_weighting=False`` the per-sample weights are 1 (plain MSE); with
  ``mixdistribution=False`` there is no perturbed view and no instance term.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from distill.losses import feature_align, instance_align
from distill.models import Backbone


class Projector(nn.Module):
    def __init__(self, c_student: int, c_teacher: int) -> None:
        super().__init__()
        mid = max(1, c_teacher // 2)
        self.net = nn.Sequential(
            nn.Conv2d(c_student, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_teacher, 1, bias=False), nn.BatchNorm2d(c_teacher), nn.ReLU(inplace=True),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastiveHead(nn.Module):
    """``g(z) = normalize(A z + a)``, 128-d."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.fc = nn.Linear(dim_in, dim_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(z), dim=1)


class KD3Student(nn.Module):
    """Student backbone + projector + shared (frozen) teacher classifier + contrastive head."""

    def __init__(
        self, backbone: Backbone, teacher_classifier: nn.Linear, teacher_channels: int, teacher_hw: int,
        shared_classifier: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.teacher_hw = teacher_hw
        self.projector = Projector(backbone.feature_dim, teacher_channels)
        self.classifier = copy.deepcopy(teacher_classifier)
        if shared_classifier:
            for p in self.classifier.parameters():
                p.requires_grad_(False)  # h_T is reused, never updated
        else:
            self.classifier.reset_parameters()  # ablation: the student's own classifier
        self.head = ContrastiveHead(teacher_channels)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``P(F_S(x))`` after spatial alignment: (B, C_t, h, w) with h <= teacher_hw."""
        f = self.backbone.forward_features(x)
        if f.shape[-1] > self.teacher_hw:  # a larger student map is pooled to the teacher's size
            f = F.adaptive_avg_pool2d(f, self.teacher_hw)
        return self.projector(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.project(x), 1), 1))

    def parts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the loss needs from one view: projected map, logits and embedding."""
        projected = self.project(x)
        z = torch.flatten(F.adaptive_avg_pool2d(projected, 1), 1)
        return {"projected": projected, "logits": self.classifier(z), "embedding": self.head(z)}


class KD3Loss(nn.Module):
    """Named, weighted KD³ terms; ``forward`` returns ``{"loss": total, <term>: value, ...}``."""

    def __init__(self, feature_weight: float = 1.0, mix_weight: float = 0.001, temperature: float = 0.3,
                 feature_weighting: bool = True, mixdistribution: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.feature_weight, self.mix_weight, self.temperature = feature_weight, mix_weight, temperature
        self.feature_weighting, self.mixdistribution = feature_weighting, mixdistribution

    def describe(self) -> str:
        w = "sigmoid(‖o_S − o_T‖₂)" if self.feature_weighting else "1"
        terms = [f"{self.feature_weight:g} · mean({w} · (P(F_S) − F_T)²)"]
        if self.mixdistribution and self.mix_weight:
            terms.append(f"{self.mix_weight:g} · NT-Xent(g_S(x), g_S(MixDistribution(x)); t={self.temperature:g})")
        return "L = " + " + ".join(terms)

    def forward(
        self, clean: dict[str, torch.Tensor], mixed: dict[str, torch.Tensor] | None, teacher_map: torch.Tensor,
        teacher_logits: torch.Tensor,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        projected = clean["projected"]
        if teacher_map.shape[-1] > projected.shape[-1]:  # the teacher map is pooled to the student's size
            teacher_map = F.adaptive_avg_pool2d(teacher_map, projected.shape[-2:])
        if self.feature_weighting:
            fa = feature_align(projected, teacher_map, clean["logits"], teacher_logits)
        else:
            fa = feature_align(projected, teacher_map)  # w = 1
        out = {"feature_align": fa}
        total = self.feature_weight * out["feature_align"]
        if self.mixdistribution and self.mix_weight and mixed is not None:
            out["instance_align"] = instance_align(clean["embedding"], mixed["embedding"], self.temperature)
            total = total + self.mix_weight * out["instance_align"]
        return {"loss": total, **out}
