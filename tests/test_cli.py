"""The `lmsys` command as users start it: a real subprocess, real files."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import nbformat
import numpy as np
import pandas as pd
import pytest

from lmsys_lib import parsing, zoo
from lmsys_lib.config import DemoConfig, to_dict
from lmsys_lib.metrics import log_loss, softmax

DEMO_MARGIN = 0.01  # how far below the uniform guess (log 3) the default demo's models must end
STAGES = ("data", "00_eda", "01_teacher_training", "02_distillation", "03_lora_merge", "04_quantization",
          "05_inference_2xT4")


def _lmsys(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmsys_lib", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_default_demo_runs_then_is_a_no_op_then_refuses_another_config(tmp_path, capsys):
    """`lmsys demo` exactly as the README starts it: the embedded default, the real SmolLM2-135M as teacher and
    as distilled student. Its stage times are printed (never asserted: they measure the machine, not the code)."""
    try:
        zoo.prepare_model("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    run = tmp_path / "demo"
    proc = _lmsys("demo", "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    times = proc.stdout[proc.stdout.index("stage times:"):].split("\ndemo finished")[0]
    with capsys.disabled():
        print(f"\n{times}")
    assert all(f"  {name}" in times for name in STAGES) and "CPU compute dtype: " in proc.stdout
    for stage in STAGES:
        assert f"[{stage}]" in proc.stdout and (run / "config" / f"{stage}.json").exists()
    for stage in STAGES[1:]:  # the executed notebooks, outputs included, are kept in the run
        executed = nbformat.read(run / "notebooks" / f"{stage}.ipynb", as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code"), stage
    for name in ("train.csv", "test.csv", "holdout.csv", "sample_submission.csv", "folds.parquet"):
        assert (run / "data" / name).exists(), name
    cfg = DemoConfig()
    teacher_name, student_name = cfg.teacher.name, cfg.student.name
    folds = pd.read_parquet(run / "data" / "folds.parquet")
    train = parsing.read_competition(run / "data" / "train.csv").frame
    assert train["id"].tolist() == folds["id"].tolist()
    assert (run / "eda.md").exists() and (run / "tokenizer" / "tokenizer.json").exists()
    saved = json.loads((run / "config" / "01_teacher_training.json").read_text())
    assert saved["config"]["model"]["model_dir"] == cfg.teacher.model.model_dir  # "zoo:…": the config stays portable
    fit = json.loads((run / "teachers" / teacher_name / "fold0" / "fit_config.json").read_text())
    assert fit["model"]["model_dir"] == {"name": cfg.teacher.model.model_dir}  # resolved from zoo:…, recorded portably
    assert f"[01_teacher_training] teacher {teacher_name}: held-out log loss fold0" in proc.stdout
    assert json.loads((run / "config" / "inputs" / "01_teacher_training.json").read_text())["name"] == teacher_name

    # every row has one out-of-fold logit from each model, and both learned: visibly below the uniform guess
    # (measured 2026-12-01 on 2 AVX2 cores: teacher 1.0699, student 1.0674, i.e. 0.029 and 0.031 below;
    # another CPU rounds differently, hence the smaller margin; bench/RESULTS.md)
    for root in (f"teachers/{teacher_name}", f"student/{student_name}"):
        oof = pd.read_parquet(run / root / "oof.parquet")
        assert sorted(oof["id"]) == sorted(train["id"]) and oof["id"].is_unique and set(oof["fold"]) == {0, 1}
        logits = oof.set_index("id").loc[train["id"], ["logit_a", "logit_b", "logit_tie"]].to_numpy()
        assert log_loss(train["label"].to_numpy(), softmax(logits)) < np.log(3) - DEMO_MARGIN, root

    report = (run / "report.md").read_text()  # 01–04 each evaluated their model; the demo gathered them
    for section in (f"## {teacher_name} (out of fold)", f"## {student_name} (out of fold)",
                    "## merged student (holdout)", "## GPTQ 8-bit student (holdout)"):
        assert section in report, section
    assert "](quantized/plots/reliability.png)" in report and (run / "quantized" / "plots" / "reliability.png").exists()
    fitted = json.loads((run / "student" / student_name / "temperature.json").read_text())
    assert json.loads((run / "quantized" / "temperature.json").read_text()) == fitted  # carried by merge, quantize
    holdout = parsing.read_competition(run / "data" / "holdout.csv").frame
    assert len(holdout) == cfg.holdout_rows and not set(holdout["id"]) & set(train["id"])
    fidelity = json.loads((run / "merged" / "fidelity.json").read_text())
    assert fidelity["rows"] == cfg.holdout_rows and fidelity["naive_weight_error"]["relative_frobenius"] > 0
    quantised = json.loads((run / "quantized" / "fidelity.json").read_text())  # passed the default thresholds
    assert quantised["kl_mean"] <= 1e-3 and quantised["argmax_agreement"] >= 0.98
    assert quantised["kernel"] == "gptq_torch" and quantised["rows"] == cfg.holdout_rows
    submission = pd.read_csv(run / "submission.csv")
    test = parsing.read_competition(run / "data" / "test.csv").frame
    assert submission["id"].tolist() == test["id"].tolist()
    assert parsing.validate_file(run / "submission.csv", test_path=run / "data" / "test.csv").ok
    from conftest import REAL_SAMPLE  # the demo's quantised student on the real competition rows

    if (REAL_SAMPLE / "test.csv").exists():
        out = tmp_path / "real" / "submission.csv"
        proc = _lmsys("predict", "--model", str(run / "quantized"), "--data", str(REAL_SAMPLE / "test.csv"),
                      "--out", str(out), "--max-length", "128", "--priors-from", str(run / "data" / "train.csv"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert parsing.validate_file(out, test_path=REAL_SAMPLE / "test.csv").ok

    again = _lmsys("demo", "--run-dir", str(run))
    assert again.returncode == 0 and again.stdout.count("already done") == len(STAGES)
    (run / "eda.md").unlink()  # a finished stage whose output went missing runs again
    healed = _lmsys("demo", "--run-dir", str(run))
    assert healed.returncode == 0 and "[00_eda] outputs missing" in healed.stdout and (run / "eda.md").exists()

    other = to_dict(cfg)
    other["teacher"]["pack"]["max_length"] += 32
    (tmp_path / "cfg.json").write_text(json.dumps(other))
    clash = _lmsys("demo", "--run-dir", str(run), "--config", str(tmp_path / "cfg.json"))
    assert clash.returncode == 2 and "another config for stage '01_teacher_training'" in clash.stderr
    assert "Traceback" not in clash.stderr


def test_demo_config_with_unknown_key_is_refused(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"synth": {"rows": 3}}))
    proc = _lmsys("demo", "--run-dir", str(tmp_path / "r"), "--config", str(cfg))
    assert proc.returncode == 2 and "unknown key(s) ['rows']" in proc.stderr


def test_synth_pack_eda_commands(tmp_path, tokenizer):
    assert _lmsys("synth", "--out", str(tmp_path / "d"), "--rows", "120", "--test-rows", "10").returncode == 0
    tokenizer.save_pretrained(tmp_path / "tok")
    proc = _lmsys("pack", "--data", str(tmp_path / "d" / "train.csv"), "--tokenizer", str(tmp_path / "tok"),
                  "--max-length", "200", "--swap", "--out", str(tmp_path / "p.parquet"))
    assert proc.returncode == 0, proc.stderr
    packed = pd.read_parquet(tmp_path / "p.parquet")
    assert len(packed) == 120 and packed["n_tokens"].max() <= 200
    proc = _lmsys("eda", "--data", str(tmp_path / "d" / "train.csv"), "--tokenizer", str(tmp_path / "tok"),
                  "--out", str(tmp_path / "eda"))
    assert proc.returncode == 0 and (tmp_path / "eda" / "eda.md").exists()


def test_console_script_and_module_entry_points():
    proc = subprocess.run(["lmsys", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "validate" in proc.stdout and "demo" in proc.stdout
    assert _lmsys("--help").returncode == 0


def test_every_command_has_examples_and_every_option_help():
    """`--help` of each command ends with real examples, every option and argument says what it is, and each
    example parses with the real parser (a renamed flag cannot leave a stale example behind)."""
    import shlex

    from lmsys_lib import cli

    parser = cli.build_parser()
    commands = cli._all_commands(parser)
    assert set(commands) == set(cli.EXAMPLES), "one examples entry per command"
    for name, command in commands.items():
        silent = [a.dest for a in command._actions if not a.help and a.dest != "help"
                  and not isinstance(a, argparse._SubParsersAction)]
        assert not silent, f"lmsys {name}: options without help text: {silent}"
        text = command.format_help()
        assert text.rstrip().splitlines()[-1].startswith("  $ lmsys") or "accelerate launch" in text, name
        assert command.description, f"lmsys {name}: --help says what the command does"
        for example in cli.EXAMPLES[name]:
            argv = shlex.split(example.split(" -m lmsys_lib ")[-1] if " -m lmsys_lib " in example else example)
            argv = argv[1:] if argv[0] == "lmsys" else argv
            if argv[0] != name.split()[0]:  # accelerate launch … -m lmsys_lib teacher …: the part after -m
                argv = argv[argv.index(name.split()[0]):]
            parser.parse_args(argv)  # raises SystemExit on a stale flag


def test_version_and_debug_traceback(tmp_path, monkeypatch):
    from lmsys_lib import __version__

    proc = _lmsys("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"lmsys {__version__}"
    quiet = _lmsys("plan", "--recipe", str(tmp_path / "nope"))
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    line = [x for x in quiet.stderr.splitlines() if x.startswith("lmsys plan: error")]
    assert len(line) == 1 and "recipe.json" in line[0] and "--debug" in line[0]
    for argv, env in ((("--debug", "plan"), {}), (("plan", "--debug"), {}), (("plan",), {"LMSYS_DEBUG": "1"})):
        monkeypatch.setenv("LMSYS_DEBUG", env.get("LMSYS_DEBUG", ""))
        loud = _lmsys(*argv, "--recipe", str(tmp_path / "nope"))
        assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr, argv
        assert "lmsys plan: error: FileNotFoundError" in loud.stderr
