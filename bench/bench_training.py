"""Training throughput and pad waste: length-grouped batches vs random batches, same model, same run.

Packs synthetic rows (the real length distribution's shape) at ``--max-length``, then for each batching
scheme reports pad waste (computed tokens ÷ real tokens − 1, over a whole epoch) and real tokens/s of
forward + backward + AdamW steps of a tiny Llama classifier on this machine's CPU (the first ``--steps``
batches of each scheme: both are random draws from the same rows).

    python bench/bench_training.py [--rows 4000] [--max-length 1024] [--batch-size 8] [--steps 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmsys_lib import batching, losses, modeling, parsing, synthetic, zoo
from lmsys_lib.config import ModelConfig, PackConfig, SynthConfig
from lmsys_lib.prompting import Packer


def timed_steps(model, ids, labels, batches, pad_id, steps: int) -> tuple[float, int]:
    """Seconds and real tokens for ``steps`` optimiser steps over the first batches."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    real, start = 0, time.perf_counter()
    for rows in batches[:steps]:
        batch = batching.collate([ids[r] for r in rows], pad_id, labels[rows])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.step_loss(losses.cross_entropy_sum(logits, batch["labels"]), len(rows)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += int(batch["attention_mask"].sum())
    return time.perf_counter() - start, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic.write(SynthConfig(n_train=args.rows, n_test=1, seed=0), Path(tmp))
        frame = parsing.read_competition(paths["train"]).frame
        tok = zoo.train_bpe_tokenizer(zoo.conversation_texts(frame.iloc[:2000]), vocab_size=8000)
        model_dir = modeling.save_tiny_checkpoint("llama", tok, Path(tmp) / "tiny", hidden=256, layers=4,
                                                  heads=8, kv_heads=4, intermediate=512)
        model, tok = modeling.load_classifier(ModelConfig(model_dir=str(model_dir), lora_r=0))
        packed = Packer(tok, PackConfig(max_length=args.max_length)).pack_frame(frame)
    ids, labels = list(packed["input_ids"]), packed["label"].to_numpy()
    lengths = packed["n_tokens"].to_numpy()
    schemes = {"random (naive)": batching.random_batches(len(ids), args.batch_size, seed=0),
               "length-grouped (ours)": batching.length_grouped_batches(lengths, args.batch_size, seed=0)}
    print(f"{len(ids)} synthetic rows packed at max_length {args.max_length}: mean {lengths.mean():.0f} ids, "
          f"median {np.median(lengths):.0f}; tiny Llama ({modeling.count_parameters(model)[1] / 1e6:.1f}M params), "
          f"batch {args.batch_size}, {args.steps} steps, CPU threads {torch.get_num_threads()}")
    print(f"{'batching':<24}{'pad waste':>11}{'real tokens/s':>15}")
    speed = {}
    for name, batches in schemes.items():
        waste = batching.pad_waste(lengths, batches)
        seconds, real = timed_steps(model, ids, labels, batches, tok.pad_token_id, args.steps)
        speed[name] = real / seconds
        print(f"{name:<24}{waste:>10.1%}{speed[name]:>15.0f}")
    print(f"speed-up length-grouped / random: {speed['length-grouped (ours)'] / speed['random (naive)']:.2f}x")


if __name__ == "__main__":
    main()
