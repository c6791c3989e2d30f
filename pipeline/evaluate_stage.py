"""Stage ``evaluate``: accuracy on a labelled set of the original distribution, for ``dvc metrics``.

The set is an image folder with one sub-folder per class name (``evaluate.eval_dir``; matched
ignoring case and spacing, ``/`` in a class name written ``_``: ``T-shirt_top``), or in the
demo the Fashion-MNIST test split rendered as the teacher's training data (items ``[first:last]``;
the demo keeps test[0:2000] aside as a validation split). Writes ``metrics/teacher.json``
(accuracy, per-class accuracy) and ``metrics/teacher_confusion.png``; with ``student_dir`` also
``metrics/student.json`` (the exported student's accuracy, per-class accuracy, agreement with the
teacher on the same set and on the web images the distill stage held out) and
``metrics/student_confusion.png``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crawl.classes import normalise
from crawl.images import ImageRejected, decode_image, resize_square
from crawl.world import load_fashion_mnist
from distill.data import fashion_mnist_rgb32, holdout_mask, resolve_device
from distill.export import load_exported
from distill.label import confusion, predict
from distill.plots import confusion_image
from distill.teacher import Teacher
from pipeline.config import EvaluateConfig
from pipeline.outputs import write_json
from pipeline.teacher_stage import load_from_record

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


def _folder_key(name: str) -> str:
    """Folder names match class names after normalisation, with ``/`` written as ``_``."""
    return normalise(name.replace("/", "_").replace("\\", "_"))


def load_image_folder(folder: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(N, size, size, 3) uint8, labels, and the number of unreadable files skipped."""
    by_key = {_folder_key(c): k for k, c in enumerate(classes)}
    images, labels, skipped = [], [], 0
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [p.name for p in subdirs if _folder_key(p.name) not in by_key]
    if unknown:
        raise ValueError(f"{folder}: sub-folders not in the class list: {', '.join(unknown[:5])}")
    for sub in subdirs:
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                images.append(resize_square(decode_image(f.read_bytes()).image, size, "crop"))
                labels.append(by_key[_folder_key(sub.name)])
            except ImageRejected as e:
                log.warning("evaluate: skipped %s (%s)", f, e.reason)
                skipped += 1
    if not images:
        raise ValueError(f"{folder}: no readable images in class sub-folders")
    return np.stack(images), np.array(labels), skipped


def load_eval_set(
    eval_dir: str | None, fashion_mnist: str | None, first: int, last: int | None, classes: list[str], size: int
) -> tuple[np.ndarray, np.ndarray, str, int]:
    """A labelled set of the original distribution: (images, labels, description, skipped files)."""
    skipped = 0
    if eval_dir:
        images, labels, skipped = load_image_folder(Path(eval_dir), classes, size)
        source = eval_dir
    elif fashion_mnist:
        raw, labels = load_fashion_mnist(fashion_mnist, "test")
        images = fashion_mnist_rgb32(raw)
        source = "fashion-mnist test"
    else:
        raise ValueError("evaluate: set evaluate.eval_dir (an image folder by class) or evaluate.fashion_mnist (demo)")
    return images[first:last], labels[first:last], source, skipped


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    teacher, record = load_from_record(cfg.teacher_dir)
    classes = record["classes"]
    images, labels, source, skipped = load_eval_set(cfg.eval_dir, cfg.fashion_mnist, cfg.first, cfg.last, classes,
                                                    record["input_size"])  # fmt: skip
    device = resolve_device(cfg.device)
    teacher.to(device)
    logits = predict(teacher, images, input_size=record["input_size"], in_chans=record["in_chans"],
                     batch_size=cfg.batch_size, device=device)  # fmt: skip
    pred = logits.argmax(1)
    cm = confusion(labels.astype(np.int64), pred, len(classes))
    per_class = {c: round(float(cm[k, k] / max(cm[k].sum(), 1)), 4) for k, c in enumerate(classes)}
    metrics = {
        "teacher_accuracy": round(float((pred == labels).mean()), 4),
        "teacher_per_class": per_class,
        "eval_set": source,
        "eval_range": [cfg.first, cfg.first + len(labels)],
        "eval_images": len(labels),
        "skipped_files": skipped,
        "teacher_sha256": record["sha256"],
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "teacher.json", metrics)
    confusion_image(cm, classes, out / "teacher_confusion.png", f"teacher on {source}")
    print(
        f"evaluate: teacher accuracy {metrics['teacher_accuracy']:.4f} on {len(labels)} images ({source})",
        file=sys.stderr,
    )
    if cfg.student_dir:
        metrics["student"] = _student(cfg, teacher, device, record, images, labels, pred, source, out)
    return metrics


def _student(cfg: EvaluateConfig, teacher: Teacher, device: torch.device, record: dict[str, Any], images: np.ndarray,
             labels: np.ndarray, teacher_pred: np.ndarray, source: str, out: Path) -> dict[str, Any]:  # fmt: skip
    """The exported student on the same set, its agreement with the teacher there and on held-out web images."""
    model, meta = load_exported(Path(cfg.student_dir))  # type: ignore[arg-type]
    if meta["teacher_sha256"] != record["sha256"]:
        raise ValueError(f"{cfg.student_dir}: the student was distilled from another teacher (run kd3 distill)")
    classes = record["classes"]
    cpu = torch.device("cpu")  # the exported TorchScript student is evaluated where it will be deployed
    kw = {"input_size": meta["input_size"], "in_chans": meta["in_chans"], "batch_size": cfg.batch_size, "device": cpu}
    pred = predict(model, images, **kw).argmax(1)
    cm = confusion(labels.astype(np.int64), pred, len(classes))
    metrics: dict[str, Any] = {
        "student_accuracy": round(float((pred == labels).mean()), 4),
        "student_per_class": {c: round(float(cm[k, k] / max(cm[k].sum(), 1)), 4) for k, c in enumerate(classes)},
        "agreement_eval": round(float((pred == teacher_pred).mean()), 4),
        "method": meta["method"],
        "student": meta["student"],
        "eval_images": len(labels),
    }
    clean = Path(meta["clean_dir"])
    keys = [json.loads(line)["sha256"] for line in (clean / "kept.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = np.flatnonzero(holdout_mask(keys, meta["holdout"]))
    metrics["heldout_web_images"] = len(rows)
    if len(rows):
        web = np.load(clean / "images.npy", mmap_mode="r")[rows]
        t_web = predict(teacher, web, **{**kw, "device": device}).argmax(1)  # the teacher loaded once, in run()
        metrics["agreement_heldout_web"] = round(float((predict(model, web, **kw).argmax(1) == t_web).mean()), 4)
    write_json(out / "student.json", metrics)
    confusion_image(cm, classes, out / "student_confusion.png", f"student ({meta['method']}) on {source}")
    print(f"evaluate: student accuracy {metrics['student_accuracy']:.4f}, agreement with the teacher "
          f"{metrics['agreement_eval']:.4f} (eval set), {metrics.get('agreement_heldout_web', float('nan')):.4f} "
          f"({len(rows)} held-out web images)", file=sys.stderr)  # fmt: skip
    return metrics
