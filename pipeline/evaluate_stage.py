"""Stage ``evaluate``: accuracy on a labelled set of the original distribution, for ``dvc metrics``.

The set is an image folder with one sub-folder per class name (``evaluate.eval_dir``; matched
ignoring case and spacing, ``/`` in a class name written ``_``: ``T-shirt_top``), or in the
demo the Fashion-MNIST test split rendered as the teacher's training data (items ``[first:last]``;
the demo keeps test[0:2000] aside as a validation split). Writes ``metrics/teacher.json``
(accuracy, per-class accuracy) and ``metrics/teacher_confusion.png``; with ``student_dir`` also
``metrics/student.json`` (the exported student's accuracy, per-class accuracy, agreement with the
teacher on the same set and on the web images the distill stage held out) and
``metrics/student_confusion.png``. Without a labelled set (both ``eval_dir`` and ``fashion_mnist``
null) accuracy cannot be measured: the stage still scores the student's agreement with the teacher
on the held-out web images, and the PNGs say why they hold no matrix.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data import holdout_mask, resolve_device
from distill.label import confusion, predict
from distill.plots import confusion_image, message_image
from distill.teacher import Teacher
from kd3util import write_metrics
from pipeline.artifacts.clean import CleanSet
from pipeline.artifacts.student import ExportedStudent
from pipeline.artifacts.teacher import TeacherRecord
from pipeline.config import EvaluateConfig
from pipeline.evalset import load_eval_set

log = logging.getLogger(__name__)
NO_EVAL_SET = "no labelled set (evaluate.eval_dir): accuracy not measured, only agreement with the teacher"


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    record = TeacherRecord.load(cfg.teacher_dir)
    teacher = record.load_teacher()
    classes = record.classes
    device = resolve_device(cfg.device)
    teacher.to(device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (cfg.eval_dir or cfg.fashion_mnist):
        # no labelled images of the original distribution: agreement with the teacher is all we can measure
        metrics: dict[str, Any] = {"eval_set": None, "eval_images": 0, "teacher_sha256": record.sha256}
        write_metrics(out / "teacher.json", metrics)
        message_image(out / "teacher_confusion.png", "teacher", NO_EVAL_SET)
        print(f"evaluate: {NO_EVAL_SET}", file=sys.stderr)
        if cfg.student_dir:
            metrics["student"] = _student(cfg, teacher, device, record, None, out)
        return metrics
    images, labels, source, skipped = load_eval_set(
        cfg.eval_dir, cfg.fashion_mnist, cfg.first, cfg.last, classes, record.input_size
    )
    logits = predict(
        teacher,
        images,
        input_size=record.input_size,
        in_chans=record.in_chans,
        batch_size=cfg.batch_size,
        device=device,
    )
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
        "teacher_sha256": record.sha256,
    }
    write_metrics(out / "teacher.json", metrics)
    confusion_image(cm, classes, out / "teacher_confusion.png", f"teacher on {source}")
    print(
        f"evaluate: teacher accuracy {metrics['teacher_accuracy']:.4f} on {len(labels)} images ({source})",
        file=sys.stderr,
    )
    if cfg.student_dir:
        metrics["student"] = _student(cfg, teacher, device, record, (images, labels, pred, source), out)
    return metrics


def _student(
    cfg: EvaluateConfig,
    teacher: Teacher,
    device: torch.device,
    record: TeacherRecord,
    labelled: tuple[np.ndarray, np.ndarray, np.ndarray, str] | None,
    out: Path,
) -> dict[str, Any]:
    """The exported student on the labelled set (images, labels, the teacher's predictions, its name) if
    there is one, and its agreement with the teacher there and on the web images distill held out."""
    exported = ExportedStudent.load(cfg.student_dir, record)  # type: ignore[arg-type]
    model, meta = exported.load_model(), exported.meta
    classes = record.classes
    cpu = torch.device("cpu")  # the exported TorchScript student is evaluated where it will be deployed
    kw = {"input_size": meta["input_size"], "in_chans": meta["in_chans"], "batch_size": cfg.batch_size, "device": cpu}
    metrics: dict[str, Any] = {"method": meta["method"], "student": meta["student"], "eval_images": 0}
    if labelled is not None:
        images, labels, teacher_pred, source = labelled
        pred = predict(model, images, **kw).argmax(1)
        cm = confusion(labels.astype(np.int64), pred, len(classes))
        metrics.update(
            {
                "student_accuracy": round(float((pred == labels).mean()), 4),
                "student_per_class": {
                    c: round(float(cm[k, k] / max(cm[k].sum(), 1)), 4) for k, c in enumerate(classes)
                },
                "agreement_eval": round(float((pred == teacher_pred).mean()), 4),
                "eval_images": len(labels),
            }
        )
        confusion_image(cm, classes, out / "student_confusion.png", f"student ({meta['method']}) on {source}")
    else:
        message_image(out / "student_confusion.png", f"student ({meta['method']})", NO_EVAL_SET)
    clean = CleanSet.load(meta["clean_dir"])
    rows = np.flatnonzero(holdout_mask(clean.keys, meta["holdout"]))
    metrics["heldout_web_images"] = len(rows)
    if len(rows):
        web = clean.images[rows]
        t_web = predict(teacher, web, **{**kw, "device": device}).argmax(1)  # the teacher loaded once, in run()
        metrics["agreement_heldout_web"] = round(float((predict(model, web, **kw).argmax(1) == t_web).mean()), 4)
    write_metrics(out / "student.json", metrics)
    on_web = f"{metrics.get('agreement_heldout_web', float('nan')):.4f} on {len(rows)} held-out web images"
    if labelled is not None:
        print(
            f"evaluate: student accuracy {metrics['student_accuracy']:.4f}, agreement with the teacher "
            f"{metrics['agreement_eval']:.4f} (eval set), {on_web}",
            file=sys.stderr,
        )
    else:
        print(f"evaluate: student agreement with the teacher {on_web}", file=sys.stderr)
    return metrics
