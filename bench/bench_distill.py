"""Does distillation help? Teacher, distilled student and labels-only student on the same folds, same run.

On the synthetic data (the embedded default's generator): a teacher (tiny Llama, trained in full) is
trained on k grouped folds and writes its out-of-fold logits; then the same smaller student is trained
twice on the same folds — once distilled from the teacher's OOF logits (``DistillConfig.loss``), once on the
hard labels only. Printed: out-of-fold log loss and accuracy of the three (every train row scored by the fold
model that did not see it), and the students' difference. Nothing is asserted: this reports what it measures.

Both models are trained from scratch (random init) so the run fits a CPU; the real-model numbers of the
demo (SmolLM2-135M → SmolLM2-135M) are in ``runs/demo`` after ``lmsys demo``.

    python bench/bench_distill.py [--rows 2000] [--folds 3] [--max-length 192] [--loss kl] [--temperature 2]
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

from lmsys_lib import demo, distill, modeling, parsing, teacher, zoo
from lmsys_lib.config import (
    DistillConfig,
    FoldConfig,
    ModelConfig,
    PackConfig,
    SynthConfig,
    TeacherConfig,
    TrainConfig,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--loss", choices=("kl", "winner"), default="kl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--run-dir", help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run_dir or tmp)
        demo.stage_data(run, SynthConfig(n_train=args.rows, n_test=10, seed=11))
        demo.stage_folds(run, FoldConfig(k=args.folds, seed=0))
        frame = parsing.read_competition(run / "data" / "train.csv").frame
        tok = zoo.demo_tokenizer(run / "tokenizer", frame)
        sizes = {"teacher": {"hidden": 128, "intermediate": 256, "layers": 2},
                 "student": {"hidden": 64, "intermediate": 128, "layers": 2}}
        dirs = {k: modeling.save_tiny_checkpoint("llama", copy.deepcopy(tok), run / "models" / k, **v)
                for k, v in sizes.items()}
        train_cfg = TrainConfig(epochs=args.epochs, batch_size=16, grad_accum=1, lr=1e-3, eval_every=25,
                                checkpoint_every=0, warmup_ratio=0.05, weight_decay=0.1)
        pack = PackConfig(max_length=args.max_length)

        def model(kind: str) -> ModelConfig:
            return ModelConfig(model_dir=str(dirs[kind]), lora_r=0, head_init="model")

        timings = {}
        start = time.perf_counter()
        teacher.run(run, TeacherConfig(name="teacher", model=model("teacher"), train=train_cfg, pack=pack),
                    log=lambda _: None)
        timings["teacher"] = time.perf_counter() - start
        for name, teachers in (("distilled", ("teacher",)), ("labels-only", ())):
            start = time.perf_counter()
            distill.run(run, DistillConfig(name=name, model=model("student"), train=train_cfg, pack=pack,
                                           teachers=teachers, loss=args.loss, temperature=args.temperature,
                                           ce_weight=args.ce_weight), log=lambda _: None)
            timings[name] = time.perf_counter() - start
        table = distill.comparison(run, ["teacher"], ["distilled", "labels-only"])

    print(f"# distillation on the synthetic data — {args.rows} rows, {args.folds} grouped folds, "
          f"max_length {args.max_length}, {args.epochs:g} epochs; CPU {platform.processor() or platform.machine()}")
    print(f"teacher: tiny Llama {sizes['teacher']}; students: tiny Llama {sizes['student']}, all trained in full "
          f"from random init; distillation loss {args.loss}, T = {args.temperature:g}, ce_weight {args.ce_weight:g}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    ll = table.set_index("model")["oof_log_loss"]
    print(f"distilled − labels-only: {ll['distilled'] - ll['labels-only']:+.4f} log loss (negative: distillation helped)")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
