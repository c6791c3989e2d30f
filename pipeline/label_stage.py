"""Stage ``label``: teacher pseudo-labels (float16 logits, confidence, argmax) for every clean image.

Outputs in ``label.out_dir``: ``logits.npy`` (N, K) float16, row i = row i of the clean array;
``report.json`` (per-class counts, confidence quantiles, images/s and, in the demo, accuracy
against the world's truth: a report only, training never reads it); ``confidence.png``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distill.data import resolve_device
from distill.label import predict, softmax
from distill.plots import bar_chart
from pipeline.artifacts import CleanSet, KeptImage, PseudoLabels, TeacherRecord, WorldTruth, check_classes
from pipeline.config import LabelConfig

log = logging.getLogger(__name__)


def run(cfg: LabelConfig) -> dict[str, Any]:
    record = TeacherRecord.load(cfg.teacher_dir)
    clean = CleanSet.load(cfg.clean_dir)
    check_classes(record.classes, clean.classes, f"the teacher ({cfg.teacher_dir})", f"the crawl ({clean.dir})")
    teacher = record.load_teacher()
    images = clean.images
    device = resolve_device(cfg.device)
    teacher.to(device)
    classes = record.classes
    bar = tqdm(
        total=len(images), desc="label", unit="img", file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 10
    )
    t0 = time.time()
    logits = predict(teacher, images, input_size=record.input_size, in_chans=record.in_chans,
                     batch_size=cfg.batch_size, device=device, progress=bar.update)  # fmt: skip
    seconds = time.time() - t0
    bar.close()
    if len(images) == 0:
        logits = np.zeros((0, len(classes)), dtype=np.float32)
    prob = softmax(logits)
    pred, conf = prob.argmax(1), prob.max(1)
    out = Path(cfg.out_dir)
    hist, edges = np.histogram(conf, bins=20, range=(0.0, 1.0))
    report: dict[str, Any] = {
        "images": len(images),
        "teacher_sha256": record.sha256,
        "images_fingerprint": clean.fingerprint,
        "classes": classes,
        "device": str(device),
        "images_per_second": round(len(images) / max(seconds, 1e-9), 1),
        "per_class": {c: int((pred == k).sum()) for k, c in enumerate(classes)},
        "confidence_quantiles": {q: round(float(np.quantile(conf, q / 100)), 4) for q in (10, 50, 90)}
        if len(conf)
        else {},
        "confidence_histogram": hist.tolist(),
    }
    if cfg.truth:
        report["demo_truth"] = _truth_metrics(WorldTruth.load(cfg.truth), clean.kept, pred, classes)
    PseudoLabels.save(out, logits, report)
    bar_chart(
        hist.tolist(), [f"{e:.2f}" for e in edges[:-1]], out / "confidence.png", "teacher confidence on the web pool"
    )
    log.info("label: %d images, %.0f images/s on %s", len(images), report["images_per_second"], device)
    if "demo_truth" in report:
        t = report["demo_truth"]
        line = (f"label: teacher accuracy on in-class web images {t['in_class_accuracy']:.3f} "
                f"({t['in_class']} images); pseudo-label accuracy on all kept images {t['all_accuracy']:.3f} "
                f"({t['all']})")  # fmt: skip
        print(line, file=sys.stderr)
    return report


def _truth_metrics(
    truth: WorldTruth, kept: tuple[KeptImage, ...], pred: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Demo only: compare pseudo-labels with the world's ground truth (junk can never be right)."""
    true = truth.labels([k.sha256 for k in kept], classes)
    in_class = true >= 0
    junk = int((~in_class).sum())
    return {
        "all": len(kept),
        "all_accuracy": round(float((pred == true).mean()), 4) if len(kept) else 0.0,
        "in_class": int(in_class.sum()),
        "in_class_accuracy": round(float((pred[in_class] == true[in_class]).mean()), 4) if in_class.any() else 0.0,
        "junk_or_broken": junk,
    }
