"""What a notebook user touches: progress and timing, the dry-run flag, the device-map check, a cost planner.

- ``beep(ok=True)``: a short tone in the browser that shows the notebook (jupyter-beeper): high when a
  stage finished, low on an error. Without a Jupyter kernel (a script, a test, CI) it does nothing and
  prints nothing — jupyter-beeper alone would print ``<IPython.core.display.HTML object>`` there.
- ``progress(iterable, total=…, desc=…)``: a ``tqdm.auto`` bar with rate and ETA (a widget in Jupyter, text
  elsewhere).
- ``with stage("train fold 0") as s:`` prints ``[train fold 0] started`` and ``… done in 3 min 05 s`` (or
  ``… FAILED after 4.2 s: ValueError: …``, then re-raises), beeps either way; ``s.seconds`` is the elapsed time.
  ``format_duration(seconds)`` writes ``4.2 s``, ``3 min 05 s``, ``2 h 07 min``.
- ``dry_run(frame, fraction)``: the dry-run flag every notebook honours. 1.0 returns the frame itself; a
  fraction in (0, 1) returns a seeded random share (at least one row), rows in their original order and
  index; anything else raises ``ValueError``.
- ``check_device_map(model)``: parameters and bytes per device from ``model.hf_device_map`` (accelerate's
  dispatch map), and a loud ``OffloadWarning`` plus a printed box when part of the model sits on ``cpu`` or
  ``disk`` while a GPU is there to run it.
- ``plan(stage, model_size, rows, max_length, hardware)`` → ``Plan``: FLOPs, wall-clock hours, GPU-hours,
  dollars, Kaggle quota weeks and a memory check for one stage on one machine, with every number it used
  listed in ``Plan.assumptions``; ``plan_all`` compares one stage across every entry of ``HARDWARE``.
  The planner is arithmetic on stated assumptions, calibrated on two reported timings — an estimate to
  choose hardware with, not a measurement.

This module never imports torch, transformers or pandas at module level (``check_device_map`` uses the torch
that the model it is given already loaded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from tqdm.auto import tqdm


def in_kernel() -> bool:
    """True inside a Jupyter kernel (a browser may be listening), False in a script or a plain REPL."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def beep(ok: bool = True, seconds: float = 0.3) -> bool:
    """Play a tone in the notebook's browser (880 Hz when ``ok``, 220 Hz otherwise); returns whether a tone
    was sent. A missing jupyter-beeper or a headless run is a silent no-op."""
    if not in_kernel():
        return False
    try:
        from jupyter_beeper import Beeper
    except ImportError:
        return False
    Beeper().beep(frequency=880 if ok else 220, secs=seconds)
    return True


# -- progress and timing ---------------------------------------------------------------------------


def progress(iterable: Iterable[Any] | None = None, total: float | None = None, desc: str = "",
             unit: str = "it", disable: bool | None = None) -> tqdm:
    """A progress bar with rate and ETA (``tqdm.auto``) — use it for any loop a user waits on for more than a
    few seconds. ``total`` defaults to ``len(iterable)``; without a total there is no ETA. ``disable=None``
    keeps tqdm's default (shown); use ``bar.update(n)`` when there is no iterable."""
    from tqdm.auto import tqdm

    options: dict[str, Any] = {} if disable is None else {"disable": disable}
    return tqdm(iterable, total=total, desc=desc, unit=unit, **options)


def format_duration(seconds: float) -> str:
    """``4.2 s`` under a minute, ``3 min 05 s`` under an hour, ``2 h 07 min`` beyond (hours are not folded
    into days: ``26 h 00 min``). Negative or non-finite durations raise ``ValueError``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number of seconds >= 0, got {seconds!r}")
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    if round(seconds) < 3600:
        minutes, secs = divmod(round(seconds), 60)
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


@dataclasses.dataclass
class StageTimer:
    """What ``stage`` yields: the stage's name and its elapsed seconds (0.0 until the block ends)."""

    name: str
    seconds: float = 0.0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@contextlib.contextmanager
def stage(name: str, beep_on_end: bool = True) -> Iterator[StageTimer]:
    """Time a notebook stage: prints ``[name] started``, then ``[name] done in <duration>`` and beeps high;
    on any exception (a Ctrl-C included) prints ``[name] FAILED after <duration>: <Type: message>``, beeps
    low and re-raises. ``beep_on_end=False`` keeps it quiet."""
    timer = StageTimer(name)
    print(f"[{name}] started", flush=True)
    start = time.perf_counter()
    try:
        yield timer
    except BaseException as exc:
        timer.seconds = time.perf_counter() - start
        print(f"[{name}] FAILED after {format_duration(timer.seconds)}: {_describe(exc)}", flush=True)
        if beep_on_end:
            beep(ok=False)
        raise
    timer.seconds = time.perf_counter() - start
    print(f"[{name}] done in {format_duration(timer.seconds)}", flush=True)
    if beep_on_end:
        beep(ok=True)


# -- dry run ---------------------------------------------------------------------------------------


def dry_run(frame: pd.DataFrame, fraction: float, seed: int = 0, what: str = "rows") -> pd.DataFrame:
    """The dry-run flag: run a notebook on ``fraction`` of its data (1/10, 1/100) before the real run.

    Args:
        frame: any DataFrame.
        fraction: in (0, 1]. 1.0 returns ``frame`` itself (the same object, nothing printed).
        seed: the sample is a function of (len(frame), fraction, seed).
        what: the noun printed: ``dry run: 250 of 25000 rows (fraction 0.01)``.
    Returns:
        max(1, round(fraction·len)) rows drawn without replacement, in their original order with their
        original index (an empty frame stays empty).
    """
    from .parsing import subsample  # one implementation: quantize.run draws its dry-run share with it

    picked = subsample(frame, fraction, seed)
    if picked is not frame:
        print(f"dry run: {len(picked)} of {len(frame)} {what} (fraction {fraction:g})", flush=True)
    return picked


# -- device map ------------------------------------------------------------------------------------


class OffloadWarning(RuntimeWarning):
    """Part of a model sits on the CPU or on disk while a GPU is there to run it: every forward pass copies
    those weights over, which is about ten times slower or worse."""


OFFLOAD_DEVICES = ("cpu", "disk")
GIB = 1024**3


def _device_name(device: Any) -> str:
    """accelerate's map holds ints (GPU index), strings or torch.device; an int is reported as cuda:N."""
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    return str(device)


def _is_accelerator(device: str) -> bool:
    return device.split(":")[0] not in ("cpu", "disk", "meta")


def _find_device_map(model: Any) -> tuple[str, dict[str, str]]:
    """The dispatch map and the name of the module that owns it ("" for a plain HF model, the inner model
    for a PEFT wrapper), so map keys can be matched against the wrapper's parameter names."""
    for owner, module in model.named_modules():
        found = vars(module).get("hf_device_map")
        if found:
            return owner, {key: _device_name(dev) for key, dev in found.items()}
    found = getattr(model, "hf_device_map", None) or {}
    return "", {key: _device_name(dev) for key, dev in found.items()}


def _mapped_device(name: str, owner: str, device_map: dict[str, str]) -> str | None:
    """The device of the longest map key that is ``name`` or one of its dotted parents."""
    if owner:
        if not name.startswith(owner + "."):
            return None
        name = name[len(owner) + 1:]
    parts = name.split(".")
    for cut in range(len(parts), -1, -1):
        key = ".".join(parts[:cut])
        if key in device_map:
            return device_map[key]
    return None


def _weights_per_device(model: Any) -> dict[str, dict[str, int]]:
    """{device: {"params", "bytes"}}: parameters through the map (their own device when unmapped — an
    offloaded one is on ``meta`` but keeps its shape and dtype); buffers add bytes only."""
    owner, device_map = _find_device_map(model)
    devices: dict[str, dict[str, int]] = {}
    tensors = [(n, t, True) for n, t in model.named_parameters()]
    tensors += [(n, t, False) for n, t in model.named_buffers()]
    for name, tensor, is_param in tensors:
        device = _mapped_device(name, owner, device_map) or str(tensor.device)
        slot = devices.setdefault(device, {"params": 0, "bytes": 0})
        slot["params"] += tensor.numel() if is_param else 0
        slot["bytes"] += tensor.numel() * tensor.element_size()
    return devices


def _offload_box(devices: dict[str, dict[str, int]], offloaded: Sequence[str], accelerator: bool) -> str:
    total = sum(d["bytes"] for d in devices.values()) or 1
    lines = [f"OFFLOAD: part of this model runs from {' and '.join(offloaded)}, not from "
             + ("the GPU" if accelerator else "memory")]
    for dev in offloaded:
        d = devices[dev]
        lines.append(f"  {dev:<4}: {d['params']:,} params, {d['bytes'] / GIB:.3f} GiB, "
                     f"{100 * d['bytes'] / total:.1f}% of the model's bytes")
    lines += ["Every forward pass copies these weights over: expect it to run ~10x slower or worse.",
              "Fix: fewer, larger GPUs (one 80 GB instead of several small ones); quantise to 8 or 4 bits;",
              "set max_memory / device_map so that nothing spills; lower the batch size to free memory."]
    width = max(map(len, lines))
    rule = "+" + "-" * (width + 2) + "+"
    return "\n".join([rule, *(f"| {line:<{width}} |" for line in lines), rule])


def check_device_map(model: Any, expect_accelerator: bool | None = None, warn: bool = True) -> dict:
    """Where a loaded model's weights sit, and a loud warning when some are offloaded.

    Args:
        model: a torch module, usually loaded with ``device_map=``; without ``hf_device_map`` each parameter
            counts on its own device.
        expect_accelerator: None means yes when the map names a GPU (an index, cuda, mps, xpu …) or
            ``torch.cuda.is_available()``.
        warn: print a box and raise ``OffloadWarning`` (a RuntimeWarning) when not ok.
    Returns:
        ``{"devices": {device: {"params": int, "bytes": int}}, "offloaded_params", "offloaded_bytes",
        "offloaded_share" (of all bytes), "ok"}``. Offloaded means on cpu or disk when an accelerator is
        expected, on disk otherwise (the CPU is then the main device). ``bytes`` count parameters and
        buffers (quantised layers keep their packed weights in buffers).
    """
    import torch

    devices = _weights_per_device(model)
    if expect_accelerator is None:
        expect_accelerator = any(map(_is_accelerator, devices)) or torch.cuda.is_available()
    slow = OFFLOAD_DEVICES if expect_accelerator else ("disk",)
    offloaded = [dev for dev in slow if dev in devices]
    total = sum(d["bytes"] for d in devices.values())
    off_bytes = sum(devices[dev]["bytes"] for dev in offloaded)
    report = {"devices": devices, "offloaded_params": sum(devices[dev]["params"] for dev in offloaded),
              "offloaded_bytes": off_bytes, "offloaded_share": off_bytes / total if total else 0.0,
              "ok": not offloaded}
    if offloaded and warn:
        box = _offload_box(devices, offloaded, expect_accelerator)
        print(box, flush=True)
        warnings.warn(OffloadWarning(box), stacklevel=2)
    return report


# -- planner: tables -------------------------------------------------------------------------------

# Billions of parameters (the checkpoints' own counts, embeddings included).
MODEL_SIZES = {"gemma2-9b": 9.24, "llama3-70b": 70.6, "qwen2-72b": 72.7, "llama3-8b": 8.03,
               "smollm2-135m": 0.135, "gemma3-270m": 0.268}

# Mean tokens per real competition row (prompt + both responses, our packer, Gemma tokenizer) at each
# max_length; untruncated 703.
MEAN_TOKENS = {1024: 568, 2048: 655, 4096: 689}
UNTRUNCATED_MEAN_TOKENS = 703
UNTRUNCATED_AT = 8192  # assumed: the untruncated mean is reached by 8 192 tokens (at most 2% above 4 096's)

STAGES = ("teacher", "student", "inference", "quantize", "merge")
KAGGLE_QUOTA_HOURS = 30.0  # GPU session hours per week; a 2×T4 session hour counts once
KAGGLE_SESSION_HOURS = 12.0
KAGGLE_SUBMISSION_HOURS = 9.0  # the competition's run-time limit for the inference notebook
COLAB_USD_PER_CU = 0.10  # pay-as-you-go: 100 compute units for $9.99
LORA_RANK = 64
LORA_SHARE = 0.012  # r = 64 on every linear layer ≈ 1.2% of N trainable (Llama-3-70B: 0.83 B)
TRAINABLE_BYTES = 16  # per trainable parameter: fp32 weight + grad + Adam m and v
OVERHEAD_GIB = 1.5  # per GPU: CUDA context, kernels, cuBLAS workspace
GPTQ_SOLVE_WIDTH = 4096  # the per-layer GPTQ solves cost ≈ 2·N·d_model FLOPs; d_model taken as 4 096


@dataclasses.dataclass(frozen=True)
class Timing:
    """A reported wall-clock time, turned into the MFU it implies: flops_per_token·N·rows·mean_tokens FLOPs
    over gpus × tflops × hours."""

    what: str
    params_b: float
    rows: float
    mean_tokens: float
    flops_per_token: float  # in units of N: 2 (forward), 6 (LoRA + gradient checkpointing)
    gpus: int
    tflops: float
    hours: float

    @property
    def mfu(self) -> float:
        work = self.flops_per_token * self.params_b * 1e9 * self.rows * self.mean_tokens
        return work / (self.gpus * self.tflops * 1e12 * self.hours * 3600)

    def explain(self) -> str:
        return (f"{self.what}: {self.flops_per_token:g}·{self.params_b:g}e9·{self.rows:,.0f} rows·"
                f"{self.mean_tokens:g} tokens / ({self.gpus}×{self.tflops:g} TFLOP/s × {self.hours:g} h) "
                f"= MFU {self.mfu:.3f}")


T4_INFERENCE = Timing("Gemma-2-9B 4-bit inference on Kaggle 2×T4, max_len 2048, batch 4, no TTA: ~4 h for "
                      "25k rows", 9.24, 25_000, MEAN_TOKENS[2048], 2, 2, 65.0, 4.0)
A100_QLORA = Timing("the winners' 70B QLoRA teacher on 8×A100-80G, r = 64, 1 epoch: ~1 day per fold of "
                    "57 477 × 4/5 rows at the untruncated mean", 70.6, 57_477 * 4 / 5,
                    UNTRUNCATED_MEAN_TOKENS, 6, 8, 312.0, 24.0)
A100_LORA_MFU = 0.35  # stated default for 16-bit LoRA training on A100/H100 (no measurement of ours)


def _mfu_table(train: float, inference: float, quantize: float) -> dict[str, float]:
    """MFU per kind of work; QLoRA's is the measured A100 value scaled by this GPU's LoRA MFU / A100's."""
    return {"train": train, "train-qlora": A100_QLORA.mfu * train / A100_LORA_MFU,
            "inference": inference, "quantize": quantize}


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One machine: ``gpus`` × ``gpu``, the price of a machine-hour and the MFU expected per kind of work."""

    name: str
    gpu: str
    gpus: int
    tflops: float  # peak dense fp16/bf16 tensor TFLOP/s per GPU
    memory_gib: float  # per GPU, as torch reports it
    price_per_hour: float  # USD per machine-hour (all its GPUs)
    mfu: dict[str, float]
    note: str
    disk_gb_s: float = 0.5  # sequential read/write, for the merge estimate
    kaggle_quota: bool = False


T4_MFU = _mfu_table(train=0.15, inference=T4_INFERENCE.mfu, quantize=0.03)
A100_MFU = _mfu_table(train=A100_LORA_MFU, inference=0.30, quantize=0.05)
HARDWARE = {hw.name: hw for hw in (
    Hardware("kaggle-2xt4", "T4", 2, 65.0, 15.0, 0.0, T4_MFU,
             "free, but counts against Kaggle's 30 GPU-hours/week quota (a session hour counts once for "
             "both GPUs); sessions end at 12 h, the competition's inference run at 9 h", kaggle_quota=True),
    Hardware("colab-t4", "T4", 1, 65.0, 15.0, 1.96 * COLAB_USD_PER_CU, T4_MFU,
             "free tier when available; pay-as-you-go ~1.96 compute units/h at $0.10/CU"),
    Hardware("colab-a100", "A100-40G", 1, 312.0, 40.0, 11.8 * COLAB_USD_PER_CU, A100_MFU,
             "Colab Pro / pay-as-you-go, ~11.8 compute units/h at $0.10/CU"),
    Hardware("a100-80g", "A100-80G", 1, 312.0, 80.0, 1.6, A100_MFU,
             "rented; $1.6/h is a typical on-demand price: pass price_per_hour", disk_gb_s=2.0),
    Hardware("h100-80g", "H100-80G", 1, 989.0, 80.0, 2.5, A100_MFU,
             "rented SXM; dense bf16 peak; same MFU as A100 assumed", disk_gb_s=2.0),
    Hardware("8xa100-80g", "A100-80G", 8, 312.0, 80.0, 8 * 1.6, A100_MFU,
             "rented node, 8 × $1.6/h; the winners' training machine", disk_gb_s=2.0),
    Hardware("rtx4090", "RTX 4090", 1, 165.0, 24.0, 0.450 * 0.15,
             _mfu_table(train=0.25, inference=0.25, quantize=0.04),
             "owned: cost is electricity only, 450 W × $0.15/kWh; 165 TFLOP/s = fp16/bf16 with fp32 "
             "accumulate, dense", disk_gb_s=2.0),
)}


# -- planner: the estimate -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's estimate for one stage on one machine. ``print(plan)`` or ``plan.show()`` gives the
    summary and every assumption; ``table()`` the summary alone."""

    stage: str
    model: str
    params_b: float
    hardware: str
    rows: int
    max_length: int
    mean_tokens: float
    tokens: float  # tokens through the model, all passes (training, OOF, both TTA orientations)
    flops: float
    mfu: float | None  # effective, over all the stage's passes; None for merge (I/O-bound)
    wall_hours: float
    gpu_hours: float
    cost_usd: float
    quota_weeks: float | None  # Kaggle hardware only
    fits_memory: bool
    memory_gib: float  # GPU memory one copy of the model needs (one GPU's overhead); 0 for merge
    memory_note: str
    note: str  # time limits crossed ("" when none)
    assumptions: list[str]

    def table(self) -> str:
        """The summary, one fact per line."""
        quota = "-" if self.quota_weeks is None else f"{self.quota_weeks:.2f} weeks of 30 GPU-hours"
        mfu = "I/O-bound" if self.mfu is None else f"MFU {self.mfu:.3f}"
        data = [] if self.stage == "merge" else [
                ("data", f"{self.rows:,} rows × {self.mean_tokens:.0f} mean tokens (max_length "
                         f"{self.max_length}) → {self.tokens / 1e6:,.1f} M tokens through the model")]
        rows = [("stage", f"{self.stage}: {self.model} ({self.params_b:g} B params) on {self.hardware}"), *data,
                ("compute", f"{self.flops:.3g} FLOPs, {mfu}"),
                ("wall time", f"{format_duration(self.wall_hours * 3600)} ({self.wall_hours:.2f} h)"),
                ("GPU-hours", f"{self.gpu_hours:.1f}"), ("cost", f"${self.cost_usd:,.2f}"),
                ("Kaggle quota", quota),
                ("memory", f"{'fits' if self.fits_memory else 'DOES NOT FIT'}: {self.memory_note}")]
        rows += [("limits", self.note)] if self.note else []
        return "\n".join(f"{key:<13}{value}" for key, value in rows)

    def __str__(self) -> str:
        return self.table() + "\nassumptions:\n" + "\n".join(f"  - {a}" for a in self.assumptions)

    def show(self) -> None:
        """Print the summary and the assumptions (a notebook cell's output)."""
        print(self)


def _pick(name: str, valid: Iterable[str], what: str) -> str:
    valid = list(valid)
    if name not in valid:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")
    return name


def _model_params(model_size: float | str) -> tuple[float, str]:
    """(billions of parameters, label): a number is taken as billions, a string as a MODEL_SIZES name."""
    if isinstance(model_size, str):
        name = _pick(model_size.lower(), MODEL_SIZES, "model name")
        return MODEL_SIZES[name], name
    if not model_size > 0:
        raise ValueError(f"model_size must be > 0 (billions of parameters), got {model_size!r}")
    return float(model_size), f"{model_size:g}B"


def default_mean_tokens(max_length: int) -> float:
    """Mean tokens per real row at ``max_length``: the measurements in ``MEAN_TOKENS``, linear in
    log2(max_length) between them and up to the untruncated 703 at 8 192; below 1 024 proportional to
    max_length (568·L/1024, an underestimate: measure short budgets with ``eda``)."""
    points = sorted(MEAN_TOKENS.items()) + [(UNTRUNCATED_AT, UNTRUNCATED_MEAN_TOKENS)]
    (low, low_mean), (high, high_mean) = points[0], points[-1]
    if max_length <= low:
        return low_mean * max_length / low
    if max_length >= high:
        return float(high_mean)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if max_length <= x1:
            t = (math.log2(max_length) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return y0 + t * (y1 - y0)
    raise AssertionError("unreachable")


def _train_flops_per_token(lora: bool, gradient_checkpointing: bool) -> tuple[float, str]:
    """FLOPs per token in units of N, and why."""
    recompute = 2 if gradient_checkpointing else 0
    backward = 2 if lora else 4
    why = (f"training {2 + recompute + backward}·N FLOPs/token: forward 2N"
           + (", recomputed forward 2N (gradient checkpointing)" if recompute else "")
           + (", backward 2N — input gradients only: the frozen base skips its weight gradients (another "
              "2N); the LoRA adapters' own ~1% is ignored" if lora else ", backward 4N (input and weight "
              "gradients)"))
    return 2 + recompute + backward, why


@dataclasses.dataclass
class _Work:
    """FLOPs by kind of work (each kind runs at its own MFU), tokens through the model, and the reasons."""

    flops: dict[str, float]
    tokens: float
    lines: list[str]


def _training_work(n: float, rows: int, mean: float, opts: dict[str, Any]) -> _Work:
    per_token, why = _train_flops_per_token(opts["lora"], opts["gradient_checkpointing"])
    k = opts["folds"]
    # k folds each train on (k-1)/k of the rows: k·(k-1)/k = k-1 times the rows in all; 1 fold = all rows
    trained = rows * opts["epochs"] * (k - 1 if k > 1 else 1)
    kind = "train-qlora" if opts["weight_bits"] < 16 else "train"
    work = _Work({kind: per_token * n * trained * mean}, trained * mean,
                 [why, f"rows trained = {rows:,} × {opts['epochs']:g} epochs × "
                       + (f"{k} folds × {k - 1}/{k} = {trained:,.0f}" if k > 1 else f"1 model = {trained:,.0f}")])
    if k > 1:  # out-of-fold logits for the next stage: every row scored once by the fold that did not see it
        oof = rows * mean * (2 if opts["tta"] else 1)
        work.flops["inference"] = 2 * n * oof
        work.tokens += oof
        work.lines.append(f"out-of-fold pass: 2·N·{rows:,} rows·{mean:.0f} tokens"
                          + (" × 2 (swap-TTA)" if opts["tta"] else "") + " at the inference MFU")
    return work


def _inference_work(n: float, rows: int, mean: float, opts: dict[str, Any]) -> _Work:
    tokens = rows * mean * (2 if opts["tta"] else 1) * opts["folds"]
    line = (f"inference 2·N FLOPs/token × {rows:,} rows × {mean:.0f} tokens"
            + (" × 2 (swap-TTA: each row scored in both A/B orders)" if opts["tta"] else " (no TTA)")
            + (f" × {opts['folds']} unmerged fold models" if opts["folds"] > 1 else " (one merged model)")
            + "; attention's own FLOPs (~5-10% at 2k tokens) are absorbed by the MFU")
    return _Work({"inference": 2 * n * tokens}, tokens, [line])


def _quantize_work(n: float, rows: int, mean: float, opts: dict[str, Any]) -> _Work:
    tokens = rows * mean
    flops = 6 * n * tokens + 2 * n * GPTQ_SOLVE_WIDTH
    line = (f"GPTQ on {rows:,} calibration rows × {mean:.0f} tokens: 6·N FLOPs/token (forward to collect each "
            f"layer's inputs 2N, Hessian X·Xᵀ accumulation ≈ another forward 2N, forward through the quantised "
            f"layer for the next one 2N) + the per-layer solves ≈ 2·N·{GPTQ_SOLVE_WIDTH} (d_model), "
            f"at a low MFU: one layer at a time, small matmuls, many host syncs")
    return _Work({"quantize": flops}, tokens, [line])


def _merge_work(n: float, rows: int, mean: float, opts: dict[str, Any]) -> _Work:
    flops = 2 * LORA_RANK * n * opts["folds"]  # ΔW = B·A for every target weight, per fold
    line = (f"merge: ΔW = B·A costs 2·r·N = 2·{LORA_RANK}·N FLOPs per fold ({opts['folds']} folds) — "
            "seconds; the time is I/O: read the 16-bit base (2 B/param) and the adapters, write the 16-bit "
            "merged model (2 B/param), streamed tensor by tensor on the CPU (lmsys_lib.merge); rows and "
            "max_length do not matter")
    return _Work({"merge": flops}, 0.0, [line])


WORK = {"teacher": _training_work, "student": _training_work, "inference": _inference_work,
        "quantize": _quantize_work, "merge": _merge_work}


# -- planner: memory -------------------------------------------------------------------------------


def _bytes_per_param(bits: float) -> float:
    """16-bit 2 B, 8-bit (GPTQ) 1 B, 4-bit 0.55 B (nf4 / GPTQ-4 with their scales), else bits/8."""
    return {16: 2.0, 8: 1.0, 4: 0.55}.get(bits, bits / 8)


def _memory_need(stage: str, n: float, opts: dict[str, Any]) -> tuple[float, str]:
    """GPU GiB one copy of the model needs (one GPU's overhead included), and how it was counted."""
    bits = opts["weight_bits"]
    weights = n * _bytes_per_param(bits)
    if stage == "quantize":  # one decoder layer at a time on one GPU; the model stays in host RAM
        need = 0.15 * n * 2 + OVERHEAD_GIB * GIB
        return need / GIB, (f"GPTQ: one GPU holds a layer and the calibration activations, taken as 15% of "
                            f"the 16-bit weights + {OVERHEAD_GIB} GiB; the model itself sits in host RAM")
    if stage == "inference":
        need = 1.10 * weights + OVERHEAD_GIB * GIB
        return need / GIB, (f"{bits:g}-bit weights {weights / GIB:.1f} GiB + 10% (KV cache, activations) + "
                            f"{OVERHEAD_GIB} GiB per GPU (CUDA context, workspace)")
    if opts["lora"]:
        trainable = n * LORA_SHARE * TRAINABLE_BYTES
        why = (f"{bits:g}-bit weights {weights / GIB:.1f} GiB + LoRA r={LORA_RANK} ({LORA_SHARE:.1%} of N "
               f"× {TRAINABLE_BYTES} B: fp32 weight, grad, Adam m, v) {trainable / GIB:.1f} GiB")
    else:  # bf16 weights 2 + grads 2 + fp32 master 4 + Adam m, v 8
        weights, trainable = n * 16, 0.0
        why = f"full fine-tune, 16 B/param (bf16 weight + grad, fp32 master + Adam m, v) {weights / GIB:.1f} GiB"
    share = 0.10 if opts["gradient_checkpointing"] else 0.50
    need = weights + trainable + share * weights + OVERHEAD_GIB * GIB
    return need / GIB, (f"{why} + activations {share:.0%} of the weights ("
                        + ("with" if opts["gradient_checkpointing"] else "without")
                        + f" gradient checkpointing, micro-batch 1) + {OVERHEAD_GIB} GiB per GPU")


def _remedies(stage: str, n: float, opts: dict[str, Any]) -> str:
    """What would shrink the model: LoRA instead of a full fine-tune, fewer bits than it has now."""
    lighter = [f"{bits}-bit weights {n * _bytes_per_param(bits) / GIB:.1f} GiB" for bits in (8, 4)
               if bits < opts["weight_bits"] and stage != "quantize"]
    remedies = ["LoRA instead of a full fine-tune"] if stage in ("teacher", "student") and not opts["lora"] else []
    return ", ".join(remedies + [f"quantise ({', '.join(lighter)})"] * bool(lighter))


def _memory_verdict(stage: str, need: float, n: float, hw: Hardware, opts: dict[str, Any]) -> tuple[bool, str]:
    """Whether one copy needing ``need`` GiB fits one GPU, or split over all of them (each GPU paying its
    own overhead), and what to do when it does not."""
    if stage == "merge":
        # the 16-bit base (2 B a weight) + the merge stored in fp32 (lmsys merge's default storage: 4 B)
        return True, f"needs no GPU; disk for the base and the fp32 merged copy: {6 * n / GIB:.0f} GiB"
    per_gpu, total = hw.memory_gib, hw.memory_gib * hw.gpus
    if need <= per_gpu:
        return True, f"{need:.1f} GiB needed of {per_gpu:g} GiB on one {hw.gpu}"
    remedies = _remedies(stage, n, opts)
    if stage != "quantize" and need + (hw.gpus - 1) * OVERHEAD_GIB <= total:
        return True, (f"{need:.1f} GiB does not fit one {hw.gpu} ({per_gpu:g} GiB): split the model across the "
                      f"{hw.gpus} GPUs (device_map)" + (f", or {remedies} to run a copy per GPU" if remedies else ""))
    return False, (f"{need:.1f} GiB does not fit {hw.gpus} × {per_gpu:g} GiB ({hw.gpu}): "
                   + (f"{remedies}, " if remedies else "")
                   + "use larger or more GPUs, or a smaller model; CPU/disk offload would run ~10x slower")


# -- planner: the public functions -----------------------------------------------------------------


def _check_options(rows: int, max_length: int, opts: dict[str, Any]) -> None:
    if rows < 1 or max_length < 1:
        raise ValueError(f"rows and max_length must be >= 1, got rows={rows!r}, max_length={max_length!r}")
    if not (isinstance(opts["folds"], int) and opts["folds"] >= 1) or not opts["epochs"] > 0:
        raise ValueError(f"folds must be an int >= 1 and epochs > 0, got {opts['folds']!r}, {opts['epochs']!r}")
    if opts["mfu"] is not None and not 0 < opts["mfu"] <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {opts['mfu']!r}")
    if not opts["lora"] and opts["weight_bits"] < 16:
        raise ValueError(f"full fine-tuning needs 16-bit weights, got weight_bits={opts['weight_bits']!r}")
    if opts["price_per_hour"] is not None and opts["price_per_hour"] < 0:
        raise ValueError(f"price_per_hour must be >= 0, got {opts['price_per_hour']!r}")


def _mfu_used(work: _Work, hw: Hardware, mfu: float | None) -> dict[str, float]:
    return {kind: mfu or hw.mfu[kind] for kind in work.flops}


def _seconds(stage: str, work: _Work, n: float, hw: Hardware, mfu: float | None) -> float:
    """Wall seconds: each kind's FLOPs / (gpus × peak × its MFU); merge: 4 B/param of I/O / disk speed."""
    if stage == "merge":
        return 4 * n / (hw.disk_gb_s * 1e9)
    used = _mfu_used(work, hw, mfu)
    return sum(f / (hw.gpus * hw.tflops * 1e12 * used[kind]) for kind, f in work.flops.items())


def _time_lines(stage: str, work: _Work, hw: Hardware, mfu: float | None) -> list[str]:
    if stage == "merge":
        return [f"disk {hw.disk_gb_s:g} GB/s sequential (assumed for {hw.name}); adapters' bytes ignored"]
    lines = [f"peak {hw.gpus} × {hw.tflops:g} TFLOP/s ({hw.gpu}, dense fp16/bf16); the work splits evenly "
             "over the GPUs (data- or model-parallel: the MFU absorbs the difference)"]
    lines += [f"MFU {kind} {value:.3f}" + (" (given)" if mfu else f" ({hw.name} default)")
              for kind, value in _mfu_used(work, hw, mfu).items()]
    return lines + ([] if mfu else _calibration_lines())


def _quota_weeks(stage: str, hours: float, hw: Hardware) -> float | None:
    """Kaggle counts GPU session hours (once for both T4s); a merge runs in a CPU session."""
    if not hw.kaggle_quota:
        return None
    return 0.0 if stage == "merge" else hours / KAGGLE_QUOTA_HOURS


def _limits(stage: str, hours: float, hw: Hardware) -> str:
    if not hw.kaggle_quota:
        return ""
    notes = []
    if hours > KAGGLE_SESSION_HOURS:
        notes.append(f"longer than a {KAGGLE_SESSION_HOURS:g} h Kaggle session: run it in resumable pieces")
    if stage == "inference" and hours > KAGGLE_SUBMISSION_HOURS:
        notes.append(f"over the competition's {KAGGLE_SUBMISSION_HOURS:g} h limit for the inference run")
    return "; ".join(notes)


def _calibration_lines() -> list[str]:
    return [f"calibration: {T4_INFERENCE.explain()}", f"calibration: {A100_QLORA.explain()}",
            f"16-bit LoRA training MFU on A100/H100 {A100_LORA_MFU} (stated, not measured); QLoRA's MFU "
            "elsewhere = the A100 QLoRA value × (that GPU's LoRA MFU / 0.35); T4 training 0.15, RTX 4090 "
            "0.25, GPTQ 0.03-0.05: guesses — pass mfu= with your own measurement"]


def _default_bits(stage: str, lora: bool) -> float:
    """teacher: nf4 QLoRA base (the recipe's 70B teachers); everything else 16-bit."""
    return 4 if stage == "teacher" and lora else 16


def _mean_tokens(mean_tokens: float | None, max_length: int) -> tuple[float, str]:
    if mean_tokens is not None:
        if not mean_tokens > 0:
            raise ValueError(f"mean_tokens must be > 0, got {mean_tokens!r}")
        return min(mean_tokens, max_length), f"mean tokens/row {min(mean_tokens, max_length):.0f} (given)"
    mean = default_mean_tokens(max_length)
    return mean, (f"mean tokens/row {mean:.0f} at max_length {max_length}: measured on real rows with the "
                  f"Gemma tokenizer {MEAN_TOKENS}, untruncated {UNTRUNCATED_MEAN_TOKENS} (taken as reached at "
                  f"{UNTRUNCATED_AT}); log2-interpolated between, proportional below 1024")


def plan(stage: str, model_size: float | str, rows: int, max_length: int, hardware: str, *,
         mean_tokens: float | None = None, epochs: float = 1.0, tta: bool = True, folds: int = 1,
         price_per_hour: float | None = None, mfu: float | None = None, lora: bool = True,
         gradient_checkpointing: bool = True, weight_bits: float | None = None) -> Plan:
    """Estimate time, cost and memory of one stage on one machine.

    Args:
        stage: ``teacher``/``student`` (training; k folds train k·(k-1)/k of the rows in all, then score
            out-of-fold), ``inference``, ``quantize`` (GPTQ; ``rows`` = calibration rows) or ``merge``.
        model_size: billions of parameters, or a ``MODEL_SIZES`` name.
        rows, max_length: the data; ``mean_tokens`` defaults to ``default_mean_tokens(max_length)``.
        hardware: a ``HARDWARE`` name. ``price_per_hour`` (USD per machine-hour) and ``mfu`` override its
            defaults.
        epochs, tta, folds, lora, gradient_checkpointing: as trained / run. ``folds`` > 1 at inference means
            unmerged fold models, each scoring every row.
        weight_bits: of the weights held on the GPU; default 4 for the teacher (QLoRA), else 16.
    Returns:
        a ``Plan``; ``print(plan)`` shows the summary and every assumption used.
    """
    _pick(stage, STAGES, "stage")
    hw = HARDWARE[_pick(hardware, HARDWARE, "hardware")]
    params_b, label = _model_params(model_size)
    opts = {"epochs": epochs, "tta": tta, "folds": folds, "mfu": mfu, "price_per_hour": price_per_hour,
            "lora": lora, "gradient_checkpointing": gradient_checkpointing,
            "weight_bits": weight_bits or _default_bits(stage, lora)}
    _check_options(rows, max_length, opts)
    n = params_b * 1e9
    mean, mean_line = _mean_tokens(mean_tokens, max_length)
    work = WORK[stage](n, rows, mean, opts)
    hours = _seconds(stage, work, n, hw, mfu) / 3600
    need, memory_why = (0.0, "") if stage == "merge" else _memory_need(stage, n, opts)
    fits, memory_note = _memory_verdict(stage, need, n, hw, opts)
    price = hw.price_per_hour if price_per_hour is None else price_per_hour
    flops = sum(work.flops.values())
    assumptions = [f"N = {params_b:g}e9 parameters ({label})", mean_line, *work.lines,
                   *_time_lines(stage, work, hw, mfu), f"{hw.name}: {hw.note}",
                   f"price ${price:g} per machine-hour" + (" (given)" if price_per_hour is not None else ""),
                   *([memory_why] if memory_why else [])]
    return Plan(stage=stage, model=label, params_b=params_b, hardware=hw.name, rows=rows, max_length=max_length,
                mean_tokens=mean, tokens=work.tokens, flops=flops,
                mfu=None if stage == "merge" else flops / (hw.gpus * hw.tflops * 1e12 * hours * 3600),
                wall_hours=hours, gpu_hours=0.0 if stage == "merge" else hours * hw.gpus,
                cost_usd=hours * price, quota_weeks=_quota_weeks(stage, hours, hw), fits_memory=fits,
                memory_gib=need, memory_note=memory_note, note=_limits(stage, hours, hw),
                assumptions=assumptions)


def plan_all(stage: str, model_size: float | str, rows: int, max_length: int, *,
             hardware: Iterable[str] | None = None, **options: Any) -> pd.DataFrame:
    """``plan`` for every machine in ``HARDWARE`` (or those named), one row each, indexed by hardware.
    ``options`` are ``plan``'s keyword arguments; print one ``plan(...)`` to see the assumptions."""
    import pandas as pd

    columns = ("gpus", "wall_hours", "gpu_hours", "cost_usd", "quota_weeks", "fits_memory", "memory_gib",
               "mfu", "flops", "memory_note", "note")
    rows_out = []
    for name in hardware or HARDWARE:
        p = plan(stage, model_size, rows, max_length, name, **options)
        values = {"gpus": HARDWARE[name].gpus, **{c: getattr(p, c) for c in columns[1:]}}
        rows_out.append({"hardware": name, **values})
    return pd.DataFrame(rows_out).set_index("hardware")
