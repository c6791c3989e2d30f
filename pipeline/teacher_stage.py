"""Stage ``teacher``: validate the user's checkpoint, or train the demo teacher; write a teacher record.

The record (``teacher.json``) says everything later stages need: format, architecture, class
names in output order, input size, mean/std and the SHA-256 of the checkpoint. DVC runs this
stage on every ``repro`` (``always_changed``), which costs a hash of the file: when the checkpoint
is unchanged the record is byte-identical and nothing downstream re-runs; when it changed, exactly
the stages downstream of it do. With ``checkpoint: null`` the demo teacher is trained on
Fashion-MNIST train[0:30000] (rendered as 28x28 grey padded to 32x32, replicated to RGB) and kept
between runs while its settings are unchanged; with a real checkpoint no Fashion-MNIST is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from crawl.classes import read_classes
from demo.fashion_mnist import fashion_mnist_rgb32, load_fashion_mnist
from distill.data import resolve_device
from distill.models import build_model
from distill.supervised import train_classifier
from distill.teacher import load_teacher
from kd3util import atomic_path, sha256_file, sigterm_as_interrupt
from pipeline.artifacts.teacher import TeacherRecord
from pipeline.config import TeacherConfig

log = logging.getLogger(__name__)


def _demo_teacher(cfg: TeacherConfig, num_classes: int, out: Path) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) the demo teacher; returns its checkpoint and a description of the training."""
    ckpt = out / "teacher.pt"
    settings = {
        "arch": cfg.arch,
        "num_classes": num_classes,
        "input_size": cfg.input_size,
        "mean": cfg.mean,
        "std": cfg.std,
        **asdict(cfg.demo),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if ckpt.is_file() and (out / TeacherRecord.FILE).is_file():
        old = TeacherRecord.load(out)
        if old.demo and old.demo.get("key") == key and old.sha256 == sha256_file(ckpt):
            log.info("teacher: demo teacher up to date (%s)", key)
            return ckpt, old.demo
    d = cfg.demo
    images, labels = load_fashion_mnist(d.source, "train")
    if int(labels.max()) + 1 != num_classes:
        raise ValueError(f"{cfg.classes}: {num_classes} classes, but Fashion-MNIST has {int(labels.max()) + 1}")
    x, y = fashion_mnist_rgb32(images[d.first : d.last]), labels[d.first : d.last]
    model = build_model(cfg.arch, num_classes, cfg.in_chans)
    log.info("teacher: training the demo teacher %s on Fashion-MNIST train[%d:%d]", cfg.arch, d.first, d.last)
    history = train_classifier(
        model,
        x,
        y,
        mean=cfg.mean,
        std=cfg.std,
        input_size=cfg.input_size,
        epochs=d.epochs,
        batch_size=d.batch_size,
        lr=d.lr,
        weight_decay=d.weight_decay,
        seed=d.seed,
        device=resolve_device(cfg.device),
    )
    with atomic_path(ckpt) as tmp:  # a kill never leaves a torn checkpoint under the final name
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    return ckpt, {"key": key, "settings": settings, "history": history}


def run(cfg: TeacherConfig) -> TeacherRecord:
    classes = [c.name for c in read_classes(cfg.classes)]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    demo: dict[str, Any] | None = None
    if cfg.checkpoint is None:
        with sigterm_as_interrupt():  # a stopped training leaves no checkpoint; the CLI exits 143
            ckpt, demo = _demo_teacher(cfg, len(classes), out)
        fmt: Literal["state_dict", "torchscript"] = "state_dict"
    else:
        ckpt, fmt = Path(cfg.checkpoint), cfg.format
    record = TeacherRecord(
        format=fmt,
        arch=cfg.arch if fmt == "state_dict" else None,
        classes=classes,
        input_size=cfg.input_size,
        in_chans=cfg.in_chans,
        mean=cfg.mean,
        std=cfg.std,
        checkpoint=str(ckpt),
        sha256=sha256_file(ckpt),
        bytes=ckpt.stat().st_size,
        feature_layer=cfg.feature_layer,
        classifier_layer=cfg.classifier_layer,
        demo=demo,
    )
    # every check of the loader: format, safety, architecture, outputs, finite weights
    load_teacher(
        record.spec(max_bytes=cfg.max_bytes, memory_limit_mb=cfg.memory_limit_mb), cfg.mean, cfg.std, cfg.input_size
    )
    record.save(out)
    log.info("teacher: %s %s, %d classes, sha256 %s", fmt, record.arch or "", len(classes), record.sha256[:12])
    return record
