"""One fold of training: length-grouped batches, exact loss normalisation, cosine LR, A/B swap augmentation,
held-out log loss every N steps keeping the best adapter, progress with ETA, checkpoint and resume.

Contract:
- The micro-batch stream is a pure function of (lengths, TrainConfig): step ``s`` always sees the same
  rows, in the same A/B orientation, whichever process count or restart produced it. With
  ``swap_pairs`` a micro-batch is ``batch_size / 2`` length-grouped rows, each shown as is and A/B-swapped
  (as the LMSYS 2nd place trained), so an epoch shows every row in both orientations.
- A step's loss is Σ rows' loss / rows in the step (all processes), so accumulation equals one big batch.
- Mixed precision (``modeling``): fp32 master weights for everything trainable, forwards under bf16 /
  fp16 autocast; fp16 scales the loss with a dynamic ``GradScaler`` (a step whose gradients overflow is
  skipped and the scale halved; ``metrics.json`` counts the skipped steps). The loss is computed in fp32.
- Every ``checkpoint_every`` steps a checkpoint is written atomically (temporary folder, then rename):
  trainable weights, AdamW state, the loss scaler, RNG states (CPU and the process's accelerator) and
  progress, as safetensors + JSON (nothing is pickled). A run killed at any point and restarted with the
  same ``out_dir`` continues from its last checkpoint and ends with the same adapter, bit for bit, as an
  uninterrupted run.
- ``out_dir/adapter/`` holds the adapter with the best held-out log loss; ``out_dir/eval_logits.parquet``
  its held-out logits (the fold's out-of-fold logits); ``out_dir/metrics.json`` the history.
- Multi-process runs go through ``accelerate launch`` (torchrun); rank and world size come from the
  ``Accelerator`` passed in or made here, never from globals. DDP by default (one model copy per process,
  gradients all-reduced, every process's weights checksummed at the end); ``TrainConfig.fsdp`` shards the
  model instead (``sharding``: FSDP2): adapters and kept weights are gathered whole before rank 0 saves
  them, checkpoints hold each process's shards (resume on the same process count), no checksum.
- Every process runs the same collectives in the same order: held-out and scoring batches are padded to an
  equal count per process (the padding's logits are dropped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import batching, losses, sharding
from .config import ModelConfig, TrainConfig, to_dict
from .metrics import log_loss, softmax

LossFn = Callable[[Any, Any, np.ndarray, np.ndarray], Any]  # (logits, labels, rows, swapped) → sum


@dataclasses.dataclass
class TrainData:
    """Packed rows of one split, in both A/B orientations."""

    row_ids: np.ndarray
    ids: list[np.ndarray]
    ids_swapped: list[np.ndarray]
    labels: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids])

    def subset(self, mask: np.ndarray) -> TrainData:
        idx = np.flatnonzero(mask)
        return TrainData(self.row_ids[idx], [self.ids[i] for i in idx], [self.ids_swapped[i] for i in idx],
                         self.labels[idx])


def pack_for_training(packer: Any, frame: pd.DataFrame) -> TrainData:
    """Pack ``frame`` as is and A/B-swapped (labels of the swapped rows are permuted at batch time)."""
    plain, swapped = packer.pack_frame_orientations(frame, (False, True))
    return TrainData(plain["id"].to_numpy(), list(plain["input_ids"]), list(swapped["input_ids"]),
                     plain["label"].to_numpy().astype(np.int64))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier at optimiser step ``step`` (0-based), like nanoGPT's get_lr:
    1) linear warm-up over ``warmup`` steps; 2) cosine decay to ``min_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def micro_per_step(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches in one optimiser step, all processes together: ``global_batch / batch_size`` when the
    config fixes the global batch (the same on any process count that divides it), else ``grad_accum ×
    processes``."""
    if not cfg.global_batch:
        return cfg.grad_accum * world_size
    per_step = cfg.global_batch // cfg.batch_size
    if per_step % world_size:
        raise ValueError(f"global_batch {cfg.global_batch} = {per_step} micro-batches of {cfg.batch_size} rows "
                         f"cannot be split evenly over {world_size} processes: pick a process count that divides "
                         f"{per_step}, or another batch_size")
    return per_step


class Stream:
    """The deterministic micro-batch stream of a run: which rows, in which orientation, at each step."""

    def __init__(self, lengths: np.ndarray, cfg: TrainConfig, world_size: int):
        self.lengths, self.cfg, self.world = lengths, cfg, world_size
        self.rows_per_batch = cfg.batch_size // 2 if cfg.swap_pairs else cfg.batch_size
        self.per_epoch = len(batching.length_grouped_batches(lengths, self.rows_per_batch, cfg.seed, 0))
        per_step = micro_per_step(cfg, world_size)
        total_micro = math.ceil(cfg.epochs * self.per_epoch) if cfg.epochs > 0 else 10**12
        # every process gets the same number of micro-batches; with a global batch the run's last partial
        # step is dropped (< global_batch rows an epoch), so the stream is the same for any process count
        total_micro -= total_micro % (per_step if cfg.global_batch else world_size)
        steps = math.ceil(total_micro / per_step)
        self.total_steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
        self.total_micro = min(total_micro, self.total_steps * per_step)
        self._epochs: dict[int, list[tuple[list[int], np.ndarray]]] = {}

    def _epoch(self, epoch: int) -> list[tuple[list[int], np.ndarray]]:
        """The epoch's micro-batches as (rows, swapped flags), cached for the epoch being read."""
        if epoch not in self._epochs:
            batches = batching.length_grouped_batches(self.lengths, self.rows_per_batch, self.cfg.seed, epoch)
            if self.cfg.swap_pairs:  # each row as is, then swapped, in the same micro-batch
                plan = [(rows + rows, np.repeat([False, True], len(rows))) for rows in batches]
            else:
                swaps = np.random.default_rng([self.cfg.seed, epoch, 1]).random(len(self.lengths)) < self.cfg.swap_prob
                plan = [(rows, swaps[rows]) for rows in batches]
            self._epochs = {epoch: plan}
        return self._epochs[epoch]

    def step(self, step: int) -> list[tuple[list[int], np.ndarray]]:
        """All micro-batches of ``step`` (every process's), as (rows, swapped flags)."""
        per_step = micro_per_step(self.cfg, self.world)
        out = []
        for idx in range(step * per_step, min((step + 1) * per_step, self.total_micro)):
            out.append(self._epoch(idx // self.per_epoch)[idx % self.per_epoch])
        return out


def fit(model_cfg: ModelConfig, train_cfg: TrainConfig, train_data: TrainData, eval_data: TrainData,
        out_dir: str | Path, *, accelerator: Any = None, loss_fn: LossFn | None = None,
        progress: bool = True, log: Callable[[str], None] = print, score_train: bool = False,
        extra_identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one fold (resuming from ``out_dir``'s last checkpoint if there is one).

    ``score_train``: the kept (best) model also scores its own training rows, in their given orientation —
    ``out_dir/train_logits.parquet`` (id, logit_a, logit_b, logit_tie), the student's fold-aligned
    distillation targets; written before ``metrics.json``, so a finished fold always has it.

    ``extra_identity``: more of what the fold's result depends on (the prompt format, the split), saved in
    ``fit_config.json`` beside the configs and compared on resume.

    Returns the metrics (also written to ``out_dir/metrics.json``): best held-out log loss and step,
    history, rows/s.
    """
    import torch
    from accelerate import Accelerator

    from .modeling import dtype_for, load_classifier

    accelerator = accelerator or Accelerator()
    refuse_fsdp(accelerator)
    if accelerator.mixed_precision != "no":  # it would autocast and scale the loss a second time
        raise ValueError(f"accelerate's mixed_precision is {accelerator.mixed_precision!r}: lmsys_lib runs its own "
                         "autocast over fp32 masters (model.dtype) — launch with mixed_precision 'no' (the configs "
                         "in configs/accelerate/ do; unset $ACCELERATE_MIXED_PRECISION and --mixed_precision)")
    if train_cfg.fsdp and accelerator.num_processes < 2:  # before the model loads
        raise ValueError("train.fsdp shards over several processes: launch with accelerate (a MULTI_GPU config, "
                         "e.g. configs/accelerate/8xA100-fsdp.yaml) — one process has nothing to shard over")
    if train_cfg.fsdp and model_cfg.quantization == "nf4":
        raise ValueError("train.fsdp with a 4-bit (nf4) base is not supported: a 4-bit model fits one GPU per "
                         "process — train it with DDP (configs/accelerate/8xA100-ddp-qlora.yaml)")
    out_dir = Path(out_dir)
    _guard_configs(out_dir, model_cfg, train_cfg, accelerator, extra_identity or {})
    torch.manual_seed(train_cfg.seed)  # the head's initialisation and LoRA's
    stream = Stream(train_data.lengths, train_cfg, accelerator.num_processes)
    if stream.total_steps < 1:  # before any model loads
        raise ValueError(f"{out_dir}: {len(train_data.ids)} training rows make no optimiser step of "
                         f"{micro_per_step(train_cfg, accelerator.num_processes)} micro-batches of "
                         f"{train_cfg.batch_size} rows: lower global_batch/batch_size or use more rows")
    model, tokenizer = load_classifier(model_cfg, accelerator.device)
    if train_cfg.fsdp:  # FSDP2 instead of accelerate's DDP wrapper; the optimizer sees the sharded parameters
        model = sharding.shard(model)
        optimizer = _optimizer(model, train_cfg)
    else:
        optimizer = _optimizer(model, train_cfg)
        model, optimizer = accelerator.prepare(model, optimizer)
    precision = Precision.for_device(accelerator.device, dtype_for(accelerator.device, model_cfg.dtype))
    state = _resume(out_dir, accelerator, model, optimizer, precision.scaler) or {
        "step": 0, "best_loss": None, "best_step": None, "history": [], "skipped_steps": 0}
    ctx = _Loop(accelerator, model, optimizer, tokenizer.pad_token_id, train_cfg, stream,
                loss_fn or _ce_loss, out_dir, log, score_train, precision)
    try:
        return ctx.run(state, train_data, eval_data, progress)
    finally:
        # One accelerator serves every fold of a stage: drop its references to this fold's model and
        # optimiser, or each fold's weights and AdamW state would stay resident (on a GPU: OOM by fold 2).
        del ctx, model, optimizer
        accelerator.free_memory()


def refuse_fsdp(accelerator: Any = None) -> None:
    """accelerate's FSDP plugin is refused before anything loads (asked for by ``accelerate launch``,
    ``$ACCELERATE_USE_FSDP``, or run by the accelerator): this loop shards with FSDP2 itself
    (``TrainConfig.fsdp`` under a MULTI_GPU launch), which also runs on CPU processes — the plugin cannot."""
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")
    if asked or (accelerator is not None and accelerator.distributed_type == DistributedType.FSDP):
        raise NotImplementedError("accelerate's FSDP plugin is not supported by lmsys_lib's training loop: launch "
                                  "with a MULTI_GPU config (configs/accelerate/8xA100-fsdp.yaml) and set "
                                  "train.fsdp = true to shard the model; or use DDP (one model copy per GPU: "
                                  "8xA100-ddp-qlora.yaml for 4-bit QLoRA teachers, 8xA100-ddp.yaml for a 16-bit "
                                  "LoRA student)")


def _ce_loss(logits: Any, labels: Any, rows: np.ndarray, swapped: np.ndarray) -> Any:
    return losses.cross_entropy_sum(logits, labels)


@dataclasses.dataclass
class Precision:
    """How a run computes: the autocast dtype on its device, and the fp16 loss scaler (else None)."""

    device: Any
    compute: Any
    scaler: Any = None

    @classmethod
    def for_device(cls, device: Any, compute: Any) -> Precision:
        import torch

        device = torch.device(device)
        scaler = torch.amp.GradScaler(device.type) if compute == torch.float16 else None
        return cls(device, compute, scaler)

    def autocast(self) -> Any:
        from .modeling import autocast

        return autocast(self.device, self.compute)

    def scale(self, loss: Any) -> Any:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def step(self, optimizer: Any) -> bool:
        """``optimizer.step()`` through the scaler; returns whether the step was skipped (fp16 overflow)."""
        if self.scaler is None:
            optimizer.step()
            return False
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() < scale

    @property
    def name(self) -> str:
        return str(self.compute).rsplit(".", 1)[-1]


def _optimizer(model: Any, cfg: TrainConfig) -> Any:
    import torch

    head, body = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if ".score." in f".{name}." or name.startswith("score.") else body).append(p)
    groups = [{"params": body, "lr": cfg.lr, "base_lr": cfg.lr},
              {"params": head, "lr": cfg.head_lr or cfg.lr, "base_lr": cfg.head_lr or cfg.lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=cfg.betas, weight_decay=cfg.weight_decay)


class _Loop:
    """The training loop's state and steps (kept small: each method is one concern)."""

    def __init__(self, accelerator, model, optimizer, pad_id, cfg, stream, loss_fn, out_dir, log, score_train,
                 precision):
        self.acc, self.model, self.opt, self.pad_id = accelerator, model, optimizer, pad_id
        self.cfg, self.stream, self.loss_fn, self.out_dir, self.log = cfg, stream, loss_fn, out_dir, log
        self.score_train, self.precision = score_train, precision
        self.sharded = sharding.is_sharded(model)
        self.warmup = int(cfg.warmup_ratio * stream.total_steps)

    def run(self, state: dict[str, Any], train: TrainData, held_out: TrainData, progress: bool) -> dict[str, Any]:
        from tqdm.auto import tqdm

        total = self.stream.total_steps
        bar = tqdm(total=total, initial=state["step"], desc="train", unit="step",
                   disable=not (progress and self.acc.is_main_process))
        start, seen = time.perf_counter(), 0
        for step in range(state["step"], total):
            loss, rows, skipped = self._step(step, train)
            seen += rows
            state["step"] = step + 1
            state["skipped_steps"] = state.get("skipped_steps", 0) + int(skipped)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            due = self.cfg.eval_every and state["step"] % self.cfg.eval_every == 0
            if due or state["step"] == total:
                self._evaluate(state, held_out, train_loss=loss)
            if self.cfg.checkpoint_every and state["step"] % self.cfg.checkpoint_every == 0 and state["step"] < total:
                self._checkpoint(state)
        bar.close()
        elapsed = time.perf_counter() - start
        if self.score_train:
            self._score_train(state, train)
        metrics = self._finish(state, seen / elapsed if elapsed > 0 else 0.0)
        if self.acc.is_main_process:
            (self.out_dir / BEST_WEIGHTS).unlink(missing_ok=True)  # only now: a crash before metrics needs it
        return metrics

    def _score_train(self, state: dict[str, Any], train: TrainData) -> None:
        """The kept model's logits on its own training rows → train_logits.parquet."""
        if state["best_step"] != state["step"]:  # the last step is not the kept one: load the kept weights
            sharding.load_full_trainable(self.acc.unwrap_model(self.model), self.out_dir / BEST_WEIGHTS)
        logits = predict_logits(self.acc, self.model, train.ids, self.pad_id, self.cfg.eval_batch_size,
                                self.precision.compute)
        if self.acc.is_main_process:
            pd.DataFrame({"id": train.row_ids, "logit_a": logits[:, 0], "logit_b": logits[:, 1],
                          "logit_tie": logits[:, 2]}).to_parquet(self.out_dir / "train_logits.parquet")
        self.log(f"the kept model (step {state['best_step']}) scored its {len(train.ids)} training rows → "
                 f"{self.out_dir / 'train_logits.parquet'}")
        self.acc.wait_for_everyone()

    def _step(self, step: int, train: TrainData) -> tuple[float, int, bool]:
        """One optimiser step; returns (mean train loss of this process's rows, rows this process saw,
        whether the fp16 scaler skipped the step)."""
        micro_all = self.stream.step(step)
        rows_in_step = sum(len(rows) for rows, _ in micro_all)
        mine = micro_all[self.acc.process_index:: self.acc.num_processes]
        factor = lr_factor(step, self.stream.total_steps, self.warmup, self.cfg.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        total_loss, total_rows = 0.0, 0
        for j, (rows, swapped) in enumerate(mine):
            batch = self._batch(train, rows, swapped)
            last = j == len(mine) - 1  # FSDP reduce-scatters every micro-batch (sharding's contract)
            sync = nullcontext() if last or self.sharded else self.acc.no_sync(self.model)
            with sync:
                with self.precision.autocast():
                    logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                row_sum = self.loss_fn(logits.float(), batch["labels"], np.asarray(rows), swapped)  # fp32 loss
                loss = losses.step_loss(row_sum, rows_in_step, self.acc.num_processes)
                self.acc.backward(self.precision.scale(loss))
            total_loss += float(row_sum.detach())
            total_rows += len(rows)
        if self.precision.scaler is not None:
            self.precision.scaler.unscale_(self.opt)  # clip the true gradients
        if self.cfg.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        skipped = self.precision.step(self.opt)
        self.opt.zero_grad(set_to_none=True)
        return total_loss / max(1, total_rows), total_rows, skipped

    def _batch(self, data: TrainData, rows: list[int], swapped: np.ndarray) -> dict[str, Any]:
        from .parsing import swap_labels

        ids = [data.ids_swapped[r] if s else data.ids[r] for r, s in zip(rows, swapped)]
        labels = np.where(swapped, swap_labels(data.labels[rows]), data.labels[rows])
        batch = batching.collate(ids, self.pad_id, labels)
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def _evaluate(self, state: dict[str, Any], held_out: TrainData, train_loss: float) -> None:
        logits = predict_logits(self.acc, self.model, held_out.ids, self.pad_id, self.cfg.eval_batch_size,
                                self.precision.compute)
        loss = log_loss(held_out.labels, softmax(logits))
        state["history"].append({"step": state["step"], "train_loss": train_loss, "eval_log_loss": loss})
        self.log(f"step {state['step']}/{self.stream.total_steps}: train loss {train_loss:.4f}, "
                 f"held-out log loss {loss:.4f}")
        if state["best_loss"] is None or loss < state["best_loss"]:
            state["best_loss"], state["best_step"] = loss, state["step"]
            model = self.acc.unwrap_model(self.model)
            main = self.acc.is_main_process
            # sharded: a collective on every process, whole tensors kept by rank 0 alone
            whole = sharding.full_trainable(model, keep=main) if self.sharded else None
            if main:
                save_adapter(model, self.out_dir / "adapter", whole)
                if self.score_train:  # the kept weights, to score the training rows with after the last step
                    _save_weights(whole if whole is not None else sharding.full_trainable(model),
                                  self.out_dir / BEST_WEIGHTS)
                pd.DataFrame({"id": held_out.row_ids, "logit_a": logits[:, 0], "logit_b": logits[:, 1],
                              "logit_tie": logits[:, 2]}).to_parquet(self.out_dir / "eval_logits.parquet")
        self.acc.wait_for_everyone()

    def _checkpoint(self, state: dict[str, Any]) -> None:
        write_checkpoint(self.out_dir, state, self.acc, self.model, self.opt, self.precision.scaler)

    def _finish(self, state: dict[str, Any], rows_per_s: float) -> dict[str, Any]:
        checksums = [] if self.sharded else rank_checksums(self.acc, self.model)  # FSDP: one copy, in shards
        if checksums and max(checksums) != min(checksums):
            raise RuntimeError(f"processes ended with different weights (checksums {checksums})")
        metrics = {"best_eval_log_loss": state["best_loss"], "best_step": state["best_step"],
                   "steps": state["step"], "history": state["history"], "rows_per_s_last_session": rows_per_s,
                   "processes": self.acc.num_processes, "rank_checksums": checksums, "fsdp": self.sharded,
                   "compute_dtype": self.precision.name, "skipped_steps": state.get("skipped_steps", 0),
                   "loss_scale": self.precision.scaler.get_scale() if self.precision.scaler is not None else None}
        if self.acc.is_main_process:
            (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        self.acc.wait_for_everyone()
        return metrics


def rank_checksums(accelerator: Any, model: Any) -> list[float]:
    """Σ of every trainable weight (fp64) on each process: DDP must leave them identical."""
    import torch

    with torch.no_grad():
        local = float(sum(p.detach().double().sum()
                          for p in sharding.trainable(accelerator.unwrap_model(model)).values()))
    if accelerator.num_processes == 1:
        return [local]
    from accelerate.utils import gather_object

    return [float(x) for x in gather_object([local])]


def predict_logits(accelerator: Any, model: Any, ids: list[np.ndarray], pad_id: int,
                   batch_size: int, dtype: Any = None) -> np.ndarray:
    """(n, 3) fp32 logits in input order (forwards under autocast to ``dtype`` when given); batches
    length-sorted and shared between processes."""
    from .modeling import logits_of_batches

    if not ids:  # the same on every process: no forward, no collective
        return np.zeros((0, 3), dtype=np.float32)
    batches = batching.sorted_batches([len(x) for x in ids], batch_size)
    mine = batches[accelerator.process_index:: accelerator.num_processes]
    per_process = -(-len(batches) // accelerator.num_processes)
    filler = [(mine or batches)[-1]] * (per_process - len(mine))  # equal forwards on every process
    results = logits_of_batches(model, ids, mine + filler, pad_id, accelerator.device, dtype)[:len(mine)]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    logits = np.zeros((len(ids), 3), dtype=np.float32)
    for rows, block in results:
        logits[rows] = block
    return logits


def save_adapter(model: Any, path: Path, weights: dict[str, Any] | None = None) -> None:
    """The trainable part as a loadable folder: a PEFT adapter, or a full checkpoint (lora_r = 0).
    ``weights``: the whole trainable tensors of a sharded model (``sharding.full_trainable``)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if weights is None:
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# -- checkpoints -------------------------------------------------------------------------------------


def fit_identity(model_cfg: ModelConfig, train_cfg: TrainConfig, processes: int) -> dict[str, Any]:
    """What a fold's result depends on: the configs, with the model named by ``zoo.model_identity`` (not by
    the folder it was read from on this node), and the process count only when the config leaves the global
    batch to it (``global_batch = 0``: a step is ``batch_size × grad_accum × processes`` rows)."""
    from .zoo import model_identity

    model = to_dict(model_cfg) | {"model_dir": model_identity(model_cfg.model_dir)}
    return {"model": model, "train": to_dict(train_cfg)} | ({} if train_cfg.global_batch else {"processes": processes})


def has_progress(out_dir: Path) -> bool:
    """Whether a fold folder holds anything a restart would keep: a checkpoint, an adapter or its metrics."""
    return (latest_checkpoint(out_dir) is not None or (out_dir / "metrics.json").exists()
            or (out_dir / "adapter").exists())


def _guard_configs(out_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, accelerator: Any,
                   extra: dict[str, Any]) -> None:
    """Save the configs beside the fold's output; refuse to resume a folder trained with other configs.
    A folder with no progress yet (a launch that failed before its first checkpoint) locks nothing."""
    wanted = fit_identity(model_cfg, train_cfg, accelerator.num_processes) | extra
    path = out_dir / "fit_config.json"
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved == wanted:
            return
        if has_progress(out_dir):
            raise ValueError(f"{out_dir} holds a run with other configs ({path}); use another folder, or force "
                             "the stage to train it again")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted, indent=2, sort_keys=True), encoding="utf-8")
    accelerator.wait_for_everyone()


def write_checkpoint(out_dir: Path, state: dict[str, Any], accelerator: Any, model: Any, optimizer: Any,
                     scaler: Any = None, keep: int = 2) -> Path:
    """Atomically write checkpoints/step-NNNNNN (weights, AdamW state, loss scaler, RNG, progress); keep
    the last ``keep``."""
    from safetensors.torch import save_file

    root = out_dir / "checkpoints"
    final = root / f"step-{state['step']:06d}"
    tmp = root / f".tmp-step-{state['step']:06d}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(rng_states(accelerator.device), tmp / f"rng-rank{rank}.safetensors")
    unwrapped = accelerator.unwrap_model(model)
    if sharding.is_sharded(unwrapped):  # FSDP: every process writes its own shards
        _save_weights(sharding.local_trainable(unwrapped), tmp / f"trainable-rank{rank}.safetensors")
        tensors, meta = _optimizer_to_tensors(sharding.local_optimizer(optimizer.state_dict()))
        save_file(tensors, tmp / f"optimizer-rank{rank}.safetensors")
        (tmp / f"optimizer-rank{rank}.json").write_text(json.dumps(meta), encoding="utf-8")
    elif accelerator.is_main_process:
        _save_weights(sharding.local_trainable(unwrapped), tmp / "trainable.safetensors")
        tensors, meta = _optimizer_to_tensors(optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta), encoding="utf-8")
    if accelerator.is_main_process:
        saved = state | {"scaler": scaler.state_dict() if scaler is not None else None,
                         "sharded_processes": accelerator.num_processes if sharding.is_sharded(unwrapped) else 0}
        (tmp / "state.json").write_text(json.dumps(saved), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (temporary folders of a killed write are ignored)."""
    found = sorted((out_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def rng_states(device: Any) -> dict[str, Any]:
    """The random generators a process draws from: the CPU's, and its accelerator's (CUDA) when it has one."""
    import torch

    states = {"rng": torch.get_rng_state()}
    device = torch.device(device)
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict[str, Any], device: Any) -> None:
    """Undo ``rng_states``: the CPU generator, and the CUDA one when saved and this process has a GPU."""
    import torch

    torch.set_rng_state(states["rng"])
    device = torch.device(device)
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"], device)
    elif device.type == "cuda":
        print("the checkpoint holds no CUDA RNG state (written on a CPU): dropout on this GPU continues from "
              "its seeded generator")


def _resume(out_dir: Path, accelerator: Any, model: Any, optimizer: Any,
            scaler: Any = None) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    unwrapped = accelerator.unwrap_model(model)
    written = state.pop("sharded_processes", 0)
    if written != (accelerator.num_processes if sharding.is_sharded(unwrapped) else 0):
        raise ValueError(f"checkpoint {path} was written " + (f"sharded over {written} processes" if written else
                         "unsharded") + f"; this run is {'sharded over ' if sharding.is_sharded(unwrapped) else ''}"
                         f"{accelerator.num_processes} process(es): resume it as it was written, or train anew")
    suffix = f"-rank{accelerator.process_index}" if written else ""
    try:
        sharding.load_local_trainable(unwrapped, load_file(path / f"trainable{suffix}.safetensors"))
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: {err}") from None
    meta = json.loads((path / f"optimizer{suffix}.json").read_text(encoding="utf-8"))
    saved = _optimizer_from_tensors(load_file(path / f"optimizer{suffix}.safetensors"), meta)
    optimizer.load_state_dict(sharding.sharded_optimizer(saved, optimizer) if written else saved)
    rng_file = path / f"rng-rank{accelerator.process_index}.safetensors"
    if rng_file.exists():
        restore_rng(load_file(rng_file), accelerator.device)
    else:  # resumed on more processes than wrote the checkpoint: this rank keeps its seeded generator
        print(f"{path} has no RNG state for process {accelerator.process_index}: dropout continues from a fresh "
              "seed there (the weights and the data order are unaffected; bit-exact resume needs the same count)")
    scaler_state = state.pop("scaler", None)
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    if accelerator.is_main_process:
        print(f"resumed from {path} (step {state['step']})")
    return state


BEST_WEIGHTS = "best_trainable.safetensors"  # the kept step's trainable weights, while score_train needs them


def _save_weights(weights: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp)
    os.replace(tmp, path)


def _optimizer_to_tensors(sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """AdamW state_dict → (flat tensors, JSON-able rest), so it can be saved without pickle."""
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            if hasattr(value, "shape"):
                tensors[f"{idx}.{key}"] = value.contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
