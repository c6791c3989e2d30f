"""The webly supervised baseline: the student trained on the crawl query alone, with no teacher.

Each web image's label is the class it was crawled for; an image crawled for several classes
(query -1) has no label and is left out. Beside KD, DFND and KD³ it answers the question a reader
asks first: what does the teacher add over the labels the crawl already gives?
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from distill.methods import register_method
from distill.teacher import Teacher
from distill.trainer import Method
from kd3util import knob


@dataclass(frozen=True)
class QueryCEOptions:
    """``distill.query_ce`` in params."""

    label_smoothing: float = knob(0.0, 0, 0.5)  # the query is a noisy label: smoothing softens it


@register_method("query_ce", QueryCEOptions)
class QueryCEMethod(Method):
    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        options: QueryCEOptions = QueryCEOptions(),  # noqa: B008 (frozen)
        *,
        num_classes: int = 0,
        input_size: int = 0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.teacher, self.student = teacher, student  # the teacher only normalises the input
        self.label_smoothing = options.label_smoothing

    def describe(self) -> str:
        smooth = f", label smoothing {self.label_smoothing:g}" if self.label_smoothing else ""
        return f"L = CE(o_S, crawl query){smooth} on every image crawled for one class; no teacher"

    def select(
        self,
        epoch: int,
        epochs: int,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if queries is None or not bool((queries >= 0).any()):
            raise ValueError("method query_ce: no image has a single crawl query (the clean set records none)")
        labelled = queries >= 0
        return labelled, torch.where(labelled, queries, teacher_logits.argmax(1))

    def forward(
        self, x01: torch.Tensor, generator: torch.Generator | None = None, queries: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if queries is None:
            raise ValueError("method query_ce: the trainer passed no crawl queries")
        logits = self.student(self.teacher.normalise(x01)).float()
        # unlabelled rows (a top-up when fewer than a batch are labelled) add nothing; no host sync
        total = F.cross_entropy(logits, queries, ignore_index=-1, reduction="sum", label_smoothing=self.label_smoothing)
        ce = total / (queries >= 0).sum().clamp_min(1)
        return {"loss": ce, "ce": ce}
