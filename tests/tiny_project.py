"""A tiny project as the stages before distill leave it: teacher, clean and label outputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from demo.fashion_mnist import fashion_mnist_rgb32
from distill.models import build_model
from distill.supervised import train_classifier
from pipeline import label_stage, teacher_stage
from pipeline.artifacts.clean import CleanSet
from pipeline.config import LabelConfig, TeacherConfig

from conftest import TINY_CLASSES, synthetic_items


def build_stage_inputs(root: Path, teacher_epochs: int = 3) -> Path:
    """A teacher record, a packed pool of 96 images and its labels, and an eval folder under ``root``:
    what the clean, teacher and label stages leave for distill. ``teacher_epochs: 0`` keeps the
    teacher untrained (most of the cost), for tests that only need the stages' outputs to exist."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(TINY_CLASSES) + "\n")
    images, labels = synthetic_items(32, 3)
    pool = fashion_mnist_rgb32(images)
    torch.manual_seed(0)
    teacher = build_model("resnet8", 3)
    cfg = TeacherConfig(
        checkpoint=str(root / "teacher.pt"),
        classes=str(root / "classes.txt"),
        out_dir=str(root / "teacher"),
        device="cpu",
    )
    if teacher_epochs:
        train_classifier(
            teacher,
            pool,
            labels,
            mean=cfg.mean,
            std=cfg.std,
            input_size=32,
            epochs=teacher_epochs,
            batch_size=32,
            lr=0.05,
            weight_decay=0.0,
            seed=0,
            device=torch.device("cpu"),
        )
    torch.save(teacher.state_dict(), root / "teacher.pt")
    teacher_stage.run(cfg)
    (root / "clean").mkdir()
    np.save(root / "clean" / "images.npy", pool)
    keys = [hashlib.sha256(im.tobytes() + bytes([i])).hexdigest() for i, im in enumerate(pool)]
    kept = [
        {
            "sha256": k,
            "path": f"objects/{k}.png",
            "class_name": TINY_CLASSES[c],
            "class_index": int(c),
            "classes": [TINY_CLASSES[c]],
        }
        for k, c in zip(keys, labels, strict=True)
    ]
    CleanSet.save_index(root / "clean", kept, {"kept": len(kept)}, TINY_CLASSES)
    label_stage.run(
        LabelConfig(
            clean_dir=str(root / "clean"), teacher_dir=str(root / "teacher"), out_dir=str(root / "label"), device="cpu"
        )
    )
    for k, name in enumerate(TINY_CLASSES):
        d = root / "eval" / name.replace("/", "_")
        d.mkdir(parents=True)
        for i in np.flatnonzero(labels == k)[:4]:
            Image.fromarray(pool[i]).save(d / f"{i}.png")
    return root
