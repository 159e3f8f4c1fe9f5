"""Typed, frozen configs — one dataclass per stage — and the run-folder guard.

Contract:
- Every config is a frozen dataclass; ``from_dict`` refuses unknown keys with an error that names them,
  and ``__post_init__`` checks ranges so a bad value fails at construction, not deep inside a stage.
- A stage saves the exact config it ran with as ``<run>/config/<stage>.json``. ``claim_stage`` is the
  guard every stage calls first: an identical saved config means "already done" (a no-op unless forced);
  a different one means another run's output lives there and the stage refuses to overwrite it.

This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class StageConflictError(RuntimeError):
    """A stage would overwrite the output of a run made with another config."""


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build config ``cls`` from a plain dict; unknown keys raise ``ValueError`` naming them.

    Lists are turned back into tuples where the field default is a tuple, so a config survives a JSON
    round trip unchanged.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys are {sorted(fields)}")
    values = {}
    for key, value in data.items():
        default = fields[key].default
        if dataclasses.is_dataclass(default):  # a nested stage config, given as an object
            if not isinstance(value, dict):
                raise ValueError(f"{cls.__name__}.{key}: expected an object of {type(default).__name__} fields")
            try:
                value = from_dict(type(default), value)
            except ValueError as err:
                raise ValueError(f"{cls.__name__}.{key}: {err}") from None
        value = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
        values[key] = _typed(cls.__name__, key, default, value)
    return cls(**values)


def _typed(owner: str, key: str, default: Any, value: Any) -> Any:
    """``value`` if it has the type of the field's default (an int is accepted for a float)."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"{owner}.{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Config (a dataclass, or already a dict) → plain JSON-able dict (tuples become lists)."""
    data = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    return json.loads(json.dumps(data))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """The embedded default data set (``lmsys_lib.synthetic``)."""

    n_train: int = 2000
    n_test: int = 300
    seed: int = 0
    n_models: int = 24
    multi_turn_rate: float = 0.13  # share of rows with 2+ rounds (real data: ~13 %)
    null_turn_rate: float = 0.0035  # share of rows with a `null` turn (real data: ~0.35 %)
    identical_rate: float = 0.02  # share of rows whose two responses are identical
    max_chars: int = 25_000  # longest response, in characters (the real tail reaches ~25k)

    def __post_init__(self) -> None:
        _check(self.n_train >= 1 and self.n_test >= 1, "n_train and n_test must be >= 1")
        _check(2 <= self.n_models <= 64, "n_models must be in [2, 64]")
        for name in ("multi_turn_rate", "null_turn_rate", "identical_rate"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]")
        _check(self.max_chars >= 1000, "max_chars must be >= 1000")


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """Conversation → token ids (``lmsys_lib.prompting``).

    ``fractions`` split the content budget of a round between prompt / response A / response B; what a
    short part does not use goes to the others. A and B must get equal shares so that swapping A and B
    only swaps the parts (the model must not learn a position from its budget).
    """

    max_length: int = 2048
    fractions: tuple[float, float, float] = (0.2, 0.4, 0.4)
    keep_rounds: str = "last"  # "last": drop the earliest rounds first; "first": drop the latest
    cut: str = "end"  # where a too-long part loses tokens: "end", "start" or "middle"
    cut_marker: str = " [...] "
    min_round_tokens: int = 48  # a round that does not fit is kept only if this much content budget remains
    prompt_header: str = "<prompt>: "
    a_header: str = "\n\n<response_a>: "
    b_header: str = "\n\n<response_b>: "
    round_separator: str = "\n\n"
    tail: str = "\n\nWhich response is better?"
    use_chat_template: bool = False  # wrap the packed text as one user turn of the tokenizer's template

    def __post_init__(self) -> None:
        _check(self.max_length >= 16, "max_length must be >= 16")
        _check(len(self.fractions) == 3 and all(f > 0 for f in self.fractions),
               "fractions must be three positive numbers (prompt, response_a, response_b)")
        _check(abs(self.fractions[1] - self.fractions[2]) < 1e-12,
               "fractions for response_a and response_b must be equal (the A/B swap invariant)")
        _check(self.keep_rounds in ("last", "first"), "keep_rounds must be 'last' or 'first'")
        _check(self.cut in ("end", "start", "middle"), "cut must be 'end', 'start' or 'middle'")
        _check(self.cut_marker != "", "cut_marker must be visible (non-empty)")
        _check(self.min_round_tokens >= 1, "min_round_tokens must be >= 1")


@dataclasses.dataclass(frozen=True)
class FoldConfig:
    """Grouped k-fold split (``parsing.grouped_folds``)."""

    k: int = 5
    seed: int = 42

    def __post_init__(self) -> None:
        _check(self.k >= 2, "k must be >= 2")


LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A 3-class classifier built from a decoder checkpoint (``lmsys_lib.modeling``).

    ``lora_r = 0`` trains every weight (full fine-tuning, for tiny models); otherwise LoRA on
    ``target_modules`` with the classification head trained in full. ``quantization="nf4"`` loads the base
    in 4-bit (bitsandbytes nf4, double quantisation) for QLoRA. ``dtype`` is the compute (autocast) dtype
    and the frozen weights' storage; trainable tensors are always fp32 masters. ``"auto"`` follows the
    device: bf16 on sm >= 80, fp16 + loss scaling on older GPUs (T4 is sm75: no bf16), fp32 on CPU.
    ``attn_implementation="auto"``: for a checkpoint with attention logit soft-capping (Gemma-2), which SDPA
    drops, flash-attention-2 on sm >= 80 with ``flash_attn`` installed, else eager; SDPA otherwise.
    """

    model_dir: str = ""
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = LINEAR_PROJECTIONS
    quantization: str = "none"  # "none" or "nf4"
    dtype: str = "auto"  # "auto", "bf16", "fp16" or "fp32"
    attn_implementation: str = "auto"  # "auto", "eager", "sdpa" or "flash_attention_2"
    gradient_checkpointing: bool = False
    head_init: str = "scaled"  # a new score head: "scaled" (std 1/hidden_size, starts near uniform) or "model"

    def __post_init__(self) -> None:
        _check(self.head_init in ("scaled", "model"), "head_init must be 'scaled' or 'model'")
        _check(self.lora_r >= 0 and self.lora_alpha > 0, "lora_r must be >= 0 and lora_alpha > 0")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout must be in [0, 1)")
        _check(self.quantization in ("none", "nf4"), "quantization must be 'none' or 'nf4'")
        _check(self.dtype in ("auto", "bf16", "fp16", "fp32"), "dtype must be auto, bf16, fp16 or fp32")
        _check(self.attn_implementation in ("auto", "eager", "sdpa", "flash_attention_2"),
               "attn_implementation: auto, eager, sdpa or flash_attention_2")
        _check(not (self.quantization == "nf4" and self.lora_r == 0), "nf4 (QLoRA) needs lora_r > 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One fold of training (``lmsys_lib.train``).

    One optimiser step sees ``global_batch`` rows when it is set — the same run on 1 or 8 processes (each
    takes ``global_batch / batch_size / processes`` micro-batches) — else ``batch_size × grad_accum ×
    processes`` rows. The loss of a step is the sum of its rows' losses divided by that true row count (a short
    last step is not over-weighted).
    """

    epochs: float = 1.0
    max_steps: int = 0  # > 0: stop after this many optimiser steps (before the epochs end)
    batch_size: int = 4  # rows per micro-batch, length-grouped
    grad_accum: int = 4  # micro-batches per process per step (used when global_batch = 0)
    global_batch: int = 0  # > 0: rows per optimiser step on any process count (grad_accum follows from it)
    lr: float = 1e-4
    head_lr: float = 0.0  # 0: same as lr
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1  # the cosine ends at lr × min_lr_ratio
    max_grad_norm: float = 1.0
    swap_prob: float = 0.5  # A/B swap augmentation: share of rows shown swapped (labels permuted)
    swap_pairs: bool = False  # each micro-batch holds batch_size/2 rows, each in both orientations (swap_prob unused)
    eval_every: int = 50  # optimiser steps between held-out evaluations (0: only at the end)
    checkpoint_every: int = 50  # optimiser steps between resumable checkpoints (0: never)
    eval_batch_size: int = 8
    seed: int = 42
    fsdp: bool = False  # shard weights, masters and AdamW state over the processes (FSDP2; lmsys_lib.sharding)

    def __post_init__(self) -> None:
        _check(self.epochs > 0 or self.max_steps > 0, "give epochs > 0 or max_steps > 0")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        _check(self.global_batch >= 0 and self.global_batch % self.batch_size == 0,
               "global_batch must be 0 or a multiple of batch_size")
        _check(self.lr > 0 and self.head_lr >= 0, "lr must be > 0 and head_lr >= 0")
        _check(0.0 <= self.warmup_ratio < 1.0 and 0.0 <= self.min_lr_ratio <= 1.0,
               "warmup_ratio in [0, 1), min_lr_ratio in [0, 1]")
        _check(0.0 <= self.swap_prob <= 1.0, "swap_prob must be in [0, 1]")
        _check(not self.swap_pairs or self.batch_size % 2 == 0, "swap_pairs needs an even batch_size (row + its swap)")
        _check(self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every, checkpoint_every >= 0")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Optional first stage of a teacher or student: post-pretraining on extra preference data
    (``teacher.post_pretrain``).

    ``data`` lists extra data files (the 33k set, UltraFeedback-derived; see ``parsing.read_extra``); a
    relative path is inside the run folder (``data/extra.csv``, from ``lmsys prepare --extra``); empty
    means no post-pretraining. Rows that repeat a competition train conversation are dropped first (they
    would leak labels into the folds). The adapter is merged (fp32) into a new base that the folds start from.
    """

    data: tuple[str, ...] = ()
    train: TrainConfig = TrainConfig(epochs=1.0, eval_every=0)
    held_out_share: float = 0.05  # rows kept aside to report the post-pretraining log loss
    seed: int = 0  # which side is A for chosen/rejected data

    def __post_init__(self) -> None:
        _check(0.0 < self.held_out_share < 1.0, "held_out_share must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """A teacher: k-fold training and OOF logits (``lmsys_lib.teacher``); ``folds`` empty = all folds.

    ``model.model_dir`` may name a zoo model as ``zoo:<name>`` (converted into the models cache on first use).
    """

    name: str = "teacher"
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    pack: PackConfig = PackConfig(max_length=1024)
    folds: tuple[int, ...] = ()
    fraction: float = 1.0  # dry run: train and evaluate on this share of each fold
    pretrain: PretrainConfig = PretrainConfig()

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "name must be a plain folder name")
        _check(0.0 < self.fraction <= 1.0, "fraction must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The student: k-fold distillation from the run's teachers (``lmsys_lib.distill``).

    ``teachers`` names teachers of the run (``teachers/<name>/``); empty trains the same student on hard labels
    only (the no-distillation baseline). ``targets = "in_fold"`` (the first place's way, default): student fold
    k learns, for each of its training rows, the logits of teacher fold k — a model that never saw fold k, so
    the student's held-out fold stays clean; ``"oof"``: the teachers' out-of-fold logits (each row's logit from
    the one teacher fold that did not train on it — but that fold trained on the student's held-out rows).
    ``pretrain``: post-pretraining of the student first, as for a teacher. ``loss``: ``"kl"`` = ce_weight·CE + (1 − ce_weight)·
    Σ_t w_t·T²·KL(teacher_t ‖ student) / Σ_t w_t; ``"winner"`` = the first-place mix
    (CE + Σ_t [KL_t + cosine_t]) / (1 + 2·teachers). A teacher must cover every train id exactly once, unless
    ``allow_missing_teacher_rows`` — then its absent rows are masked out of its term.
    """

    name: str = "student"
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    pack: PackConfig = PackConfig(max_length=1024)
    teachers: tuple[str, ...] = ()
    teacher_weights: tuple[float, ...] = ()  # empty: equal weights
    loss: str = "kl"
    temperature: float = 1.0
    ce_weight: float = 0.5
    allow_missing_teacher_rows: bool = False
    targets: str = "in_fold"  # "in_fold": fold k learns teacher fold k's logits of its rows; "oof": the OOF logits
    folds: tuple[int, ...] = ()
    fraction: float = 1.0
    pretrain: PretrainConfig = PretrainConfig()

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "name must be a plain folder name")
        _check(self.loss in ("kl", "winner"), "loss must be 'kl' or 'winner'")
        _check(self.targets in ("in_fold", "oof"), "targets must be 'in_fold' or 'oof'")
        _check(self.temperature > 0 and 0.0 <= self.ce_weight <= 1.0, "temperature > 0, ce_weight in [0, 1]")
        _check(not self.teacher_weights or len(self.teacher_weights) == len(self.teachers),
               "teacher_weights: one per teacher (or empty for equal weights)")
        _check(all(w >= 0 for w in self.teacher_weights), "teacher_weights must be >= 0")
        _check(len(set(self.teachers)) == len(self.teachers), "teachers must be distinct")
        _check(0.0 < self.fraction <= 1.0, "fraction must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """GPTQ of a merged classifier (``lmsys_lib.quantize``) and the bar its fidelity report must clear.

    Calibration rows are packed from the training data at ``calib_max_length`` and drawn across the length
    distribution (one row from each of ``calib_rows`` length bins), so long rows are represented. The
    first-place recipe: 8 bits, group size 128, 128 training texts, length 2,100. ``dtype="auto"``
    quantises and runs in fp16 on a GPU (what a T4 runs; GPTQ Marlin on sm75 takes fp16 only) and in the
    CPU's compute dtype on a CPU (``modeling.cpu_dtype``: fp32 unless the CPU has native bf16). The fidelity
    report compares the quantised model with the unquantised one in that same dtype; ``max_mean_kl`` / ``min_agreement`` turn a bad quantisation into
    an error (``max_row_kl`` too when > 0).
    """

    bits: int = 8
    group_size: int = 128  # -1: one group per output channel
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.1
    calib_rows: int = 128
    calib_max_length: int = 2100
    calib_seed: int = 0
    dtype: str = "auto"  # "auto", "fp16", "bf16" or "fp32" (a CPU without native bf16)
    max_mean_kl: float = 1e-3
    max_row_kl: float = 0.0  # 0: not checked
    min_agreement: float = 0.98
    eval_batch_size: int = 8
    max_shard_gb: float = 4.0
    fit_temperature_rows: int = 200  # refit T on the quantised model's TTA output with this many holdout rows (0: never)
    attention_gate: bool = True  # a soft-capping model (Gemma-2): sdpa without the cap only if it passes on the holdout
    inference_max_length: int = 2048  # the length the submission kernel packs at: the gate and T are measured there
    attention_max_mean_kl: float = 1e-3  # the gate: mean KL(eager ‖ sdpa) on the holdout …
    attention_max_delta_log_loss: float = 2e-3  # … and sdpa's log loss at most this much above eager's

    def __post_init__(self) -> None:
        _check(self.bits in (4, 8), "bits must be 8 or 4")
        _check(self.fit_temperature_rows >= 0, "fit_temperature_rows must be >= 0")
        _check(self.inference_max_length >= 16, "inference_max_length must be >= 16")
        _check(self.group_size == -1 or self.group_size >= 16, "group_size must be -1 or >= 16")
        _check(0.0 < self.damp_percent < 1.0, "damp_percent must be in (0, 1)")
        _check(self.calib_rows >= 1 and self.calib_max_length >= 16, "calib_rows >= 1, calib_max_length >= 16")
        _check(self.dtype in ("auto", "fp16", "bf16", "fp32"), "dtype must be auto, fp16, bf16 or fp32")
        _check(self.max_mean_kl > 0 and self.max_row_kl >= 0, "max_mean_kl > 0, max_row_kl >= 0")
        _check(0.0 <= self.min_agreement <= 1.0, "min_agreement must be in [0, 1]")
        _check(self.eval_batch_size >= 1 and self.max_shard_gb > 0, "eval_batch_size >= 1, max_shard_gb > 0")


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """The offline inference kernel (``lmsys_lib.inference``).

    Rows are packed with ``pack`` (the model's training format), sorted by length and batched under
    ``token_budget`` padded tokens. ``tta``: anytime swap-TTA — after every row is scored once, the time left
    goes to scoring rows with A and B swapped, most uncertain first (``tta_rank``: "margin" or "entropy" of
    the first pass), and a row with both passes gets the mean of the un-permuted probabilities. The deadline
    (``time_budget_s``, counted from the kernel's start) projects the finish with a length-aware time model;
    when the first pass would not fit, the longest rows that do not fit are re-packed at
    ``degrade_max_length``, then what is left at the deadline gets the prior. Predictions are checkpointed
    every ``checkpoint_every`` rows.
    """

    pack: PackConfig = PackConfig(max_length=2048)
    token_budget: int = 16384  # padded tokens per forward (rows × longest row)
    max_batch_rows: int = 64
    tta: bool = True
    tta_rank: str = "margin"  # which rows get the swapped pass first: "margin" (measured better) or "entropy"
    time_budget_s: float = 9 * 3600.0 - 45 * 60  # Kaggle's 9 h minus 45 min: blur (15), start-up, writing
    degrade_max_length: int = 1024
    checkpoint_every: int = 1000  # rows between checkpoints (whole batches)
    rule_priors: bool = True  # empty / null / identical responses get the prior measured on train data
    temperature: float = 1.0  # p ∝ p^(1/T) once, after the passes (inference.fit_output_temperature)

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "temperature must be > 0")
        _check(self.tta_rank in ("entropy", "margin"), "tta_rank must be 'entropy' or 'margin'")
        _check(self.token_budget >= 16 and self.max_batch_rows >= 1, "token_budget >= 16, max_batch_rows >= 1")
        _check(self.time_budget_s > 0, "time_budget_s must be > 0")
        _check(16 <= self.degrade_max_length <= self.pack.max_length,
               "degrade_max_length must be in [16, pack.max_length]")
        _check(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What ``lmsys demo`` runs on the embedded default.

    Sized to learn on 2 CPU cores without native bf16 — 30 minutes measured on a 2-core AMD EPYC, AVX2
    only (``bench/RESULTS.md``): 960 train rows, 2 folds, 64 tokens (a response's opening — its
    markdown header, a refusal — fits: the signals a short view shows), one epoch of 60 steps of 8 rows per
    fold. Teacher and student are both the real SmolLM2-135M (from its PyPI wheel) with a LoRA r = 8: the
    teacher trained on the labels, the student distilled from its in-fold logits; 64 holdout rows, 24
    calibration rows, 120 test rows.

    Learning in 60 steps needs two settings that a 9B on 50k rows does not: a high LoRA learning rate
    (1e-3) and an all-but-frozen score head (``head_lr`` 1e-6 from the "scaled" init: a fixed random
    projection of the last hidden state, which the adapters learn to move): these models' last hidden states
    have norms of ~50–100, so one AdamW step of 1e-3 on every head weight shifts a logit by ~1. SmolLM2
    learned with these settings in 60 steps, not in 40. Gemma-3 270M (base) learned nothing in 40 or 60
    steps at any setting tried (LoRA lr 1e-4..3e-3, head lr 1e-6..3e-3), so it is not the demo's teacher
    (measured: ``bench/RESULTS.md``, "Does the default demo learn?").
    """

    synth: SynthConfig = SynthConfig(n_train=960, n_test=120)
    folds: FoldConfig = FoldConfig(k=2)
    teacher: TeacherConfig = TeacherConfig(
        name="smollm2-135m-teacher",
        model=ModelConfig(model_dir="zoo:smollm2-135m", lora_r=8, lora_alpha=16, lora_dropout=0.0),
        train=TrainConfig(epochs=1.0, batch_size=8, grad_accum=1, lr=1e-3, head_lr=1e-6, warmup_ratio=0.1,
                          eval_every=0, checkpoint_every=10),
        pack=PackConfig(max_length=64))
    student: DistillConfig = DistillConfig(
        name="smollm2-135m",
        model=ModelConfig(model_dir="zoo:smollm2-135m", lora_r=8, lora_alpha=16, lora_dropout=0.0),
        train=TrainConfig(epochs=1.0, batch_size=8, grad_accum=1, lr=1e-3, head_lr=1e-6, warmup_ratio=0.1,
                          eval_every=0, checkpoint_every=10),
        pack=PackConfig(max_length=64), teachers=("smollm2-135m-teacher",))
    holdout_rows: int = 64  # labelled rows no stage trains on (merge and quantisation fidelity)
    # SmolLM2-135M's widths (576, 1536) are multiples of 64, not of 128
    quantize: QuantizeConfig = QuantizeConfig(group_size=64, calib_rows=24, calib_max_length=64, inference_max_length=64)
    inference: InferenceConfig = InferenceConfig(pack=PackConfig(max_length=64), token_budget=4096,
                                                 degrade_max_length=64, checkpoint_every=64)
    fraction: float = 1.0  # dry run: every notebook works on this share of its rows (0.1, 0.01)

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoConfig:
        return from_dict(cls, data)


def resolve(cls: type[T], path: str | Path | None, settings: dict[str, Any], keep: tuple[str, ...] = ("fraction",),
            log: Callable[[str], None] = print) -> T:
    """A notebook's config: the ``cls`` config in JSON file ``path`` when one is given — the notebook's own
    settings are then ignored, except the keys in ``keep`` whose value differs from the field's default (the
    dry-run ``fraction``) — else ``from_dict(cls, settings)``. Unknown keys raise either way."""
    if path is None:
        return from_dict(cls, settings)
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    kept = {k: settings[k] for k in keep if k in settings and k in defaults and settings[k] != defaults[k]}
    log(f"{cls.__name__} from {path}" + (f" with {kept}" if kept else "") + " (the settings cell is not used)")
    return from_dict(cls, data | kept)


def claim_stage(run_dir: str | Path, stage: str, cfg: Any, force: bool = False) -> bool:
    """Guard a stage's output in ``run_dir``; returns True when the stage must run.

    - no saved config: the stage runs (call ``save_stage`` when it has finished);
    - saved config equal to ``cfg``: the stage already ran — returns False (True when ``force``);
    - saved config different: raises ``StageConflictError`` (unless ``force``), naming the file.
    """
    path = Path(run_dir) / "config" / f"{stage}.json"
    if not path.exists():
        return True
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved == to_dict(cfg):
        return force
    if force:
        return True
    raise StageConflictError(
        f"{path} holds another config for stage '{stage}'; use a new run folder or force=True to replace it"
    )


def save_stage(run_dir: str | Path, stage: str, cfg: Any) -> Path:
    """Record ``cfg`` as the config stage ``stage`` finished with; returns the JSON path."""
    path = Path(run_dir) / "config" / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
