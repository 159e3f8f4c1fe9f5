"""One LoRA training step of a Gemma-2-9B-shaped classifier per precision, as the training loop runs it:
tokens/s and peak GPU memory, against the naive way (16-bit master weights, no autocast) in the same run.

The model is built from the shipped Gemma-2-9B config (``lmsys_lib/architectures``) with random weights
straight on the GPU (no download), LoRA r 64 / α 128 on every linear, gradient checkpointing, the attention
``modeling.attention_for`` picks there; then ``modeling.upcast_trainable`` (fp32 masters) and
``train.Precision`` (autocast, and a GradScaler for fp16) — the code paths ``train.fit`` uses.

    python bench/gpu_check.py                 # on a GPU: the table (and $OUT/gpu_check.json when $OUT is set)
    python bench/gpu_check.py --smoke         # anywhere: a tiny Gemma-2 on the CPU, same code, seconds

Rows: ``bf16`` (fp32 masters, bf16 autocast), ``fp16`` (fp32 masters, fp16 autocast + loss scaling),
``bf16-naive`` (everything bf16, no autocast: what training did before the masters). Ratios are against
``bf16-naive`` measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lmsys_lib import losses, modeling, train
from lmsys_lib.config import ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
GEMMA2_9B = ROOT / "lmsys_lib" / "architectures" / "google--gemma-2-9b-it.json"


def build(smoke: bool, dtype: torch.dtype, device: torch.device):
    """A Gemma-2 classifier with random weights in ``dtype`` on ``device`` (9B-shaped, or tiny)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if smoke:
        config = modeling.tiny_config("gemma2", 512)
    else:
        data = json.loads(GEMMA2_9B.read_text())
        config = AutoConfig.for_model(data.pop("model_type"), **{k: v for k, v in data.items()
                                                                if not k.startswith("_")})
        config.num_labels = modeling.NUM_LABELS
        config.pad_token_id = 0
    config._attn_implementation = modeling.attention_for(config, "auto", device)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    return model, config._attn_implementation


def step_once(model, precision, ids, labels, optimizer) -> bool:
    """One optimiser step as ``train._Loop._step`` takes it; returns whether the scaler skipped it."""
    with precision.autocast():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    loss = losses.step_loss(losses.cross_entropy_sum(logits.float(), labels), len(labels))
    precision.scale(loss).backward()
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    skipped = precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return skipped


def run(name: str, smoke: bool, device: torch.device, batch: int, length: int, steps: int) -> dict:
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-naive": torch.bfloat16}[name]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model, attention = build(smoke, compute, device)
    cfg = ModelConfig(lora_r=8 if smoke else 64, lora_alpha=16 if smoke else 128, lora_dropout=0.0,
                      gradient_checkpointing=True)
    model = modeling.attach_adapters(model, cfg)
    if name == "bf16-naive":  # the masters stay bf16 and the forward runs without autocast
        precision = train.Precision(device, torch.float32)
    else:
        modeling.upcast_trainable(model)
        precision = train.Precision.for_device(device, compute)
    optimizer = train._optimizer(model, TrainConfig(lr=1e-5))
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, length), device=device)
    labels = torch.randint(0, 3, (batch,), device=device)
    step_once(model, precision, ids, labels, optimizer)  # warm-up: kernels, allocator, optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, skipped = time.perf_counter(), 0
    for _ in range(steps):
        skipped += step_once(model, precision, ids, labels, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    trainable, total = modeling.count_parameters(model)
    result = {"precision": name, "attention": attention, "tokens_per_s": batch * length / seconds,
              "step_s": seconds, "peak_gib": peak, "skipped_steps": skipped, "trainable_m": trainable / 1e6,
              "params_b": total / 1e9, "batch": batch, "length": length}
    del model, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny Gemma-2 on the CPU (checks the script)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda:0")
    if not args.smoke and device.type != "cuda":
        raise SystemExit("no GPU here: run with --smoke to check the script on the CPU")
    length = 64 if args.smoke else args.length
    rows = [run(name, args.smoke, device, args.batch, length, args.steps) for name in ("bf16-naive", "bf16", "fp16")]
    naive = rows[0]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"{where} · torch {torch.__version__} · Gemma-2-{'tiny' if args.smoke else '9B'}-shaped, "
          f"{rows[0]['params_b']:.2f} B params, LoRA {rows[1]['trainable_m']:.1f} M trainable, "
          f"{args.batch} × {length} tokens, gradient checkpointing, attention {rows[1]['attention']}")
    print(f"{'precision':<12}{'tokens/s':>10}{'× naive':>9}{'step s':>9}{'peak GiB':>10}{'× naive':>9}{'skipped':>9}")
    for r in rows:
        print(f"{r['precision']:<12}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / naive['tokens_per_s']:>9.2f}"
              f"{r['step_s']:>9.2f}{r['peak_gib']:>10.2f}{r['peak_gib'] / naive['peak_gib']:>9.2f}{r['skipped_steps']:>9d}")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps({"device": where, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
