"""Images as tensors: devices, uint8 batches to normalised floats, and the demo's original distribution.

Every stage after ``clean`` works on ``uint8`` arrays shaped (N, H, W, 3) (the packed array, or the
Fashion-MNIST split rendered like the teacher's training data); ``to_float`` turns a batch into the
(B, C, S, S) float tensor in [0, 1] that ``Teacher`` and the students take.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error with a hint (P7)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA GPU is available (use device: auto or cpu)")
    return torch.device(name)


def to_float(batch: np.ndarray | torch.Tensor, size: int, device: torch.device, in_chans: int = 3) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, in_chans, size, size) float in [0, 1] on ``device`` (bilinear, antialiased)."""
    x = torch.as_tensor(np.ascontiguousarray(batch)).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if in_chans == 1:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    return x


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def fashion_mnist_rgb32(images: np.ndarray) -> np.ndarray:
    """The demo teacher's input distribution: 28x28 grey padded with 2 black pixels, replicated to RGB.

    (N, 28, 28) uint8 -> (N, 32, 32, 3) uint8.
    """
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=3)
