"""Plain supervised training, used for the demo teacher (and the upper-reference baseline).

A small loop on uint8 arrays held as one tensor: random 2-pixel shifts and horizontal flips done on
the whole batch at once, SGD with Nesterov momentum and a one-cycle learning rate. Deterministic
for a seed on CPU.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from distill.data import batches, to_float
from kd3util import progress_bar

log = logging.getLogger(__name__)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shifts (reflect-free zero padding, then a random crop) and flips for a (B, C, H, W) batch."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (B, W)
    idx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train_classifier(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: list[float],
    std: list[float],
    input_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
) -> list[dict[str, float]]:
    """Train ``model`` on (N, H, W, 3) uint8 ``images`` with integer ``labels``; returns per-epoch metrics."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    y_all = torch.as_tensor(labels.astype(np.int64))
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    history = []
    for epoch in range(epochs):
        t0 = time.time()
        order = torch.randperm(len(images), generator=gen).numpy()
        total, correct, loss_sum = 0, 0, 0.0
        bar = progress_bar(len(images), f"epoch {epoch + 1}/{epochs}", unit="img")
        for sl in batches(len(images), batch_size):
            idx = np.sort(order[sl])  # sorted: contiguous-ish reads from a memmap
            x = augment(to_float(images[idx], input_size, device), gen)
            y = y_all[idx].to(device)
            logits = model((x - m) / s)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(idx)
            bar.update(len(idx))
        bar.close()
        row = {"epoch": epoch + 1, "loss": loss_sum / total, "train_acc": correct / total, "seconds": time.time() - t0}
        history.append(row)
        log.info(
            "epoch %d/%d loss %.4f train acc %.4f (%.1f s)",
            epoch + 1,
            epochs,
            row["loss"],
            row["train_acc"],
            row["seconds"],
        )
    model.eval()
    return history
