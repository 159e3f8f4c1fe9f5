"""Fine-tune→quantise vs quantise→fine-tune: 16-bit LoRA → merge → GPTQ-8 against QLoRA on an nf4 base.

Same model, same synthetic rows, same LoRA and schedule (``lmsys_lib.orders.compare_orders``). Printed: held-out
log loss, size on disk of what inference reads, memory, load time, rows/s and preparation time of each, with
ratios against the 16-bit merged model measured in the same run (the baseline). Nothing is asserted.

    python bench/bench_quantize.py --model tiny            # toy scale, the size CI runs (~20 s)
    python bench/bench_quantize.py --model smollm2-135m    # the real pretrained SmolLM2-135M (~10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

from lmsys_lib import modeling, orders, parsing, synthetic, zoo
from lmsys_lib.config import ModelConfig, PackConfig, QuantizeConfig, SynthConfig, TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (a random tiny Llama) or a zoo name (smollm2-135m)")
    parser.add_argument("--rows", type=int, default=600, help="train rows (15 %% of them pick the best step)")
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--bits", type=int, default=8, choices=(4, 8))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work-dir", help="keep the artefacts here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        paths = synthetic.write(SynthConfig(n_train=args.rows + args.test_rows, n_test=1, seed=21), work / "data")
        rows = parsing.read_competition(paths["train"]).frame
        train, test = rows.iloc[:args.rows], rows.iloc[args.rows:]
        if args.model == "tiny":
            tok = zoo.train_bpe_tokenizer(zoo.conversation_texts(train), vocab_size=1500, add_bos=True)
            model_dir = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tok), work / "base")
            model_cfg = ModelConfig(lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                    head_init="model")
            train_cfg = TrainConfig(epochs=args.epochs, batch_size=16, grad_accum=1, lr=2e-3, eval_every=10,
                                    checkpoint_every=0)
            group = 32
        else:
            model_dir = zoo.prepare_model(args.model)
            model_cfg = ModelConfig(lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0)
            train_cfg = TrainConfig(epochs=args.epochs, batch_size=8, grad_accum=1, lr=1e-4, head_lr=3e-4,
                                    warmup_ratio=0.1, eval_every=15, checkpoint_every=0)
            group = 64  # SmolLM2's widths (576, 1536) are multiples of 64, not 128
        quant = QuantizeConfig(bits=args.bits, group_size=group, calib_rows=64, calib_max_length=args.max_length)
        start = time.perf_counter()
        table = orders.compare_orders(model_dir, train, test, model_cfg, train_cfg,
                                      PackConfig(max_length=args.max_length), quant, work / "orders",
                                      device=args.device, log=lambda _: None)
        seconds = time.perf_counter() - start

    base = table.iloc[0]
    table["log_loss_vs_16bit"] = table["log_loss"] - base["log_loss"]
    table["disk_ratio"] = table["disk_mib"] / base["disk_mib"]
    table["memory_ratio"] = table["memory_mib"] / base["memory_mib"]
    table["speed_ratio"] = table["rows_per_s"] / base["rows_per_s"]
    print(f"# fine-tune→quantise vs QLoRA — model {args.model}, {table.attrs['train_rows']} train + "
          f"{table.attrs['eval_rows']} eval rows, {table.attrs['test_rows']} held-out rows, max_length "
          f"{args.max_length}, LoRA r={args.lora_r}, {args.epochs:g} epoch(s), GPTQ {args.bits}-bit group {group}; "
          f"{table.attrs['device']} {table.attrs['dtype']}, {platform.processor() or platform.machine()}; "
          f"{seconds:.0f} s in all")
    print(table.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else table.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
