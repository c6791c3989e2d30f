"""The baselines KD³ is measured against, on the same data, models and schedule.

- ``KDMethod``: Hinton KD, ``T² · KL(softmax(o_T/T) ‖ softmax(o_S/T))`` with T = 4, on every
  pool image, the student with its own classifier.
- ``DFNDMethod`` (Chen et al., CVPR 2021): one-shot selection by the teacher alone (keep the
  ``keep`` fraction with the lowest ``−log max softmax(o_T)`` on the clean view), then
  KD + noise adaptation ``NLL(log(softmax(o_S) Q), argmax o_T)`` with ``Q``'s diagonal fixed to the
  teacher's assumed accuracy and learnable off-diagonal logits ``θ`` (Adam, lr 1e-3).
"""

from __future__ import annotations

import torch
from torch import nn

from distill.losses import kd_logit, noise_adapt, query_log_prior, transition_matrix
from distill.teacher import Teacher
from distill.trainer import Method


class KDMethod(Method):
    name = "kd"

    def __init__(
        self, teacher: Teacher, student: nn.Module, temperature: float = 4.0, query_prior: float = 0.0
    ) -> None:
        super().__init__()
        self.teacher, self.student, self.temperature, self.query_prior = teacher, student, temperature, query_prior

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


class DFNDMethod(Method):
    name = "dfnd"

    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        num_classes: int,
        *,
        keep: float = 0.47,
        accuracy: float = 0.9,
        theta_lr: float = 1e-3,
        temperature: float = 4.0,
    ) -> None:
        super().__init__()
        self.teacher, self.student, self.temperature = teacher, student, temperature
        self.keep, self.accuracy, self.theta_lr = keep, accuracy, theta_lr
        self.theta = nn.Parameter(torch.zeros(num_classes, num_classes))

    def describe(self) -> str:
        return (
            f"L = KD(o_S, o_T; T={self.temperature:g}) + NLL(log(softmax(o_S) Q), argmax o_T), "
            f"diag Q = {self.accuracy:g}; teacher top-{self.keep:.0%} selection once"
        )

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]  # θ has its own optimizer

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam([self.theta], lr=self.theta_lr)]

    def select(
        self,
        epoch: int,
        epochs: int,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        score = -torch.log_softmax(teacher_logits, 1).max(1).values  # −log max p_T: low is confident
        n_keep = max(1, round(self.keep * len(score)))
        mask = torch.zeros(len(score), dtype=torch.bool)
        mask[torch.argsort(score, stable=True)[:n_keep]] = True
        return mask, teacher_logits.argmax(1)

    def forward(
        self, x01: torch.Tensor, generator: torch.Generator | None = None, queries: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t_logits = self.teacher(x01).float()
        s_logits = self.student(self.teacher.normalise(x01)).float()
        kd = kd_logit(s_logits, t_logits, self.temperature)
        na = noise_adapt(s_logits, t_logits.argmax(1), transition_matrix(self.theta, self.accuracy))
        return {"loss": kd + na, "kd": kd, "noise_adapt": na}
