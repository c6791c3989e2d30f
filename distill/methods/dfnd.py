"""DFND (Chen et al., CVPR 2021), the second baseline, on the same data, models and schedule.

One-shot selection by the teacher alone: keep the ``keep`` fraction of the pool with the lowest
``−log max softmax(o_T)`` on the clean view. Then KD plus noise adaptation
``NLL(log(softmax(o_S) Q), argmax o_T)``, with ``Q``'s diagonal fixed to the teacher's assumed
accuracy and learnable off-diagonal logits ``θ`` (Adam, lr 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.losses import kd_logit, noise_adapt, transition_matrix
from distill.methods import register_method
from distill.teacher import Teacher
from distill.trainer import Method
from kd3util import knob


@dataclass(frozen=True)
class DFNDOptions:
    """``distill.dfnd`` in params."""

    keep: float = knob(0.47, 0, 1, lo_open=True)  # fraction of the pool kept by teacher confidence (600k/1.28M)
    accuracy: float = knob(0.9, 0, 1)  # the teacher's assumed accuracy on its own data: diag of Q
    theta_lr: float = knob(1e-3, 0, lo_open=True)  # Adam lr for Q's off-diagonal logits
    temperature: float = knob(4.0, 0, lo_open=True)


@register_method("dfnd", DFNDOptions)
class DFNDMethod(Method):
    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        options: DFNDOptions = DFNDOptions(),  # noqa: B008 (frozen)
        *,
        num_classes: int,
        input_size: int = 0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        o = options
        self.teacher, self.student, self.temperature = teacher, student, o.temperature
        self.keep, self.accuracy, self.theta_lr = o.keep, o.accuracy, o.theta_lr
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
