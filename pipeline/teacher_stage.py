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
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from crawl.classes import read_classes
from crawl.world import load_fashion_mnist
from distill.data import fashion_mnist_rgb32, resolve_device
from distill.models import build_model
from distill.supervised import train_classifier
from distill.teacher import Teacher, TeacherSpec, load_teacher
from pipeline.config import TeacherConfig
from pipeline.outputs import write_json

log = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _demo_teacher(cfg: TeacherConfig, num_classes: int, out: Path) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) the demo teacher; returns its checkpoint and a description of the training."""
    ckpt = out / "teacher.pt"
    settings = {"arch": cfg.arch, "num_classes": num_classes, "input_size": cfg.input_size, "mean": cfg.mean,
                "std": cfg.std, **asdict(cfg.demo)}  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    old_path = out / "teacher.json"
    if ckpt.is_file() and old_path.is_file():
        old = json.loads(old_path.read_text())
        if old.get("demo", {}).get("key") == key and old.get("sha256") == sha256_file(ckpt):
            log.info("teacher: demo teacher up to date (%s)", key)
            return ckpt, old["demo"]
    d = cfg.demo
    images, labels = load_fashion_mnist(d.source, "train")
    if int(labels.max()) + 1 != num_classes:
        raise ValueError(f"{cfg.classes}: {num_classes} classes, but Fashion-MNIST has {int(labels.max()) + 1}")
    x, y = fashion_mnist_rgb32(images[d.first : d.last]), labels[d.first : d.last]
    model = build_model(cfg.arch, num_classes, cfg.in_chans)
    log.info("teacher: training the demo teacher %s on Fashion-MNIST train[%d:%d]", cfg.arch, d.first, d.last)
    history = train_classifier(
        model, x, y, mean=cfg.mean, std=cfg.std, input_size=cfg.input_size, epochs=d.epochs,
        batch_size=d.batch_size, lr=d.lr, weight_decay=d.weight_decay, seed=d.seed, device=resolve_device(cfg.device),
    )  # fmt: skip
    tmp = ckpt.with_suffix(".tmp")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, ckpt)  # atomic: a kill never leaves a torn checkpoint under the final name
    return ckpt, {"key": key, "settings": settings, "history": history}


def teacher_spec(record: dict[str, Any]) -> TeacherSpec:
    return TeacherSpec(checkpoint=record["checkpoint"], num_classes=len(record["classes"]), format=record["format"],
                       arch=record.get("arch"), in_chans=record["in_chans"], feature_layer=record.get("feature_layer"),
                       classifier_layer=record.get("classifier_layer"))  # fmt: skip


def load_from_record(teacher_dir: str | Path) -> tuple[Teacher, dict[str, Any]]:
    """The frozen teacher described by ``<teacher_dir>/teacher.json`` (checked against its SHA-256)."""
    path = Path(teacher_dir) / "teacher.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher record (run kd3 teacher first)")
    record = json.loads(path.read_text())
    ckpt = Path(record["checkpoint"])
    if ckpt.is_file() and sha256_file(ckpt) != record["sha256"]:
        raise ValueError(f"{ckpt}: changed since the teacher stage ran (run kd3 teacher / dvc repro)")
    teacher = load_teacher(teacher_spec(record), record["mean"], record["std"], record["input_size"])
    return teacher, record


def run(cfg: TeacherConfig) -> dict[str, Any]:
    classes = [c.name for c in read_classes(cfg.classes)]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    demo: dict[str, Any] | None = None
    if cfg.checkpoint is None:
        ckpt, demo = _demo_teacher(cfg, len(classes), out)
        fmt = "state_dict"
    else:
        ckpt, fmt = Path(cfg.checkpoint), cfg.format
    record: dict[str, Any] = {
        "format": fmt,
        "arch": cfg.arch if fmt == "state_dict" else None,
        "classes": classes,
        "input_size": cfg.input_size,
        "in_chans": cfg.in_chans,
        "feature_layer": cfg.feature_layer,
        "classifier_layer": cfg.classifier_layer,
        "mean": cfg.mean,
        "std": cfg.std,
        "checkpoint": str(ckpt),
    }
    spec = teacher_spec(record)
    spec = TeacherSpec(**{**asdict(spec), "max_bytes": cfg.max_bytes, "memory_limit_mb": cfg.memory_limit_mb})
    load_teacher(spec, cfg.mean, cfg.std, cfg.input_size)  # every check of RELIABILITY.md section 3
    record["sha256"] = sha256_file(ckpt)
    record["bytes"] = ckpt.stat().st_size
    if demo is not None:
        record["demo"] = demo
    write_json(out / "teacher.json", record)
    log.info("teacher: %s %s, %d classes, sha256 %s", fmt, record["arch"] or "", len(classes), record["sha256"][:12])
    return record
