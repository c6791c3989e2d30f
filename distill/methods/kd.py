"""Hinton KD, the first baseline: ``T² · KL(softmax(o_T/T) ‖ softmax(o_S/T))`` on every pool image.

The student has its own classifier. With ``query_prior`` > 0 (ours) the target is the teacher's
distribution times the crawl query's prior (docs/method.md, "The query prior").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.losses import kd_logit, query_log_prior
from distill.methods import register_method
from distill.teacher import Teacher
from distill.trainer import Method
from kd3util import knob


@dataclass(frozen=True)
class KDOptions:
    """``distill.kd`` in params."""

    temperature: float = knob(4.0, 0, lo_open=True)
    query_prior: float = knob(0.0, 0, 0.999)  # ours: ρ, the crawl query as a prior on the KD target (0: off)


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
        self.temperature, self.query_prior = options.temperature, options.query_prior

    def describe(self) -> str:
        prior = f" with the query prior ρ={self.query_prior:g}" if self.query_prior else ""
        return f"L = KD(o_S, o_T; T={self.temperature:g}){prior} on every image"

    def forward(
        self, x01: torch.Tensor, generator: torch.Generator | None = None, queries: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t_logits = self.teacher(x01).float()
        prior = None
        if self.query_prior and queries is not None:
            prior = query_log_prior(queries, t_logits.shape[1], self.query_prior)
        kd = kd_logit(self.student(self.teacher.normalise(x01)).float(), t_logits, self.temperature, prior)
        return {"loss": kd, "kd": kd}
