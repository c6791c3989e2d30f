"""KD³'s student wiring and loss module.

- ``Projector``: SimKD-style ``conv1x1 → BN → ReLU → conv3x3 → BN → ReLU → conv1x1 → BN → ReLU``
  from the student's last-stage width to the teacher's (width C_t/2 inside, no conv biases).
- ``KD3Student``: backbone + projector + the teacher's final linear layer, copied and frozen
  (classifier sharing), plus the 128-d contrastive head ``g_S`` (only with a non-zero instance term).
  Its logits are ``h_T(GAP(P(F_S(x))))`` in training, selection and at test time; the deployed
  student is this module minus the head. With ``shared_classifier=False`` (the ablation) the
  student trains its own linear layer on the same pooled projection instead. The backbone's own
  classifier stays in the module but frozen: no loss reaches it (DDP needs every trainable
  parameter to get a gradient).
- ``KD3Loss``: ``L = w_fa · L_WFA + λ_mix · L_ins``, a dict of named terms; zero-weight terms are
  skipped. With ``feature_weighting=False`` the per-sample weights are 1 (plain MSE); with
  ``mixdistribution=False`` there is no perturbed view and no instance term.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from distill.label import LabelPrior
from distill.losses import (
    alpha_schedule,
    feature_align,
    instance_align,
    kd_logit,
    mix_distribution,
    select_instances,
)
from distill.methods import register_method
from distill.models import Backbone
from distill.teacher import Teacher
from distill.trainer import Method
from kd3util import knob


@dataclass(frozen=True)
class KD3Options:
    """``distill.kd3`` in params: KD³'s components, each switch an ablation, and our two additions."""

    selection: bool = True  # per-epoch dynamic instance selection (off: every image, every epoch)
    shared_classifier: bool = True  # reuse the teacher's frozen classifier (off: own classifier + KD, T=4)
    feature_weighting: bool = True  # sigmoid(‖o_S − o_T‖) sample weights (off: plain MSE)
    mixdistribution: bool = True  # MixDistribution + NT-Xent instance alignment (off: no second view)
    tau: float = knob(0.95, 0, 1)  # selection confidence threshold
    adaptive_thresholds: bool = True  # class-adaptive τ·β/(2−β) (off: τ for every class)
    selection_view: Literal["clean", "augmented"] = "clean"  # clean: cached teacher logits, half the cost
    feature_weight: float = knob(1.0, 0)  # weight of the feature alignment term
    mix_weight: float = knob(0.001, 0)  # λ_mix
    temperature: float = knob(0.3, 0, lo_open=True)  # NT-Xent temperature
    kd_weight: float = knob(0.0, 0)  # ours, off in the paper: Hinton KD (T=4) on the shared-classifier logits
    query_prior: float = knob(0.0, 0, 0.999)  # ours: ρ, the crawl query as a prior on the label (0: off)
    label_model: Literal["fixed", "annotators"] = "fixed"  # ours: how KD targets and selection combine
    # the teacher and the crawl query: "fixed", the prior ρ above; "annotators", a model of both labels'
    # per-class reliability fitted on the pool when training starts (query_prior unused)
    contrastive_head: Literal["projector", "backbone"] = "projector"  # g_S's input: the pooled projector
    # output, the projector running on both views (ours), or the pooled backbone feature, the projector
    # on the clean view only (the released code)
    alpha_schedule: Literal["scaled", "released", "teacher"] = "scaled"  # the selection's teacher weight α
    # over the epochs: "scaled" stretches the released ramp (160 of 240 epochs, cut at 120) to the run's
    # length; "released" keeps those constants (a short run then keeps α ≈ 1); "teacher": α = 1 throughout


class Projector(nn.Module):
    def __init__(self, c_student: int, c_teacher: int) -> None:
        super().__init__()
        mid = max(1, c_teacher // 2)
        self.net = nn.Sequential(
            nn.Conv2d(c_student, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_teacher, 1, bias=False),
            nn.BatchNorm2d(c_teacher),
            nn.ReLU(inplace=True),
        )

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
        self,
        backbone: Backbone,
        teacher_classifier: nn.Linear,
        teacher_channels: int,
        teacher_hw: int,
        shared_classifier: bool = True,
        contrastive: bool = True,
        head_on: str = "projector",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        for p in backbone.classifier.parameters():  # the logits come from self.classifier: the backbone's own
            p.requires_grad_(False)  # head is never reached by a loss (DDP fails on trainable parameters it is not)
        self.teacher_hw = teacher_hw
        self.projector = Projector(backbone.feature_dim, teacher_channels)
        self.classifier = copy.deepcopy(teacher_classifier)
        if shared_classifier:
            for p in self.classifier.parameters():
                p.requires_grad_(False)  # h_T is reused, never updated
        else:  # ablation: the student's own classifier (the copy came frozen from the teacher)
            self.classifier.reset_parameters()
            for p in self.classifier.parameters():
                p.requires_grad_(True)
        # g_S, for instance alignment: only when that term is on (an unused trainable head fails DDP)
        self.head_on = head_on
        dim = teacher_channels if head_on == "projector" else backbone.feature_dim
        self.head = ContrastiveHead(dim) if contrastive else None

    def _align(self, f: torch.Tensor) -> torch.Tensor:
        """``P(F_S)`` after spatial alignment: (B, C_t, h, w) with h <= teacher_hw."""
        if f.shape[-1] > self.teacher_hw:  # a larger student map is pooled to the teacher's size
            f = F.adaptive_avg_pool2d(f, self.teacher_hw)
        return self.projector(f)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self._align(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(_pool(self.project(x)))

    def parts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the loss needs from the clean view: projected map, logits and embedding."""
        f = self.backbone.forward_features(x)
        projected = self._align(f)
        z = _pool(projected)
        out = {"projected": projected, "logits": self.classifier(z)}
        if self.head is not None:
            out["embedding"] = self.head(z if self.head_on == "projector" else _pool(f))
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """g_S of the perturbed view, which feeds the instance term only (no projector with "backbone")."""
        assert self.head is not None
        f = self.backbone.forward_features(x)
        return self.head(_pool(self._align(f)) if self.head_on == "projector" else _pool(f))


def _confidence(
    alpha: float, teacher_logits: torch.Tensor, student_logits: torch.Tensor, clean: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, ŷ): max and argmax of softmax(α·o_T + (1−α)·o_S), c scaled by P(not junk) when given."""
    conf, pred = torch.softmax(alpha * teacher_logits + (1 - alpha) * student_logits, dim=1).max(1)
    return (conf if clean is None else conf * clean), pred


def _pool(f: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)


class KD3Loss(nn.Module):
    """Named, weighted KD³ terms; ``forward`` returns ``{"loss": total, <term>: value, ...}``."""

    kd_temperature = 4.0  # Hinton's T for the optional KD term on the shared-classifier logits

    def __init__(self, options: KD3Options = KD3Options()) -> None:  # noqa: B008 (frozen)
        super().__init__()
        o = options
        self.feature_weight, self.mix_weight, self.temperature = o.feature_weight, o.mix_weight, o.temperature
        self.feature_weighting, self.mixdistribution = o.feature_weighting, o.mixdistribution
        self.kd_weight = o.kd_weight

    def describe(self) -> str:
        w = "sigmoid(‖o_S − o_T‖₂)" if self.feature_weighting else "1"
        terms = [f"{self.feature_weight:g} · mean({w} · (P(F_S) − F_T)²)"]
        if self.mixdistribution and self.mix_weight:
            terms.append(f"{self.mix_weight:g} · NT-Xent(g_S(x), g_S(MixDistribution(x)); t={self.temperature:g})")
        if self.kd_weight:
            terms.append(f"{self.kd_weight:g} · KD(o_S, o_T; T={self.kd_temperature:g})")
        return "L = " + " + ".join(terms)

    def forward(
        self,
        clean: dict[str, torch.Tensor],
        mixed: dict[str, torch.Tensor] | None,
        teacher_map: torch.Tensor,
        teacher_logits: torch.Tensor,
        log_prior: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        projected = clean["projected"]
        if teacher_map.shape[-1] > projected.shape[-1]:  # the teacher map is pooled to the student's size
            teacher_map = F.adaptive_avg_pool2d(teacher_map, (projected.shape[-2], projected.shape[-1]))
        if self.feature_weighting:
            fa = feature_align(projected, teacher_map, clean["logits"], teacher_logits)
        else:
            fa = feature_align(projected, teacher_map)  # w = 1
        out = {"feature_align": fa}
        total = self.feature_weight * out["feature_align"]
        if self.mixdistribution and self.mix_weight and mixed is not None:
            out["instance_align"] = instance_align(clean["embedding"], mixed["embedding"], self.temperature)
            total = total + self.mix_weight * out["instance_align"]
        if self.kd_weight:
            out["kd"] = kd_logit(clean["logits"], teacher_logits, self.kd_temperature, log_prior, weight)
            total = total + self.kd_weight * out["kd"]
        return {"loss": total, **out}


@register_method("kd3", KD3Options)
class KD3Method(Method):
    """KD³ as the paper and docs/method.md describe it, every component behind a switch.

    Switched off, a component is replaced by: ``selection`` -> every pool row, every epoch;
    ``shared_classifier`` -> the student's own linear layer, trained by Hinton KD (T=4) since no
    KD³ term reaches a classifier; ``feature_weighting`` -> w = 1 (plain MSE);
    ``mixdistribution`` -> no perturbed view and no instance term.
    """

    student: KD3Student
    loss_fn: KD3Loss

    def __init__(
        self,
        teacher: Teacher,
        backbone: Backbone,
        options: KD3Options = KD3Options(),  # noqa: B008 (frozen)
        *,
        input_size: int,
        in_chans: int = 3,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        o = options
        c_t, hw = teacher.feature_shape(input_size, in_chans)
        self.teacher = teacher
        contrastive = o.mixdistribution and o.mix_weight > 0
        self.student = KD3Student(
            backbone, teacher.classifier, c_t, hw, o.shared_classifier, contrastive, o.contrastive_head
        )
        if not o.shared_classifier and not o.kd_weight:  # the student's own classifier needs a KD signal
            o = replace(o, kd_weight=1.0)
        self.loss_fn = KD3Loss(o)
        self.selection, self.tau, self.adaptive_thresholds = o.selection, o.tau, o.adaptive_thresholds
        self.selection_view = o.selection_view
        self.alpha_mode = o.alpha_schedule
        self.label_prior = LabelPrior(o.label_model, o.query_prior)

    def describe(self) -> str:
        sel = "dynamic selection" if self.selection else "no selection"
        where = "selection and KD targets" if self.selection else "KD targets"
        prior = self.label_prior.describe()
        return f"{self.loss_fn.describe()}; {sel}" + (f"; {prior} in {where}" if prior else "")

    def prepare(self, teacher_logits: torch.Tensor, queries: torch.Tensor) -> None:
        self.label_prior.fit(teacher_logits, queries)

    def needs_student_logits(self, epoch: int) -> bool:
        return self.selection

    def select(
        self,
        epoch: int,
        epochs: int,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.selection or student_logits is None:
            return super().select(epoch, epochs, teacher_logits, student_logits)
        alpha = self.alpha(epoch, epochs)
        teacher_logits, student_logits, clean = self._with_prior(teacher_logits, student_logits, queries)
        if self.adaptive_thresholds:
            return select_instances(teacher_logits, student_logits, alpha, self.tau, clean)
        conf, pred = _confidence(alpha, teacher_logits, student_logits, clean)
        return conf > self.tau, pred

    def selection_confidence(
        self,
        epoch: int,
        epochs: int,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """c = max softmax(α·o_T + (1−α)·o_S), the confidence the thresholds compare (with the prior when on)."""
        if not self.selection or student_logits is None:
            return super().selection_confidence(epoch, epochs, teacher_logits, student_logits, queries)
        teacher_logits, student_logits, clean = self._with_prior(teacher_logits, student_logits, queries)
        return _confidence(self.alpha(epoch, epochs), teacher_logits, student_logits, clean)[0]

    def alpha(self, epoch: int, epochs: int) -> float:
        """The teacher's weight α in the selection's combined logits at the 0-based ``epoch``."""
        if self.alpha_mode == "teacher":
            return 1.0
        return alpha_schedule(epoch, epochs, released=self.alpha_mode == "released")

    def _with_prior(
        self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, queries: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Ours: both views of the posterior given the crawl query (the fixed prior or the annotator
        model), and with the annotator model each row's P(not junk), which scales its confidence."""
        prior, clean = self.label_prior.selection(teacher_logits, queries)
        if prior is None:
            return teacher_logits, student_logits, clean
        return teacher_logits + prior, student_logits + prior, clean

    def forward(
        self, x01: torch.Tensor, generator: torch.Generator | None = None, queries: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t_map, t_logits = self.teacher.features_and_logits(x01)
        x = self.teacher.normalise(x01)
        clean = self.student.parts(x)
        mixed = None
        if self.student.head is not None:  # the perturbed view feeds the instance term only
            mixed = {"embedding": self.student.embed(mix_distribution(x, generator))}
        prior, weight = None, None
        if self.loss_fn.kd_weight:  # the only term with a target to shape
            prior, weight = self.label_prior.kd(t_logits.float(), queries)
        return self.loss_fn(clean, mixed, t_map.float(), t_logits.float(), prior, weight)
