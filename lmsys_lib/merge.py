"""Fold fusion: k LoRA adapters of one base → one model, exactly.

Each fold adapter k adds ΔW_k = s_k·B_k·A_k to every target weight (s_k = α/r, or α/√r with rsLoRA).
The k-fold ensemble's weight-space mean is W + mean_k ΔW_k. Three ways to fuse:

- ``merge_exact``: W + mean_k(s_k·B_k·A_k), computed in fp32 and cast once to the storage dtype; the score
  heads averaged; written as a plain HF sequence-classification checkpoint (safetensors, sharded). The base
  is streamed tensor by tensor from its safetensors files and written out in shards of ``max_shard_bytes``,
  so a 9B base never sits in memory twice (never once, even).
- Storage dtype (``storage``): the merged weights (every adapted weight and the head) are stored in fp32 by
  default — the input GPTQ quantises from. A LoRA update is often below the resolution of the weight it
  is added to: stored in bf16 (the base's dtype), W + ΔW rounds back to W for most elements and the fold
  ensemble's update is largely lost (``fidelity_report`` measures it per storage dtype). "fp16" keeps 3
  more mantissa bits than bf16 when the next stage runs fp16 (refused for a weight outside fp16's range);
  "base" stores the base's dtype. Weights no adapter touched keep the base's dtype (an upcast adds nothing).
  ``config.json`` keeps the base's dtype — the dtype the folds were trained in.
- ``exact_adapter``: the same update still as LoRA — A stacked, B stacked with each B_k scaled by s_k/k,
  rank Σ r_k, scaling 1 — for users who keep an adapter on a (quantised) base.
- ``naive_adapter``: the A and B matrices averaged key by key (what the first-place code did); it gives
  s·mean(B)·mean(A) ≠ mean(s·B·A). Kept only so ``weight_error``/``fidelity_report`` can measure it.

Adapters trained on a 4-bit (nf4) base are merged into the 16-bit weights on disk — never into the 4-bit
ones — and the log says so; a base checkpoint that is itself stored quantised is refused.
This module never imports ``train``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .prepare import file_sha256

PREFIX = "base_model.model."
HEAD = "score"


@dataclasses.dataclass
class Adapter:
    """One PEFT LoRA adapter read from disk (safetensors only)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, Any]

    @property
    def modules(self) -> list[str]:
        """Base weight names (``model.layers.0.self_attn.q_proj``) the adapter changes, in file order."""
        return [k[len(PREFIX):-len(".lora_A.weight")] for k in self.tensors if k.endswith(".lora_A.weight")]

    def scaling(self, module: str) -> float:
        r = self.tensors[f"{PREFIX}{module}.lora_A.weight"].shape[0]
        alpha = float(self.config["lora_alpha"])
        return alpha / (r ** 0.5) if self.config.get("use_rslora") else alpha / r

    def delta(self, module: str) -> Any:
        """s·B·A in fp32 for one module."""
        a = self.tensors[f"{PREFIX}{module}.lora_A.weight"].float()
        b = self.tensors[f"{PREFIX}{module}.lora_B.weight"].float()
        return self.scaling(module) * (b @ a)

    def head(self) -> dict[str, Any]:
        """The fully trained score head (``score.weight`` [, ``score.bias``])."""
        return {k[len(PREFIX):]: v for k, v in self.tensors.items() if k.startswith(f"{PREFIX}{HEAD}.")}


def read_adapter(path: str | Path) -> Adapter:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors``; refuse what this module cannot merge exactly."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors (a PEFT adapter folder saved with safetensors)")
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    problems = [f"{key}={config.get(key)!r}" for key in ("rank_pattern", "alpha_pattern") if config.get(key)]
    problems += [f"{key}=true" for key in ("use_dora", "fan_in_fan_out") if config.get(key)]
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={config['peft_type']!r}")
    if problems:
        raise ValueError(f"{path}: cannot merge an adapter with {', '.join(problems)}")
    adapter = Adapter(path, config, load_file(str(weights)))
    if not adapter.modules:
        raise ValueError(f"{path}: no LoRA matrices in the adapter")
    return adapter


AdapterSource = Sequence["str | Path | Adapter"]


def read_adapters(paths: AdapterSource) -> list[Adapter]:
    """Read several fold adapters (already read ones pass through: read once, use many times) and check
    they change the same modules with matching shapes."""
    if not paths:
        raise ValueError("no adapters to merge")
    adapters = [p if isinstance(p, Adapter) else read_adapter(p) for p in paths]
    first = adapters[0]
    for other in adapters[1:]:
        if set(other.modules) != set(first.modules):
            diff = sorted(set(other.modules) ^ set(first.modules))[:5]
            raise ValueError(f"{other.path} and {first.path} adapt different modules (e.g. {diff})")
        if other.head().keys() != first.head().keys():
            raise ValueError(f"{other.path} and {first.path} have different score heads")
    return adapters


def fold_adapters(root: str | Path) -> list[Path]:
    """The fold adapters of a teacher/student folder (``<root>/fold<k>/adapter``), in fold order."""
    root = Path(root)
    found = sorted(root.glob("fold*/adapter/adapter_model.safetensors"),
                   key=lambda p: int(p.parent.parent.name[4:]))
    if not found:
        raise FileNotFoundError(f"{root}: no fold*/adapter/adapter_model.safetensors")
    return [p.parent for p in found]


def mean_delta(adapters: Sequence[Adapter], module: str) -> Any:
    """mean_k(s_k·B_k·A_k) in fp32 — the exact weight-space mean of the folds' updates."""
    total = adapters[0].delta(module)
    for adapter in adapters[1:]:
        total += adapter.delta(module)
    return total / len(adapters)


def mean_head(adapters: Sequence[Adapter]) -> dict[str, Any]:
    heads = [a.head() for a in adapters]
    return {k: sum(h[k].float() for h in heads) / len(heads) for k in heads[0]}


# -- exact merge into a plain checkpoint -------------------------------------------------------------


STORAGE_DTYPES = ("fp32", "fp16", "bf16", "base")


def merge_exact(base_dir: str | Path, adapter_dirs: AdapterSource, out_dir: str | Path,
                tokenizer: Any = None, max_shard_bytes: int = 2 * 1024 ** 3,
                log: Callable[[str], None] = print, storage: str = "fp32") -> Path:
    """W + mean_k(s_k·B_k·A_k) for every adapted weight, heads averaged → ``out_dir`` (HF checkpoint).

    The base is read one tensor at a time from its safetensors file(s); output shards are flushed at
    ``max_shard_bytes`` (``model.safetensors.index.json`` when there are several). The causal-LM head
    (``lm_head``) is left out: the result is a ``*ForSequenceClassification`` checkpoint with 3 labels.
    ``storage``: the dtype of the merged weights and the head (``STORAGE_DTYPES``; see the module docstring).
    """
    import torch
    from safetensors import safe_open
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from .modeling import NUM_LABELS, _dtype, load_tokenizer

    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage {storage!r}: expected one of {STORAGE_DTYPES}")
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapters = read_adapters(adapter_dirs)
    config = AutoConfig.from_pretrained(base_dir)
    quant = getattr(config, "quantization_config", None)
    if quant:
        raise ValueError(f"{base_dir} is stored quantised ({quant}); merge into its 16-bit weights: pass the "
                         "16-bit checkpoint the adapters were trained from as base_dir")
    if config.model_type == "gemma3":
        raise ValueError(f"{base_dir} is a multimodal Gemma-3 checkpoint (model_type 'gemma3'), whose weight names "
                         "differ from its classifier's; merge a text-only checkpoint (model_type 'gemma3_text')")
    head_cls = _seq_cls_name(config)
    _say_if_trained_on_4bit([a.path for a in adapters], base_dir, log)
    tokenizer = tokenizer or load_tokenizer(base_dir)
    files = _safetensor_files(base_dir)
    pending = set(adapters[0].modules)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = _ShardWriter(tmp, max_shard_bytes)
    vocab_rows = config.vocab_size
    base_dtype = None
    bar = tqdm(total=_count_tensors(files), desc="merge", unit="tensor", mininterval=2.0)  # a 9B base: minutes
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                bar.update(1)
                if key.startswith(("lm_head.", f"{HEAD}.")):  # the causal-LM head, or a base's own score head
                    continue
                tensor = f.get_tensor(key)
                base_dtype = base_dtype or (tensor.dtype if tensor.is_floating_point() else None)
                module = key[:-len(".weight")] if key.endswith(".weight") else None
                if module in pending:
                    merged = tensor.float() + mean_delta(adapters, module)
                    tensor = _stored(key, merged, storage, tensor.dtype)  # the one cast
                    pending.discard(module)
                elif key.endswith("embed_tokens.weight") and tokenizer.pad_token_id >= tensor.shape[0]:
                    extra = torch.zeros(tokenizer.pad_token_id + 1 - tensor.shape[0], tensor.shape[1],
                                        dtype=tensor.dtype)
                    tensor = torch.cat([tensor, extra])  # the classifier added a pad token: its row is unused
                if key.endswith("embed_tokens.weight"):
                    vocab_rows = tensor.shape[0]
                writer.add(key, tensor)
    bar.close()
    if pending:
        raise ValueError(f"{base_dir}: the adapters change weights the base does not have: {sorted(pending)[:5]}")
    base_dtype = base_dtype or torch.float32
    for key, value in mean_head(adapters).items():
        writer.add(key, _stored(key, value.float(), storage, base_dtype))
    writer.close()
    config.num_labels = NUM_LABELS
    config.pad_token_id = tokenizer.pad_token_id
    config.vocab_size = vocab_rows  # grown by one when the classifier added a pad token
    config.architectures = [head_cls]
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _carry_temperature([a.path for a in adapters], tmp, log)
    _write_contract([a.path for a in adapters], tmp, str(base_dtype).split(".")[-1], log)
    stored = str(_dtype(storage) if storage != "base" else base_dtype).split(".")[-1]
    (tmp / "lmsys_merge.json").write_text(json.dumps(
        {"method": "exact", "base": str(base_dir), "adapters": [str(a.path) for a in adapters],
         "adapter_sha256": [file_sha256(Path(a.path) / "adapter_model.safetensors") for a in adapters],
         "base_identity": _identity(base_dir), "storage_dtype": stored,
         "formula": "W + mean_k(s_k * B_k @ A_k), fp32, one cast"}, indent=2), encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log(f"merged {len(adapters)} adapters exactly into {out_dir} ({len(adapters[0].modules)} weights, stored {stored})")
    return out_dir


def _stored(key: str, merged: Any, storage: str, base_dtype: Any) -> Any:
    """A merged fp32 tensor in the storage dtype ("base": the base's); fp16 refuses values beyond its range."""
    import torch

    from .modeling import _dtype

    dtype = base_dtype if storage == "base" else _dtype(storage)
    out = merged.to(dtype)
    if dtype == torch.float16 and not torch.isfinite(out).all():
        raise ValueError(f"{key}: merged values up to {float(merged.abs().max()):.4g} overflow fp16 (max 65504): "
                         "store the merge in fp32 or bf16")
    return out


def _say_if_trained_on_4bit(adapter_dirs: Sequence[Path], base_dir: Path, log: Callable[[str], None]) -> None:
    for path in adapter_dirs:
        fit = Path(path).parent / "fit_config.json"
        if fit.exists() and json.loads(fit.read_text(encoding="utf-8"))["model"].get("quantization") == "nf4":
            log(f"note: the adapters were trained on a 4-bit (nf4) base; they are merged into the 16-bit weights "
                f"of {base_dir}, not into 4-bit ones (the merged model differs from the trained one by the nf4 "
                "rounding of the base — compare them with fidelity_report)")
            return


def _carry_temperature(adapter_dirs: Sequence[Path], out: Path, log: Callable[[str], None]) -> None:
    """The temperature fitted on the folds' OOF logits (``<model>/temperature.json`` beside ``fold*/``)
    travels with the merged model, where ``lmsys predict`` finds it."""
    roots = {Path(p).resolve().parents[1] for p in adapter_dirs}  # <model>/fold<k>/adapter → <model>
    source = next(iter(roots)) / "temperature.json" if len(roots) == 1 else None
    if source is not None and source.is_file():
        shutil.copyfile(source, out / "temperature.json")
        log(f"temperature from {source} copied beside the merged model")


def _write_contract(adapter_dirs: Sequence[Path], out: Path, dtype: str, log: Callable[[str], None]) -> None:
    """``lmsys_contract.json``: the prompt format the folds were trained with (their saved stage config), the
    label order, the OOF-fitted temperature, the merged weights' dtype."""
    from . import contract

    found = contract.from_folds(adapter_dirs)
    path = contract.write(out, found["pack"], found["temperature"], dtype, "merge", model=found["model"])
    if found["pack"] is None:
        log(f"WARNING: the adapters are not one lmsys model's folds (no saved stage config beside fold*/): "
            f"{path} records no prompt format — pass the one they were trained with to quantize and predict")


def _count_tensors(files: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            total += len(f.keys())
    return total


def _safetensor_files(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        names = dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        return [base_dir / n for n in names]
    single = base_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{base_dir}: no model.safetensors(.index.json) — only safetensors are read")
    return [single]


def _seq_cls_name(config: Any) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as NAMES,
    )

    if config.model_type not in NAMES:
        raise ValueError(f"no sequence-classification model for model_type {config.model_type!r}")
    return NAMES[config.model_type]


class _ShardWriter:
    """Accumulate tensors and write ``model-0000i-of-0000n.safetensors`` shards of bounded size."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.current: dict[str, Any] = {}
        self.size = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, key: str, tensor: Any) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self._flush()
        self.current[key] = tensor.contiguous()
        self.size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.current)))
        self.current, self.size = {}, 0

    def close(self) -> None:
        if self.current:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.shards[0][0], self.out / "model.safetensors")
            return
        weight_map, total = {}, 0
        for i, (path, keys) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out / name)
            total += (self.out / name).stat().st_size
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


# -- adapters: the exact concatenated form, and the naive average ------------------------------------


def exact_adapter(adapter_dirs: AdapterSource, out_dir: str | Path) -> Path:
    """The exact merge kept as LoRA: A_cat = [A_1; …; A_k], B_cat = [s_1·B_1/k, …, s_k·B_k/k], scaling 1.

    B_cat·A_cat = mean_k(s_k·B_k·A_k) exactly; rank Σ r_k (5 folds of r = 64 → 320). Heads averaged.
    """
    import torch

    adapters = read_adapters(adapter_dirs)
    k = len(adapters)
    tensors: dict[str, Any] = {}
    for module in adapters[0].modules:
        a = [ad.tensors[f"{PREFIX}{module}.lora_A.weight"].float() for ad in adapters]
        b = [ad.tensors[f"{PREFIX}{module}.lora_B.weight"].float() * (ad.scaling(module) / k) for ad in adapters]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.cat(a, dim=0).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.cat(b, dim=1).contiguous()
    rank = sum(ad.tensors[f"{PREFIX}{adapters[0].modules[0]}.lora_A.weight"].shape[0] for ad in adapters)
    config = dict(adapters[0].config, r=rank, lora_alpha=rank, use_rslora=False, lora_dropout=0.0)
    return _write_adapter(out_dir, config, tensors, mean_head(adapters))


def naive_adapter(adapter_dirs: AdapterSource, out_dir: str | Path) -> Path:
    """Every tensor averaged key by key (A with A, B with B) — the first-place code's fusion. Inexact."""
    naive = _naive(read_adapters(adapter_dirs))
    lora = {k: v for k, v in naive.tensors.items() if ".lora_" in k}
    return _write_adapter(out_dir, naive.config, lora, naive.head())


def _naive(adapters: Sequence[Adapter]) -> Adapter:
    tensors = {k: sum(ad.tensors[k].float() for ad in adapters) / len(adapters) for k in adapters[0].tensors}
    return Adapter(Path("<naive average>"), dict(adapters[0].config), tensors)


def _write_adapter(out_dir: str | Path, config: dict[str, Any], lora: dict[str, Any], head: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = dict(lora) | {PREFIX + k: v.contiguous() for k, v in head.items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir


def weight_error(adapter_dirs: AdapterSource) -> dict[str, float]:
    """How far the naive A/B average is from the exact mean update, in weight space.

    ``relative_frobenius``: ‖ΔW_naive − ΔW_exact‖_F / ‖ΔW_exact‖_F over all adapted weights together;
    ``max_module_relative``: the worst single weight.
    """
    adapters = read_adapters(adapter_dirs)
    naive = _naive(adapters)
    num = den = 0.0
    worst = 0.0
    for module in adapters[0].modules:
        exact = mean_delta(adapters, module)
        err = float((naive.delta(module) - exact).pow(2).sum())
        ref = float(exact.pow(2).sum())
        num, den = num + err, den + ref
        worst = max(worst, (err / ref) ** 0.5 if ref > 0 else 0.0)
    return {"relative_frobenius": (num / den) ** 0.5 if den > 0 else 0.0, "max_module_relative": worst}


# -- fidelity ---------------------------------------------------------------------------------------


def fidelity_report(base_dir: str | Path, adapter_dirs: AdapterSource, merged_dir: str | Path,
                    frame: pd.DataFrame, pack_cfg: Any, batch_size: int = 8, work_dir: str | Path | None = None,
                    log: Callable[[str], None] = print, device: Any = "auto", dtype: str = "auto",
                    storages: Sequence[str] | None = None) -> dict[str, Any]:
    """Merged model vs the k-fold ensemble (mean of the folds' probabilities) on ``frame``'s rows.

    Rows should be held out from every fold (e.g. a holdout file). Returns log loss of the ensemble, the
    exact merge and the naive merge (when ``frame`` has labels), mean KL(ensemble ‖ model) and argmax
    agreement with the ensemble for both merges, the naive merge's weight error, and the per-row
    probabilities (``probs``) for plots.

    Runs on ``device`` ("auto": the first GPU, else the CPU) in ``dtype`` (``modeling.compute_dtype``: fp16 on
    a GPU, the CPU's compute dtype on a CPU): the base is loaded once, straight onto the device, and the fold adapters (then the naive one) are
    switched on it, so a 9B needs one 16-bit copy — a 24 GB GPU — at a time. The merged model is then scored
    once per storage dtype (``storages``; default: every one the merged checkpoint can show — fp32, fp16 and
    bf16 for an fp32 merge): ``kl_ensemble_exact_<dtype>`` says how much of the ensemble each storage keeps;
    ``kl_ensemble_exact`` is the merge as stored. Each is run in the compute dtype, so a storage wider than
    it cannot show more than it: on a GPU (fp16) the fp32 and fp16 rows are the same model — run on a CPU in
    fp32 (``dtype="fp32"``) to see all three apart.
    """
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .metrics import log_loss, softmax
    from .modeling import NUM_LABELS, attention_for, compute_dtype, load_tokenizer, predict_logits, set_pad
    from .prompting import Packer
    from .quantize import resolve_device

    if isinstance(storages, str) or sorted(set(storages or ()) - set(_DTYPE_BITS)):
        raise ValueError(f"storages {storages!r}: expected a list of some of {sorted(_DTYPE_BITS)}")
    base_dir, merged_dir, device = Path(base_dir), Path(merged_dir), resolve_device(device)
    compute = compute_dtype(device, dtype, log)
    work = Path(work_dir) if work_dir else merged_dir.parent / "merge-work"  # the naive adapter, kept to look at
    adapters = read_adapters(adapter_dirs)  # once: a 9B model's fold adapters are hundreds of MB each
    tokenizer = load_tokenizer(base_dir)
    ids = list(Packer(tokenizer, pack_cfg).pack_frame(frame)["input_ids"])
    placement = {"device_map": {"": device.index or 0} if device.type == "cuda" else {"": str(device)}}

    def probs_of(model: Any) -> np.ndarray:
        return softmax(predict_logits(model, ids, tokenizer.pad_token_id, batch_size, device=device, dtype=compute))

    base = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=NUM_LABELS, dtype=compute, **placement,
        attn_implementation=attention_for(AutoConfig.from_pretrained(base_dir), "auto", device))
    set_pad(base, tokenizer)
    naive_dir = naive_adapter(adapters, work / "naive-adapter")
    paths = [a.path for a in adapters] + [naive_dir]
    model = PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    all_probs = []
    for i, path in enumerate(paths):  # one base, the adapters switched on it
        if i:
            model.load_adapter(path, adapter_name=f"a{i}")
            model.set_adapter(f"a{i}")
            model.delete_adapter(f"a{i - 1}")
        all_probs.append(probs_of(model))
    fold_probs, naive = all_probs[:-1], all_probs[-1]
    ensemble = np.mean(fold_probs, axis=0)
    del model, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    stored = _stored_dtype(merged_dir)
    storages = list(storages) if storages else [d for d in ("fp32", "fp16", "bf16") if _DTYPE_BITS[d] <= _DTYPE_BITS[stored]]
    by_storage = {d: _merged_probs(merged_dir, d, compute, placement, device, probs_of) for d in storages}
    exact = by_storage.get(stored)
    if exact is None:
        exact = _merged_probs(merged_dir, stored, compute, placement, device, probs_of)

    def kl(p: np.ndarray, q: np.ndarray) -> float:
        p, q = np.clip(p, 1e-15, 1), np.clip(q, 1e-15, 1)
        return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))

    labels = frame["label"].to_numpy() if "label" in frame.columns else None
    report: dict[str, Any] = {"rows": len(frame), "folds": len(fold_probs), "device": str(device),
                              "dtype": str(compute).split(".")[-1], "storage_dtype": stored}
    for name, probs in (("ensemble", ensemble), ("exact", exact), ("naive", naive)):
        if labels is not None:
            report[f"log_loss_{name}"] = log_loss(labels, probs)
        if name != "ensemble":
            report[f"kl_ensemble_{name}"] = kl(ensemble, probs)
            report[f"argmax_agreement_{name}"] = float(np.mean(probs.argmax(1) == ensemble.argmax(1)))
    for name, probs in by_storage.items():
        report[f"kl_ensemble_exact_{name}"] = kl(ensemble, probs)
    if labels is not None:
        report["log_loss_naive_minus_exact"] = report["log_loss_naive"] - report["log_loss_exact"]
        report["log_loss_each_fold"] = [log_loss(labels, p) for p in fold_probs]
    report["naive_weight_error"] = weight_error(adapters)
    report["probs"] = {"ensemble": ensemble, "exact": exact, "naive": naive}
    log(f"fidelity on {len(frame)} rows ({report['dtype']} on {device}): " + ", ".join(
        f"{k} {v:.4g}" for k, v in report.items() if isinstance(v, float)))
    return report


_DTYPE_BITS = {"fp32": 23, "fp16": 10, "bf16": 7}  # mantissa bits: what a storage dtype keeps of ΔW
_SAFETENSORS_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


def _stored_dtype(merged_dir: Path) -> str:
    """The widest float dtype the merged checkpoint stores its weights in (safetensors headers)."""
    from .quantize import read_header

    found = {_SAFETENSORS_NAMES.get(v["dtype"]) for f in _safetensor_files(merged_dir) for v in read_header(f).values()}
    found.discard(None)
    return max(found, key=_DTYPE_BITS.__getitem__) if found else "fp32"


def _merged_probs(merged_dir: Path, storage: str, compute: Any, placement: dict[str, Any], device: Any,
                  probs_of: Callable[[Any], np.ndarray]) -> np.ndarray:
    """The merged model as if stored in ``storage``, run in ``compute``: loaded in the storage dtype (fp32
    storage: straight in the compute dtype — one rounding, as a load of an fp32 file does), then cast."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .modeling import _dtype, attention_for

    wanted = _dtype(storage)
    load = compute if wanted == torch.float32 else wanted
    model = AutoModelForSequenceClassification.from_pretrained(
        merged_dir, dtype=load, **placement,
        attn_implementation=attention_for(AutoConfig.from_pretrained(merged_dir), "auto", device))
    probs = probs_of(model.to(compute))
    del model
    gc.collect()
    return probs


def save_report(report: dict[str, Any], merged_dir: str | Path) -> Path:
    """``merged_dir/fidelity.json``: the fidelity report without the per-row probabilities."""
    path = Path(merged_dir) / "fidelity.json"
    saved = {k: v for k, v in report.items() if k != "probs"}
    path.write_text(json.dumps(saved, indent=2), encoding="utf-8")
    return path


def report_table(report: dict[str, Any]) -> pd.DataFrame:
    """One row per model (ensemble, exact merge, naive merge): log loss, KL to the ensemble, agreement; then
    the exact merge's KL to the ensemble for each storage dtype scored."""
    rows = []
    for name, label in (("ensemble", "k-fold ensemble (mean of probabilities)"), ("exact", "exact merge"),
                        ("naive", "naive A/B average")):
        rows.append({"model": label, "log_loss": report.get(f"log_loss_{name}"),
                     "kl_from_ensemble": report.get(f"kl_ensemble_{name}", 0.0),
                     "argmax_agreement": report.get(f"argmax_agreement_{name}", 1.0)})
    for storage in ("fp32", "fp16", "bf16"):
        if f"kl_ensemble_exact_{storage}" in report:
            rows.append({"model": f"exact merge stored {storage}, run in {report.get('dtype', 'float32')}",
                         "log_loss": None, "kl_from_ensemble": report[f"kl_ensemble_exact_{storage}"],
                         "argmax_agreement": None})
    table = pd.DataFrame(rows)
    table.attrs["naive_weight_error"] = report["naive_weight_error"]
    return table


def plot_report(report: dict[str, Any]) -> Any:
    """P(A) of each merge against the ensemble's, one point per row (on the diagonal = faithful)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    axes = fig.subplots(1, 2, sharey=True)
    ens = report["probs"]["ensemble"]
    for ax, name in zip(axes, ("exact", "naive")):
        ax.scatter(ens[:, 0], report["probs"][name][:, 0], s=8, alpha=0.6)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{name} merge: KL {report[f'kl_ensemble_{name}']:.2e}")
        ax.set_xlabel("ensemble P(A wins)")
    axes[0].set_ylabel("merged model P(A wins)")
    fig.tight_layout()
    return fig


def _identity(base_dir: Path) -> Any:
    from .zoo import model_identity

    return model_identity(str(base_dir))


def _finished_folds(root: Path, run_dir: Path) -> list[Path]:
    """Every fold of the run (``data/folds.parquet``) trained to its end (``metrics.json``): a fold still
    training, or missing, is an error — its adapter would be a half-trained or absent member of the merge."""
    k = int(pd.read_parquet(run_dir / "data" / "folds.parquet")["fold"].max()) + 1
    unfinished = [f for f in range(k) if not (root / f"fold{f}" / "metrics.json").is_file()]
    if unfinished:
        raise ValueError(f"{root}: folds {unfinished} of {k} are not finished (no metrics.json): train them, or "
                         "gather them from the machines that did, before merging")
    adapters = [root / f"fold{f}" / "adapter" for f in range(k)]
    plain = [a.parent.name for a in adapters if not (a / "adapter_model.safetensors").is_file()]
    if plain:
        raise ValueError(f"{root}: {plain} hold no LoRA adapter (adapter/adapter_model.safetensors): full fine-tuning "
                         "folds (lora_r = 0) are whole checkpoints, which this merge does not average")
    return adapters


def fold_base(root: str | Path) -> str:
    """The base a model's folds were trained from, found in its own folder: the post-pretrained checkpoint
    (``<root>/pretrained/merged``) when the folds started from it, else the model as named at launch (the
    saved stage config's ``model_dir_given``: a hub id, ``zoo:…`` or a folder)."""
    root = Path(root)
    if (root / "pretrained" / "merged" / "config.json").is_file():
        return str(root / "pretrained" / "merged")
    from .contract import STAGE_CONFIGS

    for name in STAGE_CONFIGS:
        saved = root / name
        if saved.is_file():
            given = json.loads(saved.read_text(encoding="utf-8")).get("model_dir_given")
            if given:
                return given
    raise FileNotFoundError(f"{root}: no saved stage config naming the base model: pass --base")


def check_base(base_dir: str | Path, adapter_dirs: Sequence[Path]) -> None:
    """The base must be the model the folds were trained from (``fit_config.json`` names it by
    ``zoo.model_identity``): merging into another one gives a silently wrong model."""
    from .zoo import model_identity

    have = model_identity(str(base_dir))
    for path in adapter_dirs:
        fit = Path(path).parent / "fit_config.json"
        if fit.is_file():
            trained = json.loads(fit.read_text(encoding="utf-8"))["model"]["model_dir"]
            if isinstance(trained, dict) and trained != have:
                raise ValueError(f"{base_dir} ({have}) is not the base {Path(path).parent.name} was trained from "
                                 f"({trained}, {fit}): pass that base")


def run(run_dir: str | Path, name: str, base: str | None = None, out_dir: str | Path | None = None,
        max_shard_bytes: int = 2 * 1024 ** 3, force: bool = False, log: Callable[[str], None] = print,
        storage: str = "fp32") -> Path:
    """The merge stage of a run folder: ``student/<name>/fold*/adapter`` (or ``teachers/<name>/…``) merged
    exactly into ``base`` (default: the base the folds were trained from, ``fold_base``) → ``out_dir`` (default
    ``<run>/merged``) with its contract, the merged weights stored in ``storage``. A finished merge of the same
    folds, base and storage is kept unless ``force``."""
    from .zoo import resolve_model_dir

    run_dir = Path(run_dir)
    roots = [r for r in (run_dir / "student" / name, run_dir / "teachers" / name) if r.is_dir()]
    if not roots:
        raise FileNotFoundError(f"{run_dir}: no student/{name} or teachers/{name}: train it first")
    from .zoo import model_identity

    adapters = _finished_folds(roots[0], run_dir)
    out = Path(out_dir) if out_dir else run_dir / "merged"
    base_dir = resolve_model_dir(base or fold_base(roots[0]))
    check_base(base_dir, adapters)
    stamp = {"adapter_sha256": [file_sha256(p / "adapter_model.safetensors") for p in adapters],
             "base": model_identity(base_dir), "storage": storage}
    done = out / "lmsys_merge.json"
    if done.is_file() and not force and json.loads(done.read_text(encoding="utf-8")).get("stamp") == stamp:
        log(f"{out}: these folds are merged onto this base already — kept (--force to merge again)")
        return out
    merge_exact(base_dir, adapters, out, max_shard_bytes=max_shard_bytes, log=log, storage=storage)
    record = json.loads(done.read_text(encoding="utf-8")) | {"stamp": stamp, "base": str(base or fold_base(roots[0]))}
    done.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return out
