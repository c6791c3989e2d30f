"""Images as tensors: devices, uint8 batches to normalised floats, and the demo's original distribution.

Every stage after ``clean`` works on ``uint8`` arrays shaped (N, H, W, 3) (the packed array, or the
Fashion-MNIST split rendered like the teacher's training data); ``to_float`` turns a batch into the
(B, C, S, S) float tensor in [0, 1] that ``Teacher`` and the students take.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error with a hint."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA GPU is available (use device: auto or cpu)")
    return torch.device(name)


POOL_SHARE_OF_FREE_MEMORY = 0.5  # the rest is for the networks, activations and the allocator's slack


def pool_budget_bytes(setting_mb: int | None, device: torch.device, free_bytes: int | None = None) -> int:
    """How many bytes of the device the uint8 pool may occupy (a larger pool streams from the host).

    ``setting_mb`` is ``distill.gpu_memory_budget_mb``; null sizes it from the device: half of the
    memory free when training starts (``free_bytes``, read from CUDA when not given). On the CPU the
    pool is never copied, so the budget is 0.
    """
    if device.type != "cuda":
        return 0
    if setting_mb is not None:
        return setting_mb << 20
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return int(free_bytes * POOL_SHARE_OF_FREE_MEMORY)


def to_float(batch: np.ndarray | torch.Tensor, size: int, device: torch.device, in_chans: int = 3) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, in_chans, size, size) float in [0, 1] on ``device`` (bilinear, antialiased)."""
    if isinstance(batch, np.ndarray):
        batch = np.ascontiguousarray(batch)
        if not batch.flags.writeable:  # a whole read-only memmap: torch wants a writable buffer
            batch = batch.copy()
    x = torch.as_tensor(batch).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if in_chans == 1:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    return x


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without stalling the host: a copy from pageable memory waits for
    the GPU's queue to drain, one from pinned memory is queued like a kernel."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


# --------------------------------------------------------------------------------------------
# training data: the packed pool, batched augmentation, held-out rows
# --------------------------------------------------------------------------------------------


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    generator: torch.Generator,
    flip: bool = True,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip for a whole (B, C, H, W) float batch at once.

    One affine grid per image (area fraction ``s ~ U(scale)``, log-uniform aspect ratio, uniform
    position inside the image) and one bilinear ``grid_sample``: no per-image Python, no PIL, the
    same code on CPU and GPU. ``generator`` lives on ``x``'s device.
    """
    b, dev = x.shape[0], x.device
    u = torch.rand(b, 5, generator=generator, device=dev)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the full width / height
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - w)  # normalised centre, the crop stays inside the image
    cy = (2 * u[:, 3] - 1) * (1 - h)
    sx = torch.where((u[:, 4] < 0.5) & flip, -w, w)  # a negative x scale mirrors the crop
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_grayscale(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each image of a (B, 3, H, W) batch by its luma, replicated, with probability ``p``."""
    if p <= 0:
        return x
    pick = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    luma = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    return torch.where(pick.view(-1, 1, 1, 1), luma, x)


def uint8_to_float(batch: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 tensor -> (B, 3, H, W) float in [0, 1], channels-last in memory."""
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """``array`` as a CPU tensor, sharing its memory when torch may (a read-only array is copied:
    ``torch.from_numpy`` warns on it, and pyproject turns warnings into errors)."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def upload(images: np.ndarray, device: torch.device, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """Copy a (memory-mapped, possibly read-only) array onto ``device`` a chunk at a time, so the
    host never holds a second copy of the whole pool."""
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    rows = max(1, chunk_bytes // max(1, images[0].nbytes)) if len(images) else 1
    for s in range(0, len(images), rows):
        out[s : s + rows].copy_(torch.from_numpy(np.array(images[s : s + rows])))
    return out


class ImagePool:
    """The packed (N, H, W, 3) uint8 array as batches on the training device.

    On CUDA the whole pool is copied to the GPU once when it fits ``gpu_budget_bytes`` (batches are
    then a device-side gather); otherwise batches are gathered from the (memory-mapped) array on a
    background thread into pinned memory and copied asynchronously, one batch ahead. On CPU the
    array is read in place (a gather per batch, no per-image work).
    """

    def __init__(
        self,
        images: np.ndarray,
        device: torch.device,
        gpu_budget_bytes: int = 4 << 30,
        resident: bool | None = None,
    ) -> None:
        """``resident``: copy the whole pool onto ``device`` (default: on CUDA, when it fits the budget)."""
        self.images, self.device = images, device
        self.resident = device.type == "cuda" and images.nbytes <= gpu_budget_bytes if resident is None else resident
        self.data: torch.Tensor | None = None
        if self.resident:
            self.data = upload(images, device)
        elif device.type == "cpu":
            self.data = upload(images, device) if isinstance(images, np.memmap) else host_tensor(images)

    def __len__(self) -> int:
        return len(self.images)

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 rows ``idx`` (a CPU int64 tensor), in that order, on the device."""
        if self.data is not None:
            return self.data[to_device(idx, self.data.device)]
        want = idx.numpy()
        by_pos = np.argsort(want, kind="stable")  # read the memmap in ascending row order
        rows = np.empty((len(want), *self.images.shape[1:]), dtype=self.images.dtype)
        rows[by_pos] = self.images[want[by_pos]]
        host = torch.from_numpy(rows)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host

    def stream(self, index_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The uint8 batch for each index batch; gathers one batch ahead on a thread when not resident."""
        if self.data is not None or len(index_batches) < 2:
            for idx in index_batches:
                yield self.fetch(idx)
            return
        with ThreadPoolExecutor(max_workers=1) as ex:
            pending = ex.submit(self.fetch, index_batches[0])
            for i in range(len(index_batches)):
                batch = pending.result()
                if i + 1 < len(index_batches):
                    pending = ex.submit(self.fetch, index_batches[i + 1])
                yield batch

    def iterate(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, indices, uint8 batch) over ``order`` in batches of ``batch_size``."""
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        for i, (idx, batch) in enumerate(zip(chunks, self.stream(chunks), strict=True)):
            yield i, idx, batch


def holdout_mask(keys: list[str], fraction: float) -> np.ndarray:
    """Rows held out of training (teacher-student agreement on unseen web images).

    Decided by each image's SHA-256, so the same image is held out in every run and after a recrawl.
    """
    cut = int(fraction * 2**32)
    return np.array([int(k[:8], 16) < cut for k in keys], dtype=bool)
