"""CUDA paths of the trainer (deselected by default; ``benchmarks/gpu_check.sh`` runs them with ``-m gpu``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data import ImagePool
from distill.methods.kd3 import KD3Method
from distill.models import build_model
from distill.settings import Augment, Runtime, Schedule
from distill.teacher import Teacher
from distill.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    # pyproject turns every warning into an error; CUDA builds warn about things a CPU run never
    # reaches (TF32, pinned memory, kernel choices). Shown in the summary, they must not fail the
    # one short GPU run that checks the training paths.
    pytest.mark.filterwarnings("default"),
]


def trainer(images: np.ndarray, checkpoint: Path | None = None, budget: int = 1 << 30) -> Trainer:
    torch.manual_seed(0)
    teacher = Teacher(build_model("resnet14", 10), [0.5] * 3, [0.25] * 3)
    method = KD3Method(teacher, build_model("resnet8", 10), input_size=32)
    dev = torch.device("cuda")
    with torch.no_grad():
        logits = teacher.to(dev)(torch.from_numpy(images[:, 8:40, 8:40]).permute(0, 3, 1, 2).float().div(255).to(dev))
    schedule = Schedule(epochs=2, batch_size=64, lr=0.05)
    return Trainer(
        method,
        ImagePool(images, dev, budget),
        logits.cpu(),
        schedule=schedule,
        augment=Augment(size=32),
        runtime=Runtime(device=dev),
        seed=0,
        checkpoint=checkpoint,
        fingerprint="gpu",
    )


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (512, 48, 48, 3), dtype=np.uint8)


def test_resident_pool_bf16_channels_last(images: np.ndarray) -> None:
    t = trainer(images)
    assert t.pool.resident and t.pool.data is not None and t.pool.data.is_cuda
    history = t.fit()
    assert all(np.isfinite(r["loss"]) for r in history) and history[-1]["images_per_second"] > 0
    conv = t.method.student.backbone.conv1.weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)


def test_streaming_pool_matches_resident_selection(images: np.ndarray) -> None:
    t = trainer(images, budget=0)  # over budget: memmap -> pinned memory -> device, one batch ahead
    assert not t.pool.resident and t.pool.data is None
    assert np.isfinite(t.fit()[-1]["loss"])


def test_resume_on_cuda_continues_within_tolerance(images: np.ndarray, tmp_path: Path) -> None:
    full = trainer(images)
    full.fit()
    first = trainer(images, tmp_path / "ckpt.pt")
    first._run_epoch()
    resumed = trainer(images, tmp_path / "ckpt.pt")
    assert resumed.resumed and resumed.epoch == 1
    resumed.fit()
    a, b = full.history[-1]["loss"], resumed.history[-1]["loss"]
    assert abs(a - b) <= 0.05 * abs(a) + 1e-3
