"""Does the default demo learn? Its teacher and distilled student against a labels-only student and the guesses.

Runs (or reuses) the default ``lmsys demo`` in ``--run-dir`` — the embedded default data, the real SmolLM2-135M
as teacher and as distilled student, exactly as ``lmsys demo`` trains them — then trains the same student the
same way on the same folds from the hard labels only (``<student>-labels-only``: the demo's student config with
no teachers). Printed: out-of-fold log loss and accuracy of the three (every train row scored by the fold
model that did not see it), the uniform guess (log 3) and the label-frequency prior (the train rows' own
label mix: the best constant guess), and the distilled − labels-only difference. Nothing is asserted.

Every step is guarded like the demo's stages: a finished demo or labels-only student in ``--run-dir`` is reused,
so ``--run-dir`` may point at a demo that has already run (its labels-only student is then the only cost).

    python bench/bench_demo_learning.py [--run-dir runs/demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import numpy as np

from lmsys_lib import demo, distill, teacher
from lmsys_lib.config import DemoConfig
from lmsys_lib.metrics import log_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/demo", help="the demo's run folder (default: runs/demo)")
    args = parser.parse_args()
    run, cfg = Path(args.run_dir).resolve(), DemoConfig()
    timings = {}
    start = time.perf_counter()
    demo.run(run, cfg, log=lambda line: print(line, flush=True))
    timings["demo (all stages; 0 if reused)"] = time.perf_counter() - start
    baseline = dataclasses.replace(cfg.student, name=f"{cfg.student.name}-labels-only", teachers=(),
                                   teacher_weights=())
    start = time.perf_counter()
    distill.run(run, baseline, log=lambda _: None)
    timings["labels-only student"] = time.perf_counter() - start

    table = distill.comparison(run, [cfg.teacher.name], [cfg.student.name, baseline.name])
    frame, _ = teacher.load_split(run)
    labels = frame["label"].to_numpy()
    prior = np.bincount(labels, minlength=3) / len(labels)
    table.loc[len(table)] = {"model": "label-frequency prior", "role": "reference",
                             "oof_log_loss": log_loss(labels, np.tile(prior, (len(labels), 1))), "oof_accuracy": np.nan}
    print(f"# the default demo — {len(frame)} train rows, {cfg.folds.k} grouped folds; teacher {cfg.teacher.model.model_dir} "
          f"(LoRA r = {cfg.teacher.model.lora_r}, lr {cfg.teacher.train.lr:g}, head lr {cfg.teacher.train.head_lr:g}, "
          f"{cfg.teacher.train.epochs:g} epochs, {cfg.teacher.pack.max_length} tokens); student "
          f"{cfg.student.model.model_dir} (LoRA r = {cfg.student.model.lora_r}, lr {cfg.student.train.lr:g}, head lr "
          f"{cfg.student.train.head_lr:g}, {cfg.student.train.epochs:g} epochs, {cfg.student.pack.max_length} tokens, "
          f"loss {cfg.student.loss}, T = {cfg.student.temperature:g}, ce_weight {cfg.student.ce_weight:g}); "
          f"CPU {platform.processor() or platform.machine()}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    ll = table.set_index("model")["oof_log_loss"]
    print(f"distilled − labels-only: {ll[cfg.student.name] - ll[baseline.name]:+.4f} log loss "
          "(negative: distillation helped)")
    print(f"below the uniform guess: teacher {np.log(3) - ll[cfg.teacher.name]:+.4f}, student "
          f"{np.log(3) - ll[cfg.student.name]:+.4f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
