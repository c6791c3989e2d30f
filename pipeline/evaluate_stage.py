"""Stage ``evaluate``: accuracy on a labelled set of the original distribution, for ``dvc metrics``.

The set is an image folder with one sub-folder per class name (``evaluate.eval_dir``; matched
ignoring case and spacing, ``/`` in a class name written ``_``: ``T-shirt_top``), or in the
demo the Fashion-MNIST test split rendered as the teacher's training data (items ``[first:last]``;
the demo keeps test[0:2000] aside as a validation split). Writes ``metrics/teacher.json``
(accuracy, per-class accuracy) and ``metrics/teacher_confusion.png``. The distill stage adds the
student beside the teacher, and teacher-student agreement on held-out web images.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from crawl.classes import normalise
from crawl.images import ImageRejected, decode_image, resize_square
from crawl.world import load_fashion_mnist
from distill.data import fashion_mnist_rgb32, resolve_device
from distill.label import confusion, predict
from distill.plots import confusion_image
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


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    teacher, record = load_from_record(cfg.teacher_dir)
    classes = record["classes"]
    skipped = 0
    if cfg.eval_dir:
        images, labels, skipped = load_image_folder(Path(cfg.eval_dir), classes, record["input_size"])
        source = cfg.eval_dir
    elif cfg.fashion_mnist:
        raw, labels = load_fashion_mnist(cfg.fashion_mnist, "test")
        images = fashion_mnist_rgb32(raw)
        source = "fashion-mnist test"
    else:
        raise ValueError("evaluate: set evaluate.eval_dir (an image folder by class) or evaluate.fashion_mnist (demo)")
    images, labels = images[cfg.first : cfg.last], labels[cfg.first : cfg.last]
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
    return metrics
