"""Inference kernel vs a naive loop: rows/s and pad waste on the synthetic (and the real sample's) lengths.

Ours: ``inference.predict_proba`` — rows sorted by length, batches under a token budget, each padded to
its own longest row (TTA off here so both sides do the same work; with TTA it is two passes).
Naive: rows in file order, a fixed batch of rows, every batch padded to max_length (what a first notebook
does). Same tiny model, same packed rows (both timings include packing), same run, CPU. Printed: pad waste (computed ÷ real tokens − 1),
rows/s, and the speed-up. Nothing is asserted.

    python bench/bench_inference.py [--rows 600] [--max-length 1024] [--token-budget 8192] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from lmsys_lib import batching, inference, modeling, parsing, synthetic, zoo
    from lmsys_lib.config import InferenceConfig, PackConfig, SynthConfig
    from lmsys_lib.prompting import Packer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8, help="the naive loop's rows per batch")
    parser.add_argument("--real-sample", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                     "real_sample" / "train_head_100.csv"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic.write(SynthConfig(n_train=args.rows, n_test=1, seed=31), Path(tmp) / "data")
        frame = parsing.read_competition(paths["train"]).frame
        tok = zoo.train_bpe_tokenizer(zoo.conversation_texts(frame), vocab_size=2000, add_bos=True)
        base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tok), Path(tmp) / "base", hidden=128,
                                             intermediate=256, layers=2)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3).eval()
        tok = modeling.load_tokenizer(base)
        model.config.pad_token_id = tok.pad_token_id
        pack = PackConfig(max_length=args.max_length)
        cfg = InferenceConfig(pack=pack, token_budget=args.token_budget, max_batch_rows=64, tta=False,
                              rule_priors=False, degrade_max_length=args.max_length)
        sets = {"synthetic": frame}
        real = Path(args.real_sample)
        if real.exists():
            sets["real sample"] = parsing.read_competition(real).frame
        print(f"# inference kernel vs naive loop — tiny Llama (hidden 128, 2 layers), max_length {args.max_length}, "
              f"token budget {args.token_budget}, naive batch {args.batch}; CPU {platform.machine()}, "
              f"{torch.get_num_threads()} threads, fp32")
        print(f"{'rows':>14} {'n':>5} {'mean ids':>9} | {'pad waste ours':>14} {'naive':>7} | "
              f"{'rows/s ours':>11} {'naive':>7} | speed-up")
        for name, rows in sets.items():
            ids = list(Packer(tok, pack).pack_frame(rows)["input_ids"])
            lengths = np.array([len(x) for x in ids])
            plan = batching.token_budget_batches(lengths, args.token_budget, 64)
            waste_ours = batching.pad_waste(lengths, plan)
            waste_naive = len(ids) * args.max_length / lengths.sum() - 1
            inference.predict_proba(model, tok, rows.iloc[:8], cfg, progress=False, log=lambda _: None)  # warm-up
            start = time.perf_counter()
            inference.predict_proba(model, tok, rows, cfg, progress=False, log=lambda _: None)
            ours = len(ids) / (time.perf_counter() - start)
            start = time.perf_counter()
            ids = list(Packer(tok, pack).pack_frame(rows)["input_ids"])  # the naive loop packs the rows too
            with torch.no_grad():
                for i in range(0, len(ids), args.batch):
                    chunk = ids[i:i + args.batch]
                    batch = torch.full((len(chunk), args.max_length), tok.pad_token_id)
                    mask = torch.zeros_like(batch)
                    for j, x in enumerate(chunk):
                        batch[j, :len(x)] = torch.as_tensor(x)
                        mask[j, :len(x)] = 1
                    model(input_ids=batch, attention_mask=mask)
            naive = len(ids) / (time.perf_counter() - start)
            print(f"{name:>14} {len(ids):>5} {lengths.mean():>9.0f} | {waste_ours:>14.1%} {waste_naive:>7.1%} | "
                  f"{ours:>11.1f} {naive:>7.1f} | {ours / naive:.2f}x")


if __name__ == "__main__":
    main()
