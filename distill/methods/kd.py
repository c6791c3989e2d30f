"""Hinton KD, the first baseline: ``T² · KL(softmax(o_T/T) ‖ softmax(o_S/T))`` on every pool image.

The student has its own classifier. Ours: with ``query_prior`` > 0 the target is the teacher's
distribution times the crawl query's prior; with ``label_model: annotators`` it comes from a model of
how often the teacher and the query are right, fitted on the pool, and junk counts less (docs/method.md,
"The teacher and the crawl query as two annotators").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from distill.label import LabelPrior
from distill.losses import kd_logit
from distill.methods import register_method
from distill.teacher import Teacher
from distill.trainer import Method
from kd3util import knob


@dataclass(frozen=True)
class KDOptions:
    """``distill.kd`` in params."""

    temperature: float = knob(4.0, 0, lo_open=True)
    query_prior: float = knob(0.0, 0, 0.999)  # ours: ρ, the crawl query as a prior on the KD target (0: off)
    label_model: Literal["fixed", "annotators"] = "fixed"  # ours: "fixed", the prior ρ above; "annotators",
    # the teacher and the query as two annotators whose reliability is fitted on the pool (query_prior unused)


@register_method("kd", KDOptions)
class KDMethod(Method):
    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        options: KDOptions = KDOptions(),  # noqa: B008 (frozen)
        *,
        num_classes: int = 0,
        input_size: int = 0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.teacher, self.student = teacher, student
        self.temperature = options.temperature
        self.label_prior = LabelPrior(options.label_model, options.query_prior)

    def describe(self) -> str:
        prior = self.label_prior.describe()
        return f"L = KD(o_S, o_T; T={self.temperature:g})" + (f" with the {prior}" if prior else "") + " on every image"

    def prepare(self, teacher_logits: torch.Tensor, queries: torch.Tensor) -> None:
        self.label_prior.fit(teacher_logits, queries)

    def forward(
        self, x01: torch.Tensor, generator: torch.Generator | None = None, queries: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t_logits = self.teacher(x01).float()
        prior, weight = self.label_prior.kd(t_logits, queries)
        kd = kd_logit(self.student(self.teacher.normalise(x01)).float(), t_logits, self.temperature, prior, weight)
        return {"loss": kd, "kd": kd}
