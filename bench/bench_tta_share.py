"""Anytime TTA: out-of-fold log loss against the share of rows given the swapped pass, and which ranking to use.

On a finished demo run (``lmsys demo``; reused, or run first), each student fold model scores its own held-out
rows through the inference kernel (``inference.score``) once as given and once with A and B swapped — every
train row is scored by the one fold model that did not see it. The kernel's anytime TTA gives the swapped
pass to the most uncertain rows first; here the same rule (``inference.uncertainty`` on the first pass) picks
the top 0 / 33 / 66 / 100 % of the rows, and those rows get the mean of their two passes — exactly what the
kernel computes when its time runs out after that share. Rankings compared: entropy, margin (the gap between
the two likeliest classes), and random order (the mean of 20 draws) as the baseline.

    python bench/bench_tta_share.py [--run-dir runs/demo]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lmsys_lib import demo, inference, parsing
from lmsys_lib.config import DemoConfig, InferenceConfig
from lmsys_lib.metrics import log_loss

SHARES = (0.0, 1 / 3, 2 / 3, 1.0)


def fold_passes(run: Path, cfg: DemoConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, first-pass probabilities, swapped-pass probabilities un-permuted) of every train row, each from
    the student fold model that held it out."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lmsys_lib.modeling import NUM_LABELS, cpu_dtype, load_tokenizer, set_pad
    from lmsys_lib.teacher import load_split
    from lmsys_lib.zoo import resolve_model_dir

    base_dir = resolve_model_dir(cfg.student.model.model_dir)
    tokenizer = load_tokenizer(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=NUM_LABELS, dtype=cpu_dtype())
    set_pad(base, tokenizer)
    frame, fold_of = load_split(run)
    icfg = InferenceConfig(pack=cfg.student.pack, token_budget=cfg.inference.token_budget, rule_priors=False,
                           tta=False, degrade_max_length=cfg.student.pack.max_length, time_budget_s=1e9)
    labels, first, swapped = [], [], []
    root = run / "student" / cfg.student.name
    model = None
    for fold in range(int(fold_of.max()) + 1):
        adapter = root / f"fold{fold}" / "adapter"
        if model is None:
            model = PeftModel.from_pretrained(base, adapter, adapter_name="f0")
        else:
            model.load_adapter(adapter, adapter_name=f"f{fold}")
            model.set_adapter(f"f{fold}")
        model.eval()
        rows = frame[fold_of == fold].reset_index(drop=True)
        with torch.no_grad():
            p1, _ = inference.score(model, tokenizer, rows, icfg, log=lambda _: None, progress=False)
            p2, _ = inference.score(model, tokenizer, parsing.swap_frame(rows), icfg, log=lambda _: None,
                                    progress=False)
        labels.append(rows["label"].to_numpy())
        first.append(p1)
        swapped.append(parsing.swap_probs(p2))
        print(f"fold {fold}: {len(rows)} held-out rows scored in both orientations", flush=True)
    return np.concatenate(labels), np.concatenate(first), np.concatenate(swapped)


def share_table(labels: np.ndarray, first: np.ndarray, swapped: np.ndarray, draws: int = 20) -> pd.DataFrame:
    n = len(labels)
    both = (first + swapped) / 2
    orders = {rank: np.argsort(-inference.uncertainty(first, rank), kind="stable") for rank in inference.TTA_RANKS}
    rng = np.random.default_rng(0)
    randoms = [rng.permutation(n) for _ in range(draws)]
    def with_tta(order: np.ndarray, k: int) -> float:
        probs = first.copy()
        probs[order[:k]] = both[order[:k]]
        return log_loss(labels, probs)

    rows = []
    for share in SHARES:
        k = int(round(share * n))
        rows.append({"TTA share": f"{100 * share:.0f} %", "rows with TTA": k,
                     **{rank: with_tta(order, k) for rank, order in orders.items()},
                     "random": float(np.mean([with_tta(order, k) for order in randoms]))})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/demo", help="the demo's run folder (default: runs/demo)")
    args = parser.parse_args()
    run, cfg = Path(args.run_dir).resolve(), DemoConfig()
    start = time.perf_counter()
    if not (run / "student" / cfg.student.name / "oof.parquet").exists():  # the student's folds are what is needed
        demo.run(run, cfg, log=lambda line: print(line, flush=True))
    labels, first, swapped = fold_passes(run, cfg)
    table = share_table(labels, first, swapped)
    print(f"\n{platform.processor() or platform.machine()} · demo student {cfg.student.name}, {len(labels)} "
          f"out-of-fold rows · log loss by TTA share and ranking (lower is better)")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    gain = table.iloc[-1]["entropy"] - table.iloc[0]["entropy"]
    print(f"full TTA vs none: {gain:+.4f}; seconds {time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    main()
