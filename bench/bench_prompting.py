"""Packing speed and budget fidelity: our id-level packer vs the decode-and-re-tokenise approach.

Both sides pack the same synthetic rows at the same max length with the same fast tokenizer, in the same
run, with batched tokenizer calls:

- ours: ``Packer.pack_frame`` — each turn tokenized once, budgets enforced on ids;
- naive: tokenize each part, cut its ids to a fixed share (20/40/40 % of max_length), decode the cut ids back
  to text, join the texts with the same headers and tokenize the whole string again (what several public
  notebooks did). Re-tokenising merges across the seams differently, so rows can overrun max_length.

Prints rows/s for each and their ratio, rows over max_length, and mean ids used per row.

    python bench/bench_prompting.py [--rows 20000] [--max-length 2048] [--tokenizer smollm2|bpe]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lmsys_lib import parsing, synthetic, zoo
from lmsys_lib.config import PackConfig, SynthConfig
from lmsys_lib.prompting import Packer, batch_encoder, frame_ids


def naive_pack(tokenizer, frame, cfg: PackConfig, chunk: int = 2000, encode=None) -> list[list[int]]:
    """Decode-and-re-tokenise packing (the baseline). Returns the ids of every row, untruncated.

    ``encode``: texts → ids without special tokens; default the tokenizer's own call, as notebooks do.
    """
    encode = encode or (lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"])
    prefix, suffix = frame_ids(tokenizer)
    shares = [int(cfg.max_length * f / sum(cfg.fractions)) for f in cfg.fractions]
    out: list[list[int]] = []
    for start in range(0, len(frame), chunk):
        part = frame.iloc[start: start + chunk]
        texts = [" ".join(turns) for col in ("prompt", "response_a", "response_b") for turns in part[col]]
        texts = [parsing.repair_surrogates(t)[0] for t in texts]
        ids = encode(texts)
        n = len(part)
        cut = [ids[k * n + i][: shares[k]] for i in range(n) for k in range(3)]
        decoded = tokenizer.batch_decode(cut)
        joined = [cfg.prompt_header + decoded[3 * i] + cfg.a_header + decoded[3 * i + 1] + cfg.b_header
                  + decoded[3 * i + 2] + cfg.tail for i in range(n)]
        out += [prefix + list(x) + suffix for x in encode(joined)]
    return out


def _time(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def load_tokenizer(name: str, frame):
    if name == "smollm2":
        return zoo.smollm2_tokenizer()
    return zoo.train_bpe_tokenizer(zoo.conversation_texts(frame.iloc[:3000]), vocab_size=8000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--tokenizer", choices=("smollm2", "bpe"), default="smollm2")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic.write(SynthConfig(n_train=args.rows, n_test=1, seed=0), Path(tmp))
        frame = parsing.read_competition(paths["train"]).frame
    tokenizer = load_tokenizer(args.tokenizer, frame)
    cfg = PackConfig(max_length=args.max_length)
    packer = Packer(tokenizer, cfg)

    ours, t_ours = _time(lambda: packer.pack_frame(frame))
    naive, t_naive = _time(lambda: naive_pack(tokenizer, frame, cfg))
    naive_fast, t_naive_fast = _time(lambda: naive_pack(tokenizer, frame, cfg, encode=batch_encoder(tokenizer)))
    assert naive_fast == naive  # same ids, only the tokenizer call differs
    naive_len = np.array([len(x) for x in naive])
    rows, limit = len(frame), args.max_length
    print(f"tokenizer: {args.tokenizer} ({type(tokenizer).__name__}, {len(tokenizer)} tokens); "
          f"{rows} synthetic rows; max_length {limit}")
    print(f"{'packer':<44}{'rows/s':>8}{'rows > max_length':>19}{'mean ids/row':>14}")
    lines = [("ours (ids only, water-filled budgets)", t_ours, ours["n_tokens"].to_numpy()),
             ("naive decode + re-encode (tokenizer call)", t_naive, naive_len),
             ("naive decode + re-encode (Rust backend)", t_naive_fast, naive_len)]
    for name, seconds, lengths in lines:
        print(f"{name:<44}{rows / seconds:>8.0f}{int((lengths > limit).sum()):>19}{lengths.mean():>14.1f}")
    print(f"speed-up ours / naive: {t_naive / t_ours:.2f}x (same tokenizer backend: {t_naive_fast / t_ours:.2f}x); "
          f"longest row: naive {naive_len.max()} ids, ours {ours['n_tokens'].max()} (limit {limit})")


if __name__ == "__main__":
    main()
