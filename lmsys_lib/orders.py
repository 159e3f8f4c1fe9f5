"""Fine-tune→quantise vs quantise→fine-tune, measured on the same data (notebook 04's second section).

The two orders, trained with the same model, data, LoRA and schedule:

- ``lora16 → merge → GPTQ``: LoRA on the 16-bit base, merged exactly into it (``merge.merge_exact``),
  then GPTQ-quantised (``quantize.quantize``, 8-bit by default) — the first-place order;
- ``QLoRA nf4 (unmerged)``: LoRA trained on a bitsandbytes nf4 4-bit base and kept as an adapter on that
  4-bit base at inference (merging it into 4-bit weights is not exact).

Reported side by side on held-out rows: log loss, size on disk of what inference reads (the GPTQ folder;
for QLoRA the 16-bit base it quantises on load plus the adapter), memory footprint, load time, rows/s and
the preparation time (training, merging, quantising). The 16-bit merged model is reported too, so the cost
of quantisation itself is visible. Speeds measured on a CPU rank the kernels differently than a GPU does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import merge, quantize
from .config import ModelConfig, PackConfig, QuantizeConfig, TrainConfig


def compare_orders(model_dir: str | Path, train_frame: pd.DataFrame, test_frame: pd.DataFrame,
                   model_cfg: ModelConfig, train_cfg: TrainConfig, pack_cfg: PackConfig,
                   quant_cfg: QuantizeConfig, work_dir: str | Path, eval_share: float = 0.15, device: Any = "cpu",
                   log: Callable[[str], None] = print) -> pd.DataFrame:
    """Train both orders on ``train_frame`` (``eval_share`` of it held out to pick the best step), score
    them on ``test_frame`` (labelled, unseen); returns one row per model. ``work_dir`` keeps every artefact."""
    from accelerate import Accelerator

    from .modeling import compute_dtype, load_tokenizer
    from .prompting import Packer
    from .train import fit, pack_for_training

    work = Path(work_dir)
    model_dir = str(model_dir)
    device = quantize.resolve_device(device)
    if "label" not in test_frame.columns:
        raise ValueError("test_frame needs labels (a held-out labelled split)")
    tokenizer = load_tokenizer(model_dir)
    data = pack_for_training(Packer(tokenizer, pack_cfg), train_frame)
    held = np.random.default_rng(train_cfg.seed).random(len(train_frame)) < eval_share
    train, evaluation = data.subset(~held), data.subset(held)
    test_ids = list(Packer(tokenizer, pack_cfg).pack_frame(test_frame)["input_ids"])
    labels = test_frame["label"].to_numpy()
    accelerator = Accelerator(cpu=device.type == "cpu")
    rows = []

    base_cfg = dataclasses.replace(model_cfg, model_dir=model_dir, quantization="none")
    start = time.perf_counter()
    fit(base_cfg, train_cfg, train, evaluation, work / "lora16", accelerator=accelerator, progress=False, log=log)
    # GPTQ quantises from the fp32 merge (the pipeline's own input); the unquantised row is the merge stored
    # as its 16-bit base, the model one would otherwise ship, with that size on disk
    merged32 = merge.merge_exact(model_dir, [work / "lora16" / "adapter"], work / "merged32", log=log)
    merged = merge.merge_exact(model_dir, [work / "lora16" / "adapter"], work / "merged16", log=log, storage="base")
    prep16 = time.perf_counter() - start
    start = time.perf_counter()
    calib, summary = quantize.calibration_set(train_frame[~held], tokenizer, quant_cfg, pack_cfg)
    quantized = quantize.quantize(merged32, work / "gptq", calib, quant_cfg, device=device, calib_summary=summary,
                                  log=log)
    prep_q = prep16 + time.perf_counter() - start
    dtype = compute_dtype(device, quant_cfg.dtype, log)

    start = time.perf_counter()
    model16 = quantize.load_reference(merged, device, dtype)
    rows.append(_score("16-bit LoRA → merge (not quantised)", model16, test_ids, labels, tokenizer, device,
                       quantize.folder_bytes(merged), time.perf_counter() - start, prep16))
    del model16
    model_q, _, info = quantize.load_quantized(quantized, device, log=log, dtype=quant_cfg.dtype)
    rows.append(_score(f"16-bit LoRA → merge → GPTQ-{quant_cfg.bits}", model_q, test_ids, labels, tokenizer, device,
                       quantize.folder_bytes(quantized), info["load_seconds"], prep_q))
    del model_q

    nf4_cfg = dataclasses.replace(model_cfg, model_dir=model_dir, quantization="nf4")
    start = time.perf_counter()
    fit(nf4_cfg, train_cfg, train, evaluation, work / "qlora", accelerator=accelerator, progress=False, log=log)
    prep_nf4 = time.perf_counter() - start
    start = time.perf_counter()
    model_nf4 = _qlora_model(model_dir, work / "qlora" / "adapter", tokenizer, device, dtype)
    rows.append(_score("QLoRA on nf4 base (adapter unmerged)", model_nf4, test_ids, labels, tokenizer, device,
                       quantize.folder_bytes(model_dir) + quantize.folder_bytes(work / "qlora" / "adapter"),
                       time.perf_counter() - start, prep_nf4))
    accelerator.end_training()
    table = pd.DataFrame(rows)
    table.attrs.update({"train_rows": int((~held).sum()), "eval_rows": int(held.sum()), "test_rows": len(test_ids),
                        "bits": quant_cfg.bits, "group_size": quant_cfg.group_size, "dtype": str(dtype),
                        "device": str(device)})
    log(table.to_string(index=False))
    return table


def _qlora_model(model_dir: str, adapter: Path, tokenizer: Any, device: Any, dtype: Any) -> Any:
    """The nf4 base (quantised on load from its 16-bit weights) with the trained adapter on top."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .modeling import NUM_LABELS, attention_for, nf4_config, set_pad

    device = torch.device(device)
    placement = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=NUM_LABELS, dtype=dtype, quantization_config=nf4_config(dtype), device_map=placement,
        attn_implementation=attention_for(AutoConfig.from_pretrained(model_dir), "auto"))
    set_pad(base, tokenizer)
    return PeftModel.from_pretrained(base, adapter).eval()


def _score(name: str, model: Any, ids: list[Any], labels: np.ndarray, tokenizer: Any, device: Any,
           disk_bytes: int, load_s: float, prep_s: float) -> dict[str, Any]:
    from .metrics import log_loss, softmax
    from .modeling import predict_logits

    predict_logits(model, ids[:2], tokenizer.pad_token_id, 8, device)  # warm-up (kernel selection, caches)
    start = time.perf_counter()
    probs = softmax(predict_logits(model, ids, tokenizer.pad_token_id, 8, device))
    seconds = time.perf_counter() - start
    return {"order": name, "log_loss": log_loss(labels, probs), "disk_mib": disk_bytes / 2**20,
            "memory_mib": model.get_memory_footprint() / 2**20, "load_s": load_s, "rows_per_s": len(ids) / seconds,
            "prepare_s": prep_s}
