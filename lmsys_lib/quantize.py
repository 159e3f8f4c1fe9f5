"""GPTQ (8-bit by default) of a merged classifier, with a fidelity report that can fail loudly.

Why GPT-QModel: the first-place solution quantised with ``auto-gptq``, which is archived, no longer imports
with current transformers and refuses to quantise without CUDA. Its maintained successor GPT-QModel
(``gptqmodel``) quantises on a CPU too. The path used here is transformers' ``GPTQConfig`` (optimum drives
GPT-QModel's GPTQ solver block by block): it quantises the decoder's linear layers only, so the
classification head (``score``) stays in 16-bit, and the result is a plain checkpoint that
``AutoModelForSequenceClassification.from_pretrained`` loads. (GPT-QModel's own loader is built around
causal-LM heads and restructures a sequence classifier.)

Contract:
- ``calibration_set`` packs the training rows with our own prompt format (``prompting.Packer``) at
  ``calib_max_length`` and takes one row from each of ``calib_rows`` length bins: short and long rows both
  calibrate the Hessians.
- ``quantize`` writes ``out_dir`` atomically: sharded safetensors, ``config.json`` (its
  ``quantization_config`` without the calibration data), the tokenizer and ``quantize.json`` (settings,
  calibration lengths, versions, timings, and the kernels to use per device). It checks on disk that every
  decoder linear is quantised and that ``score`` is not.
- ``load_quantized`` validates the folder first (config, shard index, safetensors headers against file
  sizes, missing weights) and names what is wrong; then tries the recorded kernels in order: on a CUDA GPU
  GPTQ Marlin (fp16 on a T4, sm75: Marlin there takes fp16 only), then Triton, then the torch kernel; on a
  CPU the torch kernel, in the CPU's compute dtype (``modeling.cpu_dtype``: fp32 unless the CPU has native
  bf16 — a CPU without it runs bf16 matmuls ~100× slower than fp32). GPT-QModel's CPU int8 kernel
  (``gptq_torch_int8``) loads too but measured far slower than the torch kernel in fp32 on an AVX2 CPU
  (``bench/bench_cpu_dtypes.py``), so it is not tried by default.
- ``fidelity_report`` compares quantised and unquantised on held-out rows, both in the dtype the model will
  run in on that device (recorded as ``dtype``): log loss of each, mean / max KL, argmax agreement,
  max |Δlogit|, size on disk, load time and rows/s; ``check_fidelity`` raises ``FidelityError`` when it
  misses the config's thresholds.

CPU notes: GPT-QModel reads ``GPTQMODEL_CPU_WORKERS`` (set here to the core count, at most 12, unless
already set); its first run JIT-compiles a small CPU extension (~30 s) into ``jit_cache_dir()``
(``~/.cache/gptqmodel/torch_extensions``, or ``$GPTQMODEL_TORCH_EXTENSIONS_DIR``), reused afterwards.

This module never imports ``train``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import PackConfig, QuantizeConfig

SIDECAR = "quantize.json"
TEMPERATURE = "temperature.json"  # evaluate.TEMPERATURE_FILE (this module does not import evaluate)
KERNELS = {  # tried in order at load time; the first that loads is used (and logged)
    "cuda": ["gptq_marlin", "gptq_triton", "gptq_torch"],
    "cpu": ["gptq_torch"],
}
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class QuantizedCheckpointError(ValueError):
    """A quantised checkpoint folder is incomplete or corrupt (the message names the file and the problem)."""


class FidelityError(RuntimeError):
    """The quantised model strays further from the unquantised one than the configured thresholds allow."""


# -- environment ---------------------------------------------------------------------------------------


def jit_cache_dir() -> Path:
    """Where GPT-QModel caches its JIT-compiled extensions (``$GPTQMODEL_TORCH_EXTENSIONS_DIR`` moves it)."""
    root = os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "gptqmodel" / "torch_extensions"


def prepare_env() -> dict[str, str]:
    """Worker settings GPT-QModel needs, set before it is imported (existing values are kept)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(12, os.cpu_count() or 1))))
    return {"GPTQMODEL_CPU_WORKERS": os.environ["GPTQMODEL_CPU_WORKERS"], "jit_cache": str(jit_cache_dir())}


def resolve_device(device: Any = "auto") -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- calibration -----------------------------------------------------------------------------------


def calibration_set(frame: pd.DataFrame, tokenizer: Any, cfg: QuantizeConfig,
                    pack_cfg: PackConfig | None = None) -> tuple[list[list[int]], dict[str, Any]]:
    """``cfg.calib_rows`` packed rows drawn across the length distribution of ``frame``.

    Rows are packed at ``cfg.calib_max_length`` (the rest of ``pack_cfg`` as trained), sorted by length,
    cut into ``calib_rows`` bins of equal count, and one row is drawn (seeded) from each bin.
    Returns (id lists, summary of the chosen and of all lengths).
    """
    from .prompting import Packer

    if len(frame) == 0:
        raise ValueError("calibration needs at least one row")
    pack_cfg = dataclasses.replace(pack_cfg or PackConfig(), max_length=cfg.calib_max_length)
    packed = Packer(tokenizer, pack_cfg).pack_frame(frame)
    lengths = packed["n_tokens"].to_numpy()
    order = np.argsort(lengths, kind="stable")
    n = min(cfg.calib_rows, len(order))
    rng = np.random.default_rng(cfg.calib_seed)
    chosen = [int(rng.choice(part)) for part in np.array_split(order, n)]
    ids = [list(map(int, packed["input_ids"].iloc[i])) for i in chosen]
    picked = lengths[chosen]

    def quantiles(x: np.ndarray) -> dict[str, int]:
        return {f"p{q}": int(np.percentile(x, q)) for q in (0, 25, 50, 75, 100)}

    summary = {"rows": n, "of_rows": len(order), "max_length": cfg.calib_max_length,
               "tokens": int(picked.sum()), "chosen_lengths": quantiles(picked), "all_lengths": quantiles(lengths)}
    return ids, summary


# -- safetensors checks ----------------------------------------------------------------------------


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size (a cut file is named)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QuantizedCheckpointError(f"{path}: {size} bytes — not a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise QuantizedCheckpointError(f"{path}: header claims {n} bytes, file has {size} (truncated)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise QuantizedCheckpointError(f"{path}: unreadable safetensors header ({err})") from err
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + n + end != size:
        raise QuantizedCheckpointError(f"{path}: tensors need {8 + n + end} bytes, the file has {size} "
                                       "(truncated or corrupt; copy it again)")
    return tensors


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (via its index when sharded); each must exist."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError) as err:
            raise QuantizedCheckpointError(f"{index}: unreadable shard index ({err})") from err
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise QuantizedCheckpointError(f"{folder}: shard(s) listed in {index.name} are missing: {missing}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if not single.exists():
        raise QuantizedCheckpointError(f"{folder}: no model.safetensors(.index.json) — not a saved checkpoint "
                                       "(only safetensors are read)")
    return [single]


def tensor_shapes(folder: Path) -> dict[str, tuple[list[int], str]]:
    """name → (shape, dtype) of every tensor in the folder's safetensors files, headers only."""
    shapes: dict[str, tuple[list[int], str]] = {}
    for file in checkpoint_files(folder):
        for key, value in read_header(file).items():
            shapes[key] = (value["shape"], value["dtype"])
    return shapes


def validate_quantized(folder: str | Path, allow_rejected: bool = False) -> dict[str, Any]:
    """Check a quantised checkpoint folder without loading it; returns its ``config.json`` as a dict.

    Raises ``QuantizedCheckpointError`` naming the file and problem: missing/unreadable config, no GPTQ
    ``quantization_config``, missing shards, truncated safetensors, a decoder linear without its quantised
    tensors, a quantised head, or a folder whose ``fidelity.json`` says it failed (unless ``allow_rejected``).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise QuantizedCheckpointError(f"{folder}: no config.json (not a checkpoint folder, or an unfinished copy)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise QuantizedCheckpointError(f"{config_path}: not valid JSON ({err})") from err
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "gptq":
        raise QuantizedCheckpointError(f"{config_path}: no GPTQ quantization_config — this folder is not a "
                                       "quantised checkpoint (quantise it with lmsys quantize)")
    shapes = tensor_shapes(folder)
    problems = _layout_problems(shapes)
    if problems:
        raise QuantizedCheckpointError(f"{folder}: " + "; ".join(problems))
    fidelity = folder / "fidelity.json"
    if not allow_rejected and fidelity.exists() and json.loads(fidelity.read_text(encoding="utf-8")).get(
            "passed") is False:
        raise QuantizedCheckpointError(f"{folder} failed its fidelity check ({fidelity}); quantise again with "
                                       "other settings, or pass allow_rejected=True to look at it anyway")
    return config


def _layout_problems(shapes: dict[str, Any]) -> list[str]:
    """Every decoder linear has qweight/scales/qzeros, none is left as a plain weight, the head is plain."""
    problems = []
    linears = {k.rsplit(".", 1)[0] for k in shapes if k.rsplit(".", 1)[0].endswith(LINEAR_SUFFIXES)
               and ".layers." in k}
    for module in sorted(linears):
        have = {part for part in ("qweight", "scales", "qzeros", "weight") if f"{module}.{part}" in shapes}
        if "weight" in have:
            problems.append(f"{module} is not quantised (plain weight)")
        elif have != {"qweight", "scales", "qzeros"}:
            problems.append(f"{module} lacks {sorted({'qweight', 'scales', 'qzeros'} - have)}")
    if not linears:
        problems.append("no decoder linear layers found")
    if "score.weight" not in shapes:
        problems.append("no score.weight (the 16-bit classification head)")
    if any(k.startswith("score.") and k != "score.weight" and k != "score.bias" for k in shapes):
        problems.append("the score head is quantised; it must stay 16-bit")
    return problems[:8]


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# -- quantise ---------------------------------------------------------------------------------------


def quantize(model_dir: str | Path, out_dir: str | Path, calib_ids: Sequence[Sequence[int]], cfg: QuantizeConfig,
             device: Any = "auto", calib_summary: dict[str, Any] | None = None,
             log: Callable[[str], None] = print) -> Path:
    """GPTQ the decoder linears of the classifier in ``model_dir`` → ``out_dir`` (score head kept unquantised).

    Args:
        model_dir: a plain (merged) ``*ForSequenceClassification`` checkpoint with its tokenizer.
        out_dir: written atomically (``out_dir.tmp`` then renamed).
        calib_ids: packed calibration rows (``calibration_set``).
        cfg: bits, group size, desc_act, symmetric, damping, dtype.
        device: "auto" (first GPU, else CPU), "cpu", "cuda:0", ...
    """
    env = prepare_env()
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, GPTQConfig

    from .modeling import attention_for, compute_dtype, load_tokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the model folder itself: quantise into another folder")
    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{model_dir} is already quantised; quantise the 16-bit merged checkpoint")
    if not (config.architectures or [""])[0].endswith("ForSequenceClassification") or config.num_labels != 3:
        raise ValueError(f"{model_dir}: expected a 3-label *ForSequenceClassification checkpoint (a merged model), "
                         f"got {config.architectures} with {config.num_labels} labels")
    _check_group_size(model_dir, cfg.group_size)
    if not calib_ids:
        raise ValueError("no calibration rows")
    if cfg.group_size not in (-1, 32, 64, 128) or not cfg.sym:
        log(f"WARNING: GPTQ Marlin (the fast kernel on a T4) takes group sizes -1/32/64/128 and symmetric "
            f"quantisation only; with group_size {cfg.group_size}, sym {cfg.sym} a GPU falls back to a slower kernel")
    device = resolve_device(device)
    dtype = compute_dtype(device, cfg.dtype, log)
    tokenizer = load_tokenizer(model_dir)
    data = [{"input_ids": torch.tensor([list(x)], dtype=torch.long),
             "attention_mask": torch.ones(1, len(x), dtype=torch.long)} for x in calib_ids]
    gptq = GPTQConfig(bits=cfg.bits, group_size=cfg.group_size, desc_act=cfg.desc_act, sym=cfg.sym,
                      damp_percent=cfg.damp_percent, dataset=data, model_seqlen=max(len(x) for x in calib_ids),
                      pad_token_id=tokenizer.pad_token_id, batch_size=1)
    log(f"GPTQ {cfg.bits}-bit, group {cfg.group_size}, desc_act {cfg.desc_act}, sym {cfg.sym}: {len(data)} "
        f"calibration rows on {device} in {str(dtype).split('.')[-1]} (CPU workers "
        f"{env['GPTQMODEL_CPU_WORKERS']}, JIT cache {env['jit_cache']})")
    start = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, quantization_config=gptq, dtype=dtype, attn_implementation=attention_for(config, "auto"),
        **_placement(device))
    seconds = time.perf_counter() - start
    qc = model.config.quantization_config
    qc.dataset = None  # never write the calibration rows into config.json
    qc.tokenizer = None
    qc.backend = "auto"
    source_dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", "") or "").split(".")[-1]
    if dtype == torch.float32:
        _store_unquantised_as_source(model, model_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=f"{int(cfg.max_shard_gb * 1024)}MB")
    tokenizer.save_pretrained(tmp)
    problems = _layout_problems(tensor_shapes(tmp))
    if problems:
        raise RuntimeError(f"quantised checkpoint has the wrong layout: {'; '.join(problems)}")
    sidecar = {"source": str(model_dir), "source_dtype": source_dtype, "settings": dataclasses.asdict(cfg), "calibration": calib_summary or
               {"rows": len(calib_ids)}, "device": str(device), "dtype": str(dtype).split(".")[-1],
               "quantize_seconds": round(seconds, 2), "kernels": KERNELS, "versions": _versions(),
               "kernel_notes": "CUDA: GPTQ Marlin first (a T4, sm75, needs fp16; GPT-QModel builds it on first use, "
                               "which needs a CUDA compiler), else Triton, else the torch kernel; CPU: torch kernel "
                               "in the CPU's compute dtype (fp32 without native bf16). Override with "
                               "load_quantized(..., backend=..., dtype=...)."}
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
    if (model_dir / TEMPERATURE).is_file():  # the OOF-fitted temperature travels with the model
        shutil.copyfile(model_dir / TEMPERATURE, tmp / TEMPERATURE)
    _carry_contract(model_dir, tmp, source_dtype, cfg, log)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    del model
    log(f"quantised in {seconds:.1f} s → {out_dir} ({folder_bytes(out_dir) / 2**20:.1f} MiB, from "
        f"{folder_bytes(model_dir) / 2**20:.1f} MiB)")
    return out_dir


def _carry_contract(model_dir: Path, out: Path, source_dtype: str, cfg: QuantizeConfig,
                    log: Callable[[str], None]) -> None:
    """The merged model's contract (prompt format, label order, temperature) goes with the quantised one."""
    from . import contract

    found = contract.read(model_dir)
    if found is None:
        log(f"WARNING: {model_dir} has no {contract.CONTRACT_FILE}: the quantised model carries none either "
            "(predict will need the prompt format it was trained with)")
    found = found or {}
    contract.write(out, found.get("pack"), found.get("temperature"), found.get("source_dtype") or source_dtype,
                   "quantize", model=found.get("model"),
                   quantization={"method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size,
                                 "desc_act": cfg.desc_act, "sym": cfg.sym})


def _store_unquantised_as_source(model: Any, model_dir: Path) -> None:
    """After an fp32 calibration (a CPU without native bf16), cast each weight GPTQ left unquantised
    (embeddings, norms, the score head) back to its own 16-bit dtype in the merged checkpoint (read from the
    safetensors headers): it came from there, so the cast is exact and the folder stays as small as a 16-bit
    calibration's. Weights stored in fp32 stay fp32; GPTQ's own tensors (qweight, scales, zeros, biases) are
    buffers and keep their dtypes."""
    import torch

    from .merge import _safetensor_files

    stored = {key: value["dtype"] for file in _safetensor_files(model_dir) for key, value in read_header(file).items()}
    half = {"BF16": torch.bfloat16, "F16": torch.float16}
    for name, param in model.named_parameters():
        target = half.get(stored.get(name, ""))
        if target is not None and param.dtype == torch.float32:
            param.data = param.data.to(target)


def _check_group_size(model_dir: Path, group_size: int) -> None:
    """Every decoder linear's input and output widths must be multiples of 32 (GPT-QModel packs weights in
    32-wide blocks) and its input width a multiple of the group size (the kernels need whole groups);
    checked from the safetensors headers."""
    from .merge import _safetensor_files

    widths, outs = {}, {}
    for file in _safetensor_files(model_dir):
        for key, value in read_header(file).items():
            module = key[:-len(".weight")]
            if key.endswith(".weight") and module.endswith(LINEAR_SUFFIXES):
                outs[module.rsplit(".", 1)[-1]], widths[module.rsplit(".", 1)[-1]] = value["shape"][:2]
    bad = {f"{k} in": w for k, w in widths.items() if w % 32} | {f"{k} out": w for k, w in outs.items() if w % 32}
    if bad:
        raise ValueError(f"GPTQ packing needs layer widths that are multiples of 32; this model has {bad}")
    bad = {k: w for k, w in widths.items() if group_size != -1 and w % group_size}
    if bad:
        raise ValueError(f"group_size {group_size} does not divide the input width of {bad}; pick a divisor of "
                         f"{sorted(set(bad.values()))} (or -1 for per-channel)")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("gptqmodel", "optimum", "transformers", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


# -- load -------------------------------------------------------------------------------------------


def load_quantized(folder: str | Path, device: Any = "cpu", backend: str | None = None,
                   log: Callable[[str], None] = print, allow_rejected: bool = False,
                   dtype: str = "auto") -> tuple[Any, Any, dict[str, Any]]:
    """Validate and load a quantised checkpoint → (model in eval mode, tokenizer, info).

    ``backend`` forces one GPT-QModel kernel; else the kernels recorded for the device class are tried in
    order. ``dtype`` ("auto", "fp16", "bf16", "fp32"): "auto" is fp16 on a GPU (the dtype it was quantised
    in on sm >= 80 when that was 16-bit) and ``modeling.cpu_dtype()`` on a CPU. ``info`` says which kernel,
    dtype and load time.
    """
    prepare_env()
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, GPTQConfig

    from .modeling import attention_for, compute_dtype, load_tokenizer

    folder = Path(folder)
    config = validate_quantized(folder, allow_rejected)
    attention = attention_for(AutoConfig.from_pretrained(folder), "auto")
    device = resolve_device(device)
    sidecar = json.loads((folder / SIDECAR).read_text(encoding="utf-8")) if (folder / SIDECAR).exists() else {}
    kernels = [backend] if backend else (sidecar.get("kernels") or KERNELS)[device.type]
    wanted = dtype
    dtype = compute_dtype(device, wanted, log)
    if wanted == "auto" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        half = [d for d in (sidecar.get("dtype"), sidecar.get("source_dtype")) if d in ("bfloat16", "float16")]
        if half:  # sm80+ runs the 16-bit dtype it was quantised in (or, after an fp32 CPU calibration, trained in)
            dtype = getattr(torch, half[0])
    failures = []
    for kernel in kernels:
        start = time.perf_counter()
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=dtype, output_loading_info=True, **_placement(device),
                quantization_config=GPTQConfig(bits=config["quantization_config"]["bits"], backend=kernel),
                attn_implementation=attention)
        except Exception as err:  # a kernel that cannot build or run here (no CUDA, no compiler, wrong dtype)
            failures.append(f"{kernel}: {str(err).splitlines()[0][:200]}")
            continue
        missing = sorted(info["missing_keys"])
        if missing:
            raise QuantizedCheckpointError(f"{folder}: weights missing from the checkpoint: {missing[:5]}")
        if device.type == "cpu":
            eager_dequantize(model)
        seconds = time.perf_counter() - start
        layer = next(m for n, m in model.named_modules() if n.endswith(LINEAR_SUFFIXES))
        model.eval()
        details = {"kernel": kernel, "kernel_class": type(layer).__name__, "dtype": str(dtype).split(".")[-1],
                   "device": str(device), "load_seconds": round(seconds, 3), "tried": failures}
        log(f"loaded {folder} with {kernel} ({type(layer).__name__}, {details['dtype']}) in {seconds:.1f} s"
            + (f"; unavailable: {failures}" if failures else ""))
        return model, load_tokenizer(folder), details
    raise RuntimeError(f"{folder}: no GPTQ kernel could load it on {device}: {failures}")


def eager_dequantize(model: Any) -> int:
    """Undo GPT-QModel's per-layer ``torch.compile`` of the torch kernel's dequantiser (CPU use).

    On a CPU it buys nothing: measured on the demo's GPTQ-8 SmolLM2-135M (2 cores, fp32), steady forwards
    take the same time compiled or eager (1.6-2.3 s per 8 rows), while a cold inductor cache spends 17-20 s
    on each of the first forwards, and every one of the 210 layers recompiles until dynamo's limit (128)
    sends the rest to eager anyway. Outputs are identical. Returns how many layers were reset."""
    reset = 0
    for module in model.modules():
        if "dequantize_weight" in vars(module):  # the compiled wrapper shadows the class's own method
            del module.dequantize_weight
            reset += 1
    return reset


def _placement(device: Any) -> dict[str, Any]:
    """``device_map`` on a GPU only (on a CPU transformers would take the map for offloading)."""
    return {"device_map": {"": str(device)}} if device.type == "cuda" else {}


def load_reference(folder: str | Path, device: Any, dtype: Any) -> Any:
    """The unquantised classifier in ``dtype`` on ``device`` (eval mode)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .modeling import attention_for

    model = AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=dtype, attn_implementation=attention_for(AutoConfig.from_pretrained(folder), "auto"))
    return model.to(device).eval()


# -- fidelity ---------------------------------------------------------------------------------------


def fidelity_report(reference_dir: str | Path, quantized_dir: str | Path, frame: pd.DataFrame,
                    pack_cfg: PackConfig, cfg: QuantizeConfig | None = None, device: Any = "auto",
                    log: Callable[[str], None] = print, dtype: str = "auto") -> dict[str, Any]:
    """Quantised vs unquantised on ``frame``'s rows (held out from training), on ``device`` and both in the
    dtype the quantised model runs in there (``load_quantized``'s choice for ``dtype``, recorded in the
    report: on a CPU without native bf16 that is fp32; pass ``dtype="fp16"`` to check a T4's dtype on a CPU).

    Returns log loss of each (when ``frame`` has labels), mean and max KL(reference ‖ quantised), argmax
    agreement, max |Δlogit|, size on disk, load seconds and rows/s of each, the kernel used, and per-row
    ``kl`` and probabilities (``probs``) for plots.
    """
    import torch

    from .metrics import log_loss, softmax
    from .modeling import load_tokenizer, predict_logits

    cfg = cfg or QuantizeConfig()
    from .prompting import Packer

    if len(frame) == 0:
        raise ValueError("the fidelity report needs at least one held-out row")
    device = resolve_device(device)
    tokenizer = load_tokenizer(quantized_dir)
    ids = list(Packer(tokenizer, pack_cfg).pack_frame(frame)["input_ids"])
    model, _, info = load_quantized(quantized_dir, device, log=log, allow_rejected=True, dtype=dtype)
    dtype = model.dtype

    def timed_logits(m: Any) -> tuple[np.ndarray, float]:
        predict_logits(m, ids[: min(2, len(ids))], tokenizer.pad_token_id, cfg.eval_batch_size, device)  # warm-up
        start = time.perf_counter()
        out = predict_logits(m, ids, tokenizer.pad_token_id, cfg.eval_batch_size, device)
        return out, len(ids) / max(time.perf_counter() - start, 1e-9)

    q_logits, q_speed = timed_logits(model)
    del model
    start = time.perf_counter()
    reference = load_reference(reference_dir, device, dtype)
    ref_load = time.perf_counter() - start
    r_logits, r_speed = timed_logits(reference)
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    p, q = softmax(r_logits), softmax(q_logits)
    kl = np.sum(p * (np.log(np.clip(p, 1e-15, 1)) - np.log(np.clip(q, 1e-15, 1))), axis=1)
    report: dict[str, Any] = {
        "rows": len(ids), "device": str(device), "dtype": str(dtype).split(".")[-1], "kernel": info["kernel"],
        "non_finite_reference": int((~np.isfinite(r_logits).all(axis=1)).sum()),
        "non_finite_quantized": int((~np.isfinite(q_logits).all(axis=1)).sum()),
        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
        "argmax_agreement": float(np.mean(p.argmax(1) == q.argmax(1))),
        "max_abs_dlogit": float(np.abs(r_logits - q_logits).max()),
        "bytes_reference": folder_bytes(reference_dir), "bytes_quantized": folder_bytes(quantized_dir),
        "load_seconds_reference": round(ref_load, 3), "load_seconds_quantized": info["load_seconds"],
        "rows_per_s_reference": round(r_speed, 2), "rows_per_s_quantized": round(q_speed, 2)}
    if "label" in frame.columns:
        labels = frame["label"].to_numpy()
        report["log_loss_reference"] = log_loss(labels, p)
        report["log_loss_quantized"] = log_loss(labels, q)
    report["kl"] = kl
    report["probs"] = {"reference": p, "quantized": q}
    log(f"quantisation fidelity on {len(ids)} rows: " + ", ".join(
        f"{k} {v:.4g}" for k, v in report.items() if isinstance(v, float)))
    return report


def check_fidelity(report: dict[str, Any], cfg: QuantizeConfig) -> None:
    """Raise ``FidelityError`` naming each threshold the report misses."""
    misses = []  # written as "not <=": a NaN fails every check
    if report.get("non_finite_quantized", 0) > report.get("non_finite_reference", 0):
        misses.append(f"{report['non_finite_quantized']} rows with non-finite logits")
    if not report["kl_mean"] <= cfg.max_mean_kl:
        misses.append(f"mean KL {report['kl_mean']:.3g} > max_mean_kl {cfg.max_mean_kl:g}")
    if cfg.max_row_kl and not report["kl_max"] <= cfg.max_row_kl:
        misses.append(f"max row KL {report['kl_max']:.3g} > max_row_kl {cfg.max_row_kl:g}")
    if not report["argmax_agreement"] >= cfg.min_agreement:
        misses.append(f"argmax agreement {report['argmax_agreement']:.3f} < min_agreement {cfg.min_agreement:g}")
    if misses:
        raise FidelityError("the quantised model is not faithful to the unquantised one: " + "; ".join(misses)
                            + " — try more calibration rows, a smaller group size, 8 bits, or desc_act=True")


def saved_report(report: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of a fidelity report (per-row arrays dropped)."""
    return {k: v for k, v in report.items() if k not in ("kl", "probs", "ids")}


def report_table(report: dict[str, Any]) -> pd.DataFrame:
    """One row per model: log loss, size, load time and speed, with KL/agreement for the quantised one."""
    rows = []
    for name, label in (("reference", "unquantised"), ("quantized", f"GPTQ ({report['kernel']})")):
        rows.append({"model": label, "log_loss": report.get(f"log_loss_{name}"),
                     "size_mib": report[f"bytes_{name}"] / 2**20,
                     "load_s": report[f"load_seconds_{name}"], "rows_per_s": report[f"rows_per_s_{name}"],
                     "kl_mean": 0.0 if name == "reference" else report["kl_mean"],
                     "kl_max": 0.0 if name == "reference" else report["kl_max"],
                     "argmax_agreement": 1.0 if name == "reference" else report["argmax_agreement"]})
    return pd.DataFrame(rows)


def plot_kl(report: dict[str, Any]) -> Any:
    """Histogram of per-row KL(unquantised ‖ quantised) (log-spaced), and P(A) of one against the other."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), dpi=100)
    left, right = fig.subplots(1, 2)
    kl = np.clip(report["kl"], 1e-12, None)
    left.hist(kl, bins=np.logspace(np.log10(kl.min()), np.log10(kl.max()) + 1e-9, 30))
    left.set_xscale("log")
    left.set_xlabel("KL(unquantised ‖ quantised) per row")
    left.set_ylabel("rows")
    left.set_title(f"mean {report['kl_mean']:.2e}, max {report['kl_max']:.2e}")
    ref, quant = report["probs"]["reference"], report["probs"]["quantized"]
    right.scatter(ref[:, 0], quant[:, 0], s=8, alpha=0.6)
    right.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    right.set_xlabel("unquantised P(A wins)")
    right.set_ylabel("quantised P(A wins)")
    fig.tight_layout()
    return fig


# -- the stage -------------------------------------------------------------------------------------


def run(model_dir: str | Path, out_dir: str | Path, train_csv: str | Path, holdout_csv: str | Path,
        pack_cfg: PackConfig, cfg: QuantizeConfig, device: Any = "auto", fraction: float = 1.0,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The quantisation stage: calibrate on ``train_csv``'s rows, quantise ``model_dir`` into ``out_dir``,
    report fidelity on ``holdout_csv``'s rows (labelled, never trained on) → ``out_dir/fidelity.json``, and
    raise ``FidelityError`` when the report misses the thresholds (the folder and report stay for a look).
    ``pack_cfg`` is the prompt format the model was trained with. ``fraction`` < 1 (a dry run) draws from
    that share of the train and holdout rows. Returns the report."""
    from .modeling import load_tokenizer
    from .parsing import read_competition, subsample

    train = subsample(read_competition(train_csv).frame, fraction)
    ids, summary = calibration_set(train, load_tokenizer(model_dir), cfg, pack_cfg)
    log(f"calibration: {summary['rows']} of {summary['of_rows']} rows, lengths {summary['chosen_lengths']} "
        f"(all rows {summary['all_lengths']})")
    out = quantize(model_dir, out_dir, ids, cfg, device=device, calib_summary=summary, log=log)
    rows = subsample(read_competition(holdout_csv).frame, fraction)
    report = fidelity_report(model_dir, out, rows, pack_cfg, cfg, device=device, log=log, dtype=cfg.dtype)
    report["ids"] = rows["id"].tolist()  # which holdout rows the probabilities belong to
    try:
        check_fidelity(report, cfg)
        report["passed"] = True
    except FidelityError:
        report["passed"] = False  # the folder stays to be looked at; load_quantized refuses it
        raise
    finally:
        (out / "fidelity.json").write_text(json.dumps(saved_report(report), indent=2), encoding="utf-8")
    kernel_pack = dataclasses.replace(pack_cfg, max_length=cfg.inference_max_length)  # as the kernel packs
    if cfg.attention_gate:  # before the temperature: T is fitted on the attention the kernel will run
        from . import inference
        from .config import InferenceConfig

        report["attention"] = inference.attention_gate(
            out, rows, InferenceConfig(pack=kernel_pack, degrade_max_length=kernel_pack.max_length, rule_priors=False),
            inference.devices_for(str(resolve_device(device)))[0], cfg.attention_max_mean_kl,
            cfg.attention_max_delta_log_loss, log=log)
    if cfg.fit_temperature_rows and len(rows) >= cfg.fit_temperature_rows:
        report["temperature"] = refit_temperature(out, rows, train, kernel_pack, device, f"{holdout_csv}", log)
    else:
        log(f"temperature: the one carried from the student (fitted on its OOF logits) is kept — {len(rows)} "
            f"holdout rows, fewer than fit_temperature_rows = {cfg.fit_temperature_rows}")
    return report


def refit_temperature(out: Path, rows: Any, train: Any, pack_cfg: PackConfig, device: Any, source: str,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit T on the quantised model's own output — the submission kernel on the labelled holdout ``rows``,
    swap-TTA averaged, rule rows with the priors of ``train`` — and record it in ``out``'s contract."""
    import gc

    from . import contract, inference
    from .config import InferenceConfig

    models, tokenizer, _ = inference.load_models(out, inference.devices_for(str(device))[:1], log=log)
    cfg = InferenceConfig(pack=pack_cfg, degrade_max_length=pack_cfg.max_length)
    fit = inference.fit_output_temperature(models, tokenizer, rows, cfg, priors=inference.measure_priors(train),
                                           source=f"{source} ({len(rows)} rows)", log=log)
    if (out / contract.CONTRACT_FILE).is_file():
        contract.set_temperature(out, fit)
    else:  # a model without a contract: its temperature.json (what contract.temperature_of falls back to)
        from .evaluate import save_temperature

        save_temperature(out, fit["value"], fit, overwrite=True)
    del models
    gc.collect()
    return fit
