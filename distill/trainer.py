"""The distillation loop: per-epoch selection, batched device-side augmentation, AMP, resume, DDP.

The trainer receives built objects (a ``Method``, an ``ImagePool``, the teacher's logits on the
clean view of every pool row) and plain settings; it never sees the config tree. Before training it
hands the method the training rows' cached logits and crawl queries once (``Method.prepare``).

Each epoch:
1. selection pass (``Method.select``) over every training row of the pool, in eval mode without
   gradients; under DDP each rank scores a shard and the logits are all-gathered;
2. a shuffled pass over the selected rows: uint8 rows -> RandomResizedCrop + flip on the device
   -> ``Method.forward`` -> named loss terms -> backward -> non-finite guard -> fused SGD step. The
   guard decides on the device (a step with a non-finite loss or gradient is skipped by the
   optimiser itself); the host reads the verdicts back every ``sync_every`` steps (every step on a
   CPU, where that costs nothing) and applies ``nan_policy`` in step order, so nothing in a step
   waits for the GPU;
3. the evaluation callback (rank 0), a history row, an atomic checkpoint.

Checkpoints hold everything a resumed run needs to continue as if uninterrupted: model, optimizers,
scheduler, the epoch's selected order and step, and every RNG state. SIGTERM/SIGINT stop at the next
step boundary with a checkpoint and raise ``TrainingInterrupted`` (the CLI exits 143/130).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import get_total_norm

from distill.data import ImagePool, random_grayscale, random_resized_crop, to_device, to_float, uint8_to_float
from distill.settings import Augment, Runtime, Schedule
from kd3util import atomic_path, progress_bar

if TYPE_CHECKING:
    from distill.teacher import Teacher

log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during training; a checkpoint was written at the last step boundary."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or gradient under ``nan_policy: abort`` (no step was taken with it)."""


class Method(nn.Module):
    """What the trainer needs from KD³, KD and DFND.

    ``student`` is the deployable network (normalised input -> logits); ``forward(x01, gen,
    queries)`` returns ``{"loss": total, <term>: value}`` for a [0, 1] batch (``queries``: the class
    each image was crawled for, -1 when unknown; only methods that opt in read it); ``select``
    returns the boolean mask of pool rows to train on this epoch (and the pseudo-classes, for reports).
    """

    name = "method"  # set by distill.methods.register_method, with Options
    Options: type = object
    selection_view = "clean"  # the view select() scores: "clean" (cached teacher logits) or "augmented"
    teacher: Teacher
    student: nn.Module

    def needs_student_logits(self, epoch: int) -> bool:
        return False

    def prepare(self, teacher_logits: torch.Tensor, queries: torch.Tensor) -> None:
        """Called once by the trainer before training (and before the method moves to its device), with
        the training rows' cached clean-view teacher logits (N, K) and crawl queries (N,): a method
        that models the pool fits that model here, never per step."""

    def select(
        self,
        epoch: int,
        epochs: int,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = teacher_logits.shape[0]
        return torch.ones(n, dtype=torch.bool), teacher_logits.argmax(1)

    def selection_confidence(
        self,
        epoch: int,
        epochs: int,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N,) the confidence ``select`` ranks by; when it keeps under a batch, the trainer keeps the
        top batch by this instead. Here: the teacher's top softmax probability."""
        return torch.softmax(teacher_logits, 1).max(1).values

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def trainable(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file, fsync, rename: a kill or a full disk never tears ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class WeightEMA:
    """An exponential moving average of a module's weights (a copy that ``update`` pulls towards it).

    Float parameters and buffers are averaged with one fused ``_foreach_lerp_`` per step on the
    device, with the decay computed on the host from a host-side step count, so an update never
    waits for the GPU (``torch.optim.swa_utils.AveragedModel`` reads a device counter each step).
    Integer buffers (BatchNorm's batch count) are copied. The warm-up min(decay, (1+n)/(10+n))
    keeps the first steps' random weights from dominating a short run.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # averaged: float parameters and buffers
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # copied: integer buffers
        mine = [*self.module.parameters(), *self.module.buffers()]
        for e, m in zip(mine, [*module.parameters(), *module.buffers()], strict=True):
            (self._pairs if e.dtype.is_floating_point else self._copies).append((e, m))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._pairs:
            ema, live = zip(*self._pairs, strict=True)
            torch._foreach_lerp_(list(ema), list(live), 1 - decay)
        for e, m in self._copies:
            e.copy_(m)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


class Trainer:
    def __init__(
        self,
        method: Method,
        pool: ImagePool,
        teacher_logits: torch.Tensor,
        *,
        schedule: Schedule,
        augment: Augment,
        runtime: Runtime,
        seed: int,
        train_rows: np.ndarray | None = None,
        checkpoint: Path | None = None,
        fingerprint: str = "",
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        truth: np.ndarray | None = None,
        queries: np.ndarray | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.method, self.pool, self.schedule, self.augment, self.rt = method, pool, schedule, augment, runtime
        self.device = torch.device(runtime.device)
        self.rank, self.world = _rank_world()
        if schedule.batch_size % self.world:
            raise ValueError(f"batch_size {schedule.batch_size} is not divisible by {self.world} processes")
        rows = np.arange(len(pool)) if train_rows is None else np.flatnonzero(train_rows)
        self.rows = torch.from_numpy(rows.astype(np.int64))
        self.teacher_logits = teacher_logits.float()[self.rows]  # (n_train, K), clean view
        self.truth = None if truth is None else torch.as_tensor(truth[rows])
        q = np.full(len(pool), -1) if queries is None else queries
        self.queries = torch.as_tensor(q.astype(np.int64))  # by pool row
        self.seed, self.checkpoint, self.fingerprint = seed, checkpoint, fingerprint
        self.evaluate, self.on_epoch = evaluate, on_epoch
        method.prepare(self.teacher_logits, self.queries[self.rows])  # deterministic: every rank fits the same
        torch.manual_seed(seed)
        method.to(self.device)
        if runtime.channels_last:  # NHWC: faster convolutions on CUDA and on CPU (oneDNN) alike
            method.to(memory_format=torch.channels_last)
        self.params = method.trainable()
        self.opt = torch.optim.SGD(
            self.params,
            lr=schedule.lr,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
            nesterov=schedule.nesterov,
            fused=self.device.type in ("cuda", "cpu"),  # fused: takes found_inf, skips a bad step on the device
        )
        if schedule.momentum:  # zero buffers: a first step the fused kernel skips would leave them unset
            for p in self.params:  # (0 · momentum + grad is bitwise the first step's buffer)
                self.opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self.extra_opts = method.extra_optimizers()
        self.opts = [self.opt, *self.extra_opts]
        # steps between host reads of the non-finite guard (and, under DDP, the stop flag): on a CPU
        # a read costs nothing, on a GPU it stalls the queue the host keeps ahead of the device
        self.sync_every = 1 if self.device.type == "cpu" else 32
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # (step, global batch, verdict) not yet read
        self._seen, self._skipped_run = 0, 0
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule.lr_factor)
        self.order_gen = torch.Generator().manual_seed(seed)  # shared by all ranks: same order
        self.mix_gen = torch.Generator().manual_seed(seed * 1000 + 1 + self.rank)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(seed * 1000 + 2 + self.rank)
        # built after the move to the device and layout, so the average lives beside the weights
        self.ema = WeightEMA(method.student, schedule.ema_decay) if schedule.ema_decay else None
        self.step_fn: nn.Module = method
        if self.world > 1:
            self.step_fn = nn.parallel.DistributedDataParallel(
                method,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        if runtime.compile:
            self.step_fn = torch.compile(self.step_fn)  # type: ignore[assignment]
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.order: torch.Tensor | None = None  # this epoch's shuffled selection (positions in self.rows)
        self.last_selection: tuple[torch.Tensor, torch.Tensor] | None = None
        self.epoch_info: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._signal: int | None = None
        self.resumed = self._resume()

    # ---------------------------------------------------------------------------- checkpoints

    def _rng(self) -> dict[str, torch.Tensor | None]:
        """This process's generator states: under DDP each rank draws its own crops and mixes."""
        return {
            "torch": torch.get_rng_state(),
            "mix": self.mix_gen.get_state(),
            "aug": self.aug_gen.get_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def state(self, ranks: list[dict[str, torch.Tensor | None]] | None = None) -> dict[str, Any]:
        """The checkpoint; ``ranks``: every rank's generator states (default: this process's only)."""
        return {
            "fingerprint": self.fingerprint,
            "device": self.device.type,  # generator states and kernels differ between device types
            "method": self.method.state_dict(),
            "opt": self.opt.state_dict(),
            "extra_opts": [o.state_dict() for o in self.extra_opts],
            "sched": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "order": self.order,
            "epoch_info": self.epoch_info,
            "history": self.history,
            "rng": {"order": self.order_gen.get_state(), "ranks": ranks or [self._rng()]},
        }

    def save(self) -> None:
        if self.checkpoint is not None:
            ranks: list[Any] = [self._rng()]
            if self.world > 1:  # a collective: every rank takes part, rank 0 writes
                ranks = [None] * self.world
                dist.all_gather_object(ranks, self._rng())
            if self.rank == 0:
                atomic_save(self.state(ranks), self.checkpoint)
        if self.world > 1:
            dist.barrier()

    def _resume(self) -> bool:
        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (a foreign or damaged file: start over, say why)
            log.warning("distill: %s is not a usable checkpoint (%s); starting over", self.checkpoint, e)
            return False
        if state.get("fingerprint") != self.fingerprint:
            log.info("distill: %s belongs to other settings or data; starting over", self.checkpoint)
            return False
        if state.get("device") != self.device.type:
            where = state.get("device") or "an unknown device"
            log.warning(
                "distill: %s was written on %s and this run is on %s; starting over",
                self.checkpoint,
                where,
                self.device.type,
            )
            return False
        fresh = copy.deepcopy(self.state())  # (a state dict shares the live tensors)
        try:
            self._restore(state)
        except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as e:
            self._restore(fresh)  # nothing half-restored: back to this run's own initial state
            log.warning("distill: %s cannot be restored here (%s); starting over", self.checkpoint, e)
            return False
        log.info("distill: resumed from %s at epoch %d step %d", self.checkpoint, self.epoch + 1, self.step)
        return True

    def _restore(self, state: dict[str, Any]) -> None:
        ranks = state["rng"]["ranks"]
        if len(ranks) != self.world:
            log.info("distill: the checkpoint holds %d ranks' generators, this run has %d", len(ranks), self.world)
        mine = ranks[self.rank] if self.rank < len(ranks) else None  # a new rank keeps its own seed
        self.method.load_state_dict(state["method"])
        self.opt.load_state_dict(state["opt"])
        for o, s in zip(self.extra_opts, state["extra_opts"], strict=True):
            o.load_state_dict(s)
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])  # (a KeyError/TypeError here: the run starts over)
        self.order_gen.set_state(state["rng"]["order"])
        if mine is not None:
            torch.set_rng_state(mine["torch"])
            self.mix_gen.set_state(mine["mix"])
            self.aug_gen.set_state(mine["aug"])
            if mine["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self.order, self.epoch_info, self.history = state["order"], state["epoch_info"], state["history"]

    # ---------------------------------------------------------------------------- selection

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.rt.amp)

    def _view(self, u8: torch.Tensor, augmented: bool) -> torch.Tensor:
        if augmented:
            a = self.augment
            x = random_resized_crop(uint8_to_float(u8), a.size, a.crop_scale, self.aug_gen, a.flip, a.crop_ratio)
            x = random_grayscale(x, a.grayscale, self.aug_gen)
        else:
            x = to_float(u8, self.augment.size, self.device)
        if self.rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def pool_logits(
        self, models: list[tuple[Callable[[torch.Tensor], torch.Tensor], bool]], augmented: bool
    ) -> list[torch.Tensor]:
        """Logits of each ``(model, normalise)`` for every training row (sharded across ranks, then
        gathered). With ``augmented`` every model sees the same fresh crop of each image."""
        mine = torch.arange(self.rank, len(self.rows), self.world)
        outs: list[list[torch.Tensor]] = [[] for _ in models]
        with self._autocast():
            for _, _, u8 in self.pool.iterate(self.rows[mine], self.rt.eval_batch_size):
                x = self._view(u8, augmented)
                for out, (model, normalise) in zip(outs, models, strict=True):
                    out.append(model(self.method.teacher.normalise(x) if normalise else x).float())
        return [self._gather(torch.cat(out) if out else None) for out in outs]

    def _gather(self, local: torch.Tensor | None) -> torch.Tensor:
        """This rank's rows (every world-th from its rank) -> all rows in order, on the CPU."""
        k = self.teacher_logits.shape[1]
        if local is None:
            local = torch.zeros(0, k, device=self.device)
        if self.world == 1:
            return local.cpu()
        width = (len(self.rows) + self.world - 1) // self.world
        padded = torch.zeros(width, k, device=local.device)
        padded[: len(local)] = local
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        full = torch.zeros(len(self.rows), k)
        for r, p in enumerate(parts):
            idx = torch.arange(r, len(self.rows), self.world)
            full[idx] = p[: len(idx)].cpu()
        return full

    def select(self) -> None:
        """Choose this epoch's rows and shuffle them (same order on every rank)."""
        t0 = time.time()
        m, e, epochs = self.method, self.epoch, self.schedule.epochs
        augmented = self.method.selection_view == "augmented"
        teacher_logits, student_logits = self.teacher_logits, None
        if m.needs_student_logits(e):
            m.student.eval()
            if augmented:  # teacher and student score the same fresh crop, as α·o_T + (1−α)·o_S needs
                teacher_logits, student_logits = self.pool_logits([(m.teacher, False), (m.student, True)], True)
            else:
                (student_logits,) = self.pool_logits([(m.student, True)], False)
        elif augmented:
            (teacher_logits,) = self.pool_logits([(m.teacher, False)], True)
        queries = self.queries[self.rows]
        mask, pred = m.select(e, epochs, teacher_logits, student_logits, queries)
        chosen = torch.nonzero(mask).flatten()
        if len(chosen) < self.schedule.batch_size:  # guard: never less than one batch, the most confident
            conf = m.selection_confidence(e, epochs, teacher_logits, student_logits, queries)
            chosen = conf.topk(min(self.schedule.batch_size, len(conf))).indices
        passes = 1
        if self.schedule.epoch_size == "pool":  # the pool's number of steps, whatever was kept
            passes = -(-len(self.rows) // max(len(chosen), 1))
        order = torch.cat([chosen[torch.randperm(len(chosen), generator=self.order_gen)] for _ in range(passes)])
        self.order = order[: len(self.rows)] if passes > 1 else order
        trained = torch.zeros(len(self.rows), dtype=torch.bool)
        trained[chosen] = True
        self.last_selection = (trained, pred)  # for reports: contact sheets of kept and dropped images
        self.step = 0
        frac = round(len(chosen) / max(len(self.rows), 1), 4)
        info: dict[str, Any] = {
            "selected": len(chosen),
            "selected_fraction": frac,
            "selection_seconds": round(time.time() - t0, 2),
        }
        if self.truth is not None:  # demo only: how clean the chosen subset is (training never reads it)
            t = self.truth[chosen]
            info["selection_precision"] = round(float((t == pred[chosen]).float().mean()), 4)
            info["selected_junk_fraction"] = round(float((t < 0).float().mean()), 4)
        self.epoch_info = info

    # ---------------------------------------------------------------------------- training

    def _batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(global batch size, this rank's pool rows, their uint8 images) from the current step on."""
        assert self.order is not None
        b = self.schedule.batch_size
        steps = max(1, len(self.order) // b)  # drop the ragged tail (BN and equal shards need full batches)
        globs = [self.order[s * b : (s + 1) * b] for s in range(self.step, steps)]
        mine = [self.rows[g[self.rank :: self.world]] for g in globs]
        for g, idx, u8 in zip(globs, mine, self.pool.stream(mine), strict=True):
            yield len(g), idx, u8

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    def _stop_requested(self) -> bool:
        if self.world == 1:
            return self._signal is not None
        if self.step % self.sync_every:  # a collective reads back to the host: only every sync_every steps
            return False
        flag = torch.tensor([0 if self._signal is None else self._signal], dtype=torch.int64)
        if self.device.type == "cuda":
            flag = flag.to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return int(flag.item()) != 0

    def _verdict(self, loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
        """0 finite, 1 non-finite gradient, 2 non-finite loss: a 0-d device tensor, the worst on any
        rank (every rank skips the same steps), never read back here."""
        code = (~torch.isfinite(get_total_norm(grads))).long() if grads else torch.zeros((), dtype=torch.long)
        code = torch.where(torch.isfinite(loss.detach().float()), code.to(loss.device), 2)
        if self.world > 1:
            code = code.reshape(1)
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
            code = code[0]
        return code

    def fit(self) -> list[dict[str, Any]]:
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.epoch < self.schedule.epochs:
                self._run_epoch()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return self.history

    def train_step(self, idx: torch.Tensor, u8: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimiser step on pool rows ``idx`` (uint8 images ``u8``): the named loss terms and the
        step's verdict (``_verdict``). A non-finite loss or gradient skips the update on the device,
        so the host never waits for the GPU here; ``_settle`` reads the verdicts back in batches."""
        x = self._view(u8, augmented=True)
        with self._autocast():
            terms = self.step_fn(x, self.mix_gen, to_device(self.queries[idx], self.device))
        loss = terms["loss"]
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        code = self._verdict(loss, [p.grad for p in self.params if p.grad is not None])
        skip = code.gt(0)
        for o in self.opts:
            if getattr(o, "_step_supports_amp_scaling", False):  # fused: skips the update when found_inf
                o.found_inf = skip.float()  # type: ignore[attr-defined]
                o.step()
            elif not bool(skip):  # an optimiser that cannot skip on the device: the host decides
                o.step()
        if self.ema is not None:  # (after a skipped step the weights are unchanged: the average barely moves)
            self.ema.update()
        return terms, code

    @property
    def student(self) -> nn.Module:
        """The student that is evaluated and shipped: the weight average when ``ema_decay`` is on."""
        return self.ema.module if self.ema is not None else self.method.student

    def _settle(self) -> None:
        """Read back the pending steps' verdicts (one host sync) and account for them in step order:
        count images and steps, and skip or abort on a non-finite step as ``nan_policy`` says."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        codes = torch.stack([c for _, _, c in pending]).tolist()  # the one read-back
        for (step, n_glob, _), code in zip(pending, codes, strict=True):
            if code == 0:
                self._skipped_run, self._seen, self.global_step = 0, self._seen + n_glob, self.global_step + 1
                continue
            self._skipped_run += 1
            self.epoch_info["skipped_steps"] = self.epoch_info.get("skipped_steps", 0) + 1
            msg = f"non-finite {'loss' if code == 2 else 'gradient'} at epoch {self.epoch + 1} step {step + 1}"
            if self.rt.nan_policy == "abort" or self._skipped_run > self.rt.max_skipped:
                raise NonFiniteLoss(msg + " (no step taken with it; the last checkpoint is intact)")
            log.warning("%s: step skipped", msg)

    def _run_epoch(self) -> None:
        if self.order is None:  # (a checkpoint taken mid-epoch carries its order: no new selection)
            self.select()
        self.method.train()
        sums: dict[str, torch.Tensor] = {}
        self._pending, self._seen, self._skipped_run = [], 0, 0
        t0 = time.time()
        assert self.order is not None
        steps = max(1, len(self.order) // self.schedule.batch_size)  # as in _batches
        desc = f"epoch {self.epoch + 1}/{self.schedule.epochs}"
        bar = progress_bar(steps - self.step, desc, unit="step", enabled=self.rank == 0)
        for n_glob, idx, u8 in self._batches():
            bar.update(1)
            if self._stop_requested():
                self._settle()
                self.save()
                signum = self._signal or signal.SIGTERM
                raise TrainingInterrupted(int(signum))
            terms, code = self.train_step(idx, u8)
            kept = code.eq(0)
            for k, v in terms.items():  # a skipped step adds nothing (where, not *: its terms may be NaN)
                term = torch.where(kept, v.detach().float() * len(idx), 0.0)
                sums[k] = sums[k] + term if k in sums else term
            self._pending.append((self.step, n_glob, code))
            self.step += 1
            if len(self._pending) >= self.sync_every:
                self._settle()
        self._settle()
        bar.close()
        seconds = time.time() - t0
        self.sched.step()
        row: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "lr": round(self.schedule.lr * self.schedule.lr_factor(self.epoch), 6),
        }
        for k, v in sums.items():
            total = v.clone()
            if self.world > 1:
                dist.all_reduce(total)
            row[k] = round(float(total) / max(self._seen, 1), 6)
        row.update(self.epoch_info)
        row["skipped_steps"] = self.epoch_info.get("skipped_steps", 0)
        row["train_seconds"] = round(seconds, 2)
        row["images_per_second"] = round(self._seen / max(seconds, 1e-9), 1)
        if self.evaluate is not None and self.rank == 0:
            self.student.eval()
            row.update(self.evaluate(self.student))
        self.history.append(row)
        self.epoch += 1
        self.order, self.step, self.epoch_info = None, 0, {}
        self.save()
        if self.on_epoch is not None and self.rank == 0:
            self.on_epoch(row)
        if self.rank == 0:
            log.info("distill: %s", epoch_line(row, self.schedule.epochs))


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """A short, rounded summary of an epoch's row (the full row goes to the per-epoch CSV)."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row.get('loss', float('nan')):.4g}"]
    if "selected_fraction" in row:
        parts.append(f"selected {row['selected_fraction']:.0%}")
    if "val_accuracy" in row:
        parts.append(f"val {row['val_accuracy']:.4f}")
    parts.append(f"{row['train_seconds']:.1f} s, {row['images_per_second']:.0f} img/s")
    if row.get("skipped_steps"):
        parts.append(f"{row['skipped_steps']} steps skipped")
    return "  ".join(parts)
