"""Batched teacher inference: logits for an array of images, and the metrics computed from them.

Used by the label stage (pseudo-labels for the web pool) and the evaluate stage (accuracy on a
labelled set). Inference runs under ``torch.inference_mode`` and, on CUDA, bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable

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
