"""Batched teacher inference: logits for an array of images, and the metrics computed from them.

Used by the label stage (pseudo-labels for the web pool) and the evaluate stage (accuracy on a
labelled set). Inference runs under ``torch.inference_mode`` and, on CUDA, bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distill.data import batches, to_float


def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    *,
    input_size: int,
    in_chans: int,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, K) float32 logits."""
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for sl in batches(len(images), batch_size):
            x = to_float(images[sl], input_size, device, in_chans)
            out.append(model(x).float().cpu().numpy())
            if progress:
                progress(sl.stop - sl.start)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    return np.bincount(truth * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


# --------------------------------------------------------------------------------------------
# does the teacher transfer to the web pool?
# --------------------------------------------------------------------------------------------

COLLAPSE_SHARE = 0.5  # one class predicted for more than this, and twice its crawled share, of the pool: collapse
MIN_KAPPA = 0.2  # teacher-query agreement below this Cohen's kappa is "slight" (Landis & Koch 1977)
STARVED_RATIO = 0.2  # a class predicted for under a fifth of the share its queries crawled: starved


def transfer_diagnostics(pred: np.ndarray, conf: np.ndarray, queries: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """How the teacher sees the web pool, per class and overall, with warnings a user can act on.

    Each web image has two noisy labels: the teacher's prediction ``pred`` and the class its query
    was for (``queries``, -1 when unknown). Where the teacher transfers, the two agree far more often
    than chance; where it collapses onto a few classes or agrees only by chance, distillation from
    its labels cannot recover the classes and more distillation will not help.

    Returns ``{"per_class": [...], "agreement", "chance_agreement", "kappa", "warnings": [{code, message}]}``.
    """
    k = len(classes)
    n = max(len(pred), 1)
    known = queries >= 0
    pred_share = np.bincount(pred, minlength=k) / n
    query_count = np.bincount(queries[known], minlength=k)
    query_share = query_count / max(int(known.sum()), 1)
    agree = float((pred[known] == queries[known]).mean()) if known.any() else 0.0
    chance = float((np.bincount(pred[known], minlength=k) / max(int(known.sum()), 1) * query_share).sum())
    kappa = (agree - chance) / (1 - chance) if chance < 1 else 0.0
    per_class = []
    for c, name in enumerate(classes):
        mine = known & (queries == c)
        per_class.append(
            {
                "class": name,
                "crawled": int(query_count[c]),  # images whose query was for this class
                "teacher_share": round(float(pred_share[c]), 4),  # share of the pool the teacher calls this class
                "agreement": round(float((pred[mine] == c).mean()), 4) if mine.any() else None,
                "confidence": round(float(conf[pred == c].mean()), 4) if (pred == c).any() else None,
            }
        )
    warnings = []
    top = int(pred_share.argmax()) if len(pred) else 0
    expected = query_share[top] if known.any() else 1 / k
    if len(pred) and pred_share[top] > max(COLLAPSE_SHARE, 2 * expected):
        warnings.append(
            {
                "code": "collapse",
                "message": (
                    f"the teacher calls {pred_share[top]:.0%} of the web pool {classes[top]!r} (median confidence "
                    f"{float(np.median(conf[pred == top])):.2f}): its predictions collapse onto one class, so the web "
                    "images look unlike its training data. Crawl images closer to it (other queries, engines or "
                    "sources), or check the teacher's input size and mean/std."
                ),
            }
        )
    if known.any() and kappa < MIN_KAPPA:
        warnings.append(
            {
                "code": "near_chance",
                "message": (
                    f"the teacher agrees with the crawl queries on {agree:.0%} of the images, against {chance:.0%} by "
                    f"chance (kappa {kappa:.2f}): either the crawl found mostly other things, or the teacher does not "
                    "transfer to these images. Look at the clean stage's contact sheets before distilling."
                ),
            }
        )
    starved = [classes[c] for c in range(k) if query_share[c] > 0 and pred_share[c] < STARVED_RATIO * query_share[c]]
    if starved:
        warnings.append(
            {
                "code": "starved",
                "message": (
                    f"the teacher almost never predicts {', '.join(map(repr, starved[:6]))} on the web pool "
                    "(under a fifth of the share their queries crawled): the student will learn little about them."
                ),
            }
        )
    return {
        "per_class": per_class,
        "agreement": round(agree, 4),
        "chance_agreement": round(chance, 4),
        "kappa": round(kappa, 4),
        "warnings": warnings,
    }
