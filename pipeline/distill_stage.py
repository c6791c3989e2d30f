"""Stage ``distill``: train the student on the clean web pool with KD³ (or the kd / dfnd baselines).

Reads the packed images (``clean``), the teacher's logits on them (``label``, the clean-view
logits selection uses) and the teacher record. Writes to ``distill.out_dir``: ``checkpoint.pt``
(resume state, rewritten atomically every epoch and on SIGINT/SIGTERM), the exported student
(``student.pt``, ``student.ts``, ``student.json``) and ``report.json``; to ``distill.metrics_dir``:
``distill.json`` (summary for ``dvc metrics``) and ``distill_epochs.csv`` (per-epoch terms,
selection, validation accuracy, speed, for ``dvc plots``).

A rerun with the same settings and data resumes from the checkpoint; any change starts over.
Under ``torchrun --nproc_per_node N`` each process trains a shard of every batch (DDP).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from crawl.sheets import contact_sheet
from distill.data import ImagePool, holdout_mask, pool_budget_bytes, resolve_device
from distill.export import export_student
from distill.label import predict
from distill.methods import build_method
from distill.models import build_model
from distill.settings import Augment, Runtime, Schedule
from distill.trainer import Trainer
from kd3util import atomic_path, pick, write_json, write_metrics
from pipeline.artifacts import check_classes
from pipeline.artifacts.clean import CleanSet
from pipeline.artifacts.label import PseudoLabels
from pipeline.artifacts.teacher import TeacherRecord
from pipeline.artifacts.world import WorldTruth
from pipeline.config import DistillConfig
from pipeline.evalset import load_eval_set

log = logging.getLogger(__name__)


def _fingerprint(cfg: DistillConfig, record: TeacherRecord, clean: CleanSet, labels: PseudoLabels) -> str:
    """What a resumable checkpoint must agree with: the settings that shape training, and the data."""
    runtime_only = {"device", "out_dir", "metrics_dir", "truth", "eval", "nan_policy", "compile"}
    settings = {k: v for k, v in asdict(cfg).items() if k not in runtime_only}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(record.sha256.encode())
    h.update((clean.dir / "kept.jsonl").read_bytes())
    h.update(np.ascontiguousarray(labels.logits).tobytes())
    return h.hexdigest()


def _init_distributed(device_name: str) -> tuple[torch.device, bool]:
    """``torchrun`` sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (NCCL on CUDA, gloo on CPU)."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def _write_epochs_csv(history: list[dict[str, Any]], path: Path) -> None:
    cols: list[str] = []
    for row in history:
        cols += [k for k, v in row.items() if k not in cols and not isinstance(v, (dict, list))]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)


def _selection_sheets(trainer: Trainer, images: np.ndarray, classes: list[str], folder: Path, per: int = 10) -> None:
    """Contact sheets of the last epoch's selection: per pseudo-class, images kept and images dropped."""
    mask, pred = trainer.last_selection  # type: ignore[misc]
    rows = trainer.rows.numpy()
    folder.mkdir(parents=True, exist_ok=True)
    for kept, name in ((True, "selection_kept.png"), (False, "selection_dropped.png")):
        grid, empty = [], []
        for k, c in enumerate(classes):
            pick = np.flatnonzero((pred.numpy() == k) & (mask.numpy() == kept))[:per]
            if len(pick):
                grid.append([(np.asarray(images[rows[i]]), c if j == 0 else "") for j, i in enumerate(pick)])
            else:
                empty.append(c)
        if not grid:
            continue
        contact_sheet(grid, folder / name, title=sheet_title(bool(mask.all()), kept, empty), outline_first=False)


def sheet_title(no_selection: bool, kept: bool, empty: list[str]) -> str:
    """The selection sheet's title: what its rows are, and the classes that have no row."""
    if no_selection:  # switched off, or it kept everything: one sheet, and it says so
        title = "last epoch: training images (every image; no selection), one row per teacher label"
    else:
        title = f"last epoch: {'kept' if kept else 'dropped'} by the selection, one row per pseudo-class"
    if empty:  # a class with no row is news (the teacher never predicts it), not something to hide
        title += f"; none for: {', '.join(empty[:8])}{' …' if len(empty) > 8 else ''}"
    return title


def run(cfg: DistillConfig) -> dict[str, Any]:
    device, own_group = _init_distributed(cfg.device)
    try:
        return _run(cfg, device)
    finally:
        if own_group:
            dist.destroy_process_group()


def _run(cfg: DistillConfig, device: torch.device) -> dict[str, Any]:
    record = TeacherRecord.load(cfg.teacher_dir)
    clean = CleanSet.load(cfg.clean_dir)
    check_classes(record.classes, clean.classes, f"the teacher ({cfg.teacher_dir})", f"the crawl ({clean.dir})")
    labels = PseudoLabels.load(cfg.label_dir, clean, record)
    teacher = record.load_teacher()
    classes, size, chans = record.classes, record.input_size, record.in_chans
    out = Path(cfg.out_dir)
    images, keys = clean.images, clean.keys
    queries = clean.query_classes(classes)  # crawled-for class in the teacher's order (-1: several, unknown)
    logits = labels.logits.astype(np.float32)
    held = holdout_mask(keys, cfg.holdout)
    if (~held).sum() < cfg.batch_size:
        raise ValueError(f"{clean.dir}: {int((~held).sum())} training images, fewer than one batch ({cfg.batch_size})")
    truth = WorldTruth.load(cfg.truth).labels(keys, classes) if cfg.truth else None
    teacher.to(device)

    evaluate = None
    e = cfg.eval
    if e.eval_dir or e.fashion_mnist:
        val_x, val_y, _, _ = load_eval_set(e.eval_dir, e.fashion_mnist, e.first, e.last, classes, size)

        def evaluate(student: torch.nn.Module) -> dict[str, float]:
            pred = predict(
                lambda x: student(teacher.normalise(x)),
                val_x,
                input_size=size,
                in_chans=chans,
                batch_size=512,
                device=device,
            ).argmax(1)
            return {"val_accuracy": round(float((pred == val_y).mean()), 4)}

    if device.type == "cuda":  # fixed input shapes: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)  # the student's initial weights
    method = build_method(
        cfg.method,
        teacher,
        build_model(cfg.student, len(classes), chans),
        cfg.options,
        num_classes=len(classes),
        input_size=size,
        in_chans=chans,
    )
    out.mkdir(parents=True, exist_ok=True)
    metrics_dir = Path(cfg.metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        method,
        ImagePool(images, device, pool_budget_bytes(cfg.gpu_memory_budget_mb, device)),
        torch.from_numpy(logits),
        schedule=pick(Schedule, cfg),
        augment=pick(Augment, cfg, size=size),
        runtime=pick(Runtime, cfg, device=device),
        seed=cfg.seed,
        train_rows=~held,
        checkpoint=out / "checkpoint.pt",
        fingerprint=_fingerprint(cfg, record, clean, labels),
        evaluate=evaluate,
        truth=truth,
        queries=queries,
        on_epoch=lambda row: _write_epochs_csv(trainer.history, metrics_dir / "distill_epochs.csv"),
    )
    describe = getattr(method, "describe", lambda: method.name)()
    print(
        f"distill: {cfg.method} {cfg.student} <- {record.arch or 'teacher'}, {int((~held).sum())} "
        f"training images ({int(held.sum())} held out), {cfg.epochs} epochs on {device}"
        + (f", resuming at epoch {trainer.epoch + 1}" if trainer.resumed else "")
        + f"\n  {describe}",
        file=sys.stderr,
    )
    history = trainer.fit()
    if trainer.rank != 0:
        return {}
    meta = {
        "method": cfg.method,
        "student": cfg.student,
        "classes": classes,
        "input_size": size,
        "in_chans": chans,
        "mean": record.mean,
        "std": record.std,
        "input": "float RGB in [0, 1], (B, C, S, S)",
        "teacher_sha256": record.sha256,
        "holdout": cfg.holdout,
        "clean_dir": cfg.clean_dir,
        "train_images": int((~held).sum()),
        "heldout_images": int(held.sum()),
        "val_accuracy": history[-1].get("val_accuracy"),  # the model card shows what is known at export
    }
    export = export_student(trainer.student, out, meta)  # the weight average when distill.ema_decay is on
    last = history[-1]
    summary = {
        "method": cfg.method,
        "student": cfg.student,
        "epochs": cfg.epochs,
        "train_images": int((~held).sum()),
        "final_selected": last.get("selected"),
        "final_loss": last.get("loss"),
        "val_accuracy_last": last.get("val_accuracy"),
        "val_accuracy_best": max((r["val_accuracy"] for r in history if "val_accuracy" in r), default=None),
        "train_seconds": round(sum(r["train_seconds"] + r.get("selection_seconds", 0) for r in history), 1),
        "images_per_second": round(float(np.mean([r["images_per_second"] for r in history])), 1),
        "device": str(device),
        "world_size": trainer.world,
    }
    if trainer.last_selection is not None:
        _selection_sheets(trainer, images, classes, out / "sheets")
    write_metrics(metrics_dir / "distill.json", summary)
    write_json(out / "report.json", {**summary, "describe": describe, "history": history, "export": export})
    _write_epochs_csv(history, metrics_dir / "distill_epochs.csv")
    va = summary["val_accuracy_last"]
    val = f", validation accuracy {va:.4f}" if va is not None else ""
    print(
        f"distill: done in {summary['train_seconds']} s{val}; student exported to {out}/ (model_card.md)",
        file=sys.stderr,
    )
    return summary
