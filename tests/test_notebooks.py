"""Notebooks run headless (papermill, a real kernel) on the embedded default and write their artefacts."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _code_cells(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_thin(path, caplog):
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "one papermill parameters cell"
    assert all(isinstance(node, ast.Assign) for node in ast.parse(params[0].source).body), \
        "the parameters cell holds assignments only"
    assert "fraction" in params[0].source, "every notebook honours the dry-run fraction"
    logic = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.For, ast.While,
             ast.comprehension)
    for cell in (c for c in nb.cells if c.cell_type == "code" and c not in params):
        code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        found = [type(node).__name__ for node in ast.walk(ast.parse(code)) if isinstance(node, logic)]
        assert not found, f"logic belongs in lmsys_lib, not in a notebook cell: {found}"
        assert cell.source.count("\n") <= 12
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    assigned = [getattr(t, "id", None) for node in ast.parse(params[0].source).body for t in node.targets]
    assert None not in assigned, "one name per assignment: papermill reads nothing else (`k, seed = 5, 42`)"
    with caplog.at_level("WARNING", logger="papermill"):
        seen = pm.inspect_notebook(str(path))
    unparsed = [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert not unparsed, f"papermill cannot parse the parameters cell: {unparsed}"
    hidden = [name for name in assigned if name not in seen]
    assert not hidden, f"parameters papermill cannot see (one assignment per line, no '=' in the comment): {hidden}"
    silent = [name for name in assigned if not seen[name]["help"]]
    assert not silent, f"a parameter's comment is its help; these have none: {silent}"


def test_demo_passes_only_parameters_papermill_sees(tmp_path):
    """`lmsys demo` hands each notebook names its parameters cell declares (papermill would print "Passed unknown
    parameter" otherwise), and `config` to every notebook whose stage has one."""
    from lmsys_lib import demo
    from lmsys_lib.config import DemoConfig

    for stage in demo.stages(tmp_path, DemoConfig()):
        seen = pm.inspect_notebook(str(NOTEBOOKS / stage.notebook))
        passed = set(stage.params) | ({"config"} if stage.config is not None else set())
        assert passed <= set(seen), f"{stage.notebook}: unknown parameters {sorted(passed - set(seen))}"


def test_eda_notebook_runs_headless(synth_dir, tmp_path):
    out_dir = tmp_path / "eda"
    pm.execute_notebook(str(NOTEBOOKS / "00_eda.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters={"data_dir": str(synth_dir), "out_dir": str(out_dir), "fraction": 0.5},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    report = (out_dir / "eda.md").read_text()
    for section in ("## Labels", "## Token lengths", "## Outcome vs length difference", "## Special rows",
                    "## Per-model win rates"):
        assert section in report
    pngs = sorted(p.name for p in (out_dir / "plots").glob("*.png"))
    assert pngs == ["labels.png", "model_win_rates.png", "token_lengths.png", "win_rate_by_length.png"]
    assert all((out_dir / "plots" / p).stat().st_size > 5_000 for p in pngs)
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    images = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4


def test_eda_notebook_without_data_says_what_to_pass(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="no data folder given"):
        pm.execute_notebook(str(NOTEBOOKS / "00_eda.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"out_dir": str(tmp_path)}, kernel_name="python3", progress_bar=False,
                            cwd=str(tmp_path))


def test_teacher_notebook_runs_headless(tokenizer, tmp_path):
    import copy

    from lmsys_lib import modeling, synthetic
    from lmsys_lib.config import SynthConfig

    model_dir = modeling.save_tiny_checkpoint("qwen2", copy.deepcopy(tokenizer), tmp_path / "tiny-qwen2")
    data_dir = tmp_path / "data"  # 300 rows: every fold trains, is evaluated and scores its training rows
    synthetic.write(SynthConfig(n_train=300, n_test=20, seed=7), data_dir)
    run_dir = tmp_path / "run"
    pm.execute_notebook(str(NOTEBOOKS / "01_teacher_training.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters={"run_dir": str(run_dir), "data_dir": str(data_dir), "model_dir": str(model_dir),
                                    "k_folds": 3, "max_length": 128, "lora_r": 4, "lora_alpha": 8, "max_steps": 3,
                                    "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "eval_every": 0,
                                    "checkpoint_every": 0},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    oof = pd.read_parquet(run_dir / "teachers" / "teacher" / "oof.parquet")
    assert len(oof) == 300 and oof["id"].is_unique
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))

    # 02 and 03 continue the same run: distil a tiny student from the teacher's OOF logits, then merge it
    student = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "tiny-student")
    common = {"run_dir": str(run_dir), "max_length": 128}
    pm.execute_notebook(str(NOTEBOOKS / "02_distillation.ipynb"), str(tmp_path / "out02.ipynb"),
                        parameters=common | {"model_dir": str(student), "lora_r": 4, "lora_alpha": 8, "max_steps": 3,
                                             "batch_size": 8, "grad_accum": 1, "lr": 1e-3, "eval_every": 0,
                                             "checkpoint_every": 0},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    for name in ("student", "student-labels-only"):
        assert len(pd.read_parquet(run_dir / "student" / name / "oof.parquet")) == 300
    executed = nbformat.read(tmp_path / "out02.ipynb", as_version=4)
    [cell] = [c for c in executed.cells if c.source.startswith("distill.comparison")]
    comparison = cell.outputs[0]["data"]["text/plain"]
    report = (run_dir / "student" / "student" / "evaluation.md").read_text()  # the evaluation section ran
    assert "## student (out of fold)" in report and (run_dir / "student" / "student" / "temperature.json").exists()
    assert "student-labels-only" in comparison and "uniform guess" in comparison

    from lmsys_lib import synthetic
    from lmsys_lib.config import SynthConfig

    holdout = synthetic.write(SynthConfig(n_train=40, n_test=1, seed=77), tmp_path / "holdout")["train"]
    pm.execute_notebook(str(NOTEBOOKS / "03_lora_merge.ipynb"), str(tmp_path / "out03.ipynb"),
                        parameters=common | {"base_dir": str(student), "holdout_csv": str(holdout)},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    assert (run_dir / "merged" / "model.safetensors").exists()
    executed = nbformat.read(tmp_path / "out03.ipynb", as_version=4)
    outputs = [o for c in executed.cells for o in c.get("outputs", [])]
    assert any("naive A/B average, weight error" in o.get("text", "") for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)

    # 04 quantises the merged student and runs the two orders on a small share. The 3-step tiny student is
    # uniform to ~1e-3 (argmax = rounding noise), so agreement is not checked; KL is.
    pm.execute_notebook(str(NOTEBOOKS / "04_quantization.ipynb"), str(tmp_path / "out04.ipynb"),
                        parameters=common | {"holdout_csv": str(holdout), "group_size": 32, "calib_rows": 16,
                                             "calib_max_length": 128, "min_agreement": 0.0, "device": "cpu",
                                             "compare_orders": True, "orders_model_dir": str(student),
                                             "orders_rows": 200, "orders_max_steps": 3},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    assert json.loads((run_dir / "quantized" / "fidelity.json").read_text())["kl_mean"] <= 1e-3
    executed = nbformat.read(tmp_path / "out04.ipynb", as_version=4)
    outputs = [o for c in executed.cells for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the KL histogram
    tables = " ".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "GPTQ (gptq_torch)" in tables and "QLoRA on nf4 base" in tables


def test_inference_notebook_runs_headless_and_writes_a_valid_submission(synth_dir, tokenizer, tmp_path, monkeypatch):
    """As Kaggle's scoring rerun (``KAGGLE_IS_COMPETITION_RERUN`` set): every row, whatever the dry-run fraction."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from lmsys_lib import modeling, parsing

    base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "base")
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=3).save_pretrained(tmp_path / "cls")
    modeling.load_tokenizer(base).save_pretrained(tmp_path / "cls")
    out = tmp_path / "submission.csv"
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")  # the kernel inherits the environment
    pm.execute_notebook(str(NOTEBOOKS / "05_inference_2xT4.ipynb"), str(tmp_path / "out05.ipynb"),
                        parameters={"model_dir": str(tmp_path / "cls"), "wheels_dir": str(tmp_path / "no-wheels"),
                                    "data_dir": str(synth_dir), "out_path": str(out), "work_dir": str(tmp_path / "w"),
                                    "max_length": 128, "token_budget": 2048, "devices": "cpu", "time_budget": "1h",
                                    "fraction": 0.5},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    test = parsing.read_competition(synth_dir / "test.csv").frame
    assert parsing.check_submission(pd.read_csv(out), test["id"].tolist()) == []
    executed = nbformat.read(tmp_path / "out05.ipynb", as_version=4)
    text = " ".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                    for c in executed.cells for o in c.get("outputs", []))
    assert "model on cpu" in text and "inference done" in text and "'sources'" in text
    assert "competition rerun" in text and "fraction 0.5 ignored" in text
