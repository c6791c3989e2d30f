"""The webly supervised baseline: the student learns the crawl queries, leaves unlabelled images out
and is configured like every other method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from demo.fashion_mnist import fashion_mnist_rgb32
from distill.data import ImagePool
from distill.methods import build_method
from distill.models import build_model
from distill.settings import Augment, Runtime, Schedule
from distill.teacher import Teacher
from distill.trainer import Trainer
from pipeline.config import DistillConfig, load_section

from conftest import synthetic_items


def test_the_student_learns_the_queries_and_skips_unlabelled_images() -> None:
    raw, labels = synthetic_items(24, 3)
    images = fashion_mnist_rgb32(raw)
    queries = labels.astype(np.int64).copy()
    queries[::6] = -1  # crawled for several classes: no label
    torch.manual_seed(0)
    teacher = Teacher(build_model("resnet8", 3), [0.3] * 3, [0.35] * 3)  # untrained: it must not matter
    student = build_model("resnet8", 3)
    method = build_method("query_ce", teacher, student, num_classes=3, input_size=32, in_chans=3)
    with torch.no_grad():
        t_logits = teacher(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    trainer = Trainer(
        method,
        ImagePool(images, torch.device("cpu")),
        t_logits,
        schedule=Schedule(epochs=6, batch_size=12, lr=0.05),
        augment=Augment(size=32, crop_scale=(0.8, 1.0)),
        runtime=Runtime(),
        seed=0,
        queries=queries,
        fingerprint="query_ce",
    )
    history = trainer.fit()
    kept, _ = trainer.last_selection  # type: ignore[misc]
    assert kept.sum() == (queries >= 0).sum() and not kept[queries < 0].any()
    assert history[-1]["ce"] < history[0]["ce"]
    student.eval()
    with torch.no_grad():
        pred = student(teacher.normalise(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)).argmax(1)
    assert float((pred.numpy() == labels).mean()) > 0.6  # 3 classes: chance is 0.33
    assert "no teacher" in method.describe()


def test_without_any_single_query_it_says_so() -> None:
    teacher = Teacher(build_model("resnet8", 3), [0.3] * 3, [0.35] * 3)
    method = build_method("query_ce", teacher, build_model("resnet8", 3), num_classes=3, input_size=32, in_chans=3)
    with pytest.raises(ValueError, match="no image has a single crawl query"):
        method.select(0, 1, torch.zeros(4, 3), None, torch.full((4,), -1))


def test_it_is_a_params_section_like_the_other_methods(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("distill:\n  method: query_ce\n  query_ce: {label_smoothing: 0.1}\n")
    cfg = load_section(p, "distill", DistillConfig)
    assert cfg.method == "query_ce" and cfg.options.label_smoothing == 0.1
