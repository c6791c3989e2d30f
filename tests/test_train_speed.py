"""benchmarks/train_speed.py's GPU measurements, run on the CPU so a broken one shows before a GPU run."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

from conftest import REPO


@pytest.fixture(scope="module")
def train_speed() -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO / "benchmarks"))
        return importlib.import_module("train_speed")


def test_busy_fraction_times_more_steps_than_the_selection_keeps(train_speed: ModuleType) -> None:
    """Zero teacher logits and an untrained student: the selection keeps one batch; the profiled
    loop needs steps + 3 of them all the same."""
    busy, shares = train_speed.busy_fraction("demo", torch.device("cpu"), n=48, batch=16, steps=6)
    assert 0 < busy <= 2  # operator time over wall time (intra-op threads may overlap a little)
    assert list(shares) == ["convolutions", "batch norm", "optimiser", "other operators"]
    assert sum(shares.values()) == pytest.approx(busy)
    # a resnet8 step is mostly convolutions, forward and backward; each family is found by name
    assert shares["convolutions"] == max(shares.values()) and shares["batch norm"] > 0 and shares["optimiser"] > 0


def test_cycle_batches_reshuffles_a_small_pool(train_speed: ModuleType) -> None:
    method, images = train_speed.build("demo", torch.device("cpu"), 40)
    trainer = train_speed.Trainer(
        method,
        train_speed.ImagePool(images, torch.device("cpu")),
        torch.zeros(40, 10),
        schedule=train_speed.Schedule(epochs=1, batch_size=16, lr=0.01),
        augment=train_speed.Augment(size=32),
        runtime=train_speed.Runtime(),
        seed=0,
    )
    batches = list(train_speed.cycle_batches(trainer, 7))
    assert len(batches) == 7 and all(len(idx) == 16 and u8.shape[0] == 16 for _, idx, u8 in batches)
    seen = torch.cat([idx for _, idx, _ in batches])
    assert set(seen.tolist()) == set(range(40))  # the whole pool, not one selected batch
