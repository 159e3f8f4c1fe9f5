"""`lmsys prepare`, logits made elsewhere, the recipe configs and `lmsys plan`, hub ids, and the light parts of a
portable run folder (model identity, --set, --folds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lmsys_lib import cli, contract, parsing, prepare, recipe, synthetic, teacher, zoo
from lmsys_lib.config import PackConfig, SynthConfig
from tests.conftest import ROOT


@pytest.fixture()
def train_csv(tmp_path):
    """The embedded default's train rows, plus exact repeats: one as is, one with A and B exchanged."""
    frame = synthetic.generate(SynthConfig(n_train=300, n_test=5, seed=3))["train"]
    raw = frame.copy()
    repeat = raw.iloc[[10]].assign(id=10**9 + 1)
    swapped = raw.iloc[[20]].assign(id=10**9 + 2)
    swapped = swapped.assign(response_a=raw.iloc[20]["response_b"], response_b=raw.iloc[20]["response_a"],
                             winner_model_a=raw.iloc[20]["winner_model_b"], winner_model_b=raw.iloc[20]["winner_model_a"])
    path = tmp_path / "train.csv"
    synthetic.write_table(pd.concat([raw, repeat, swapped], ignore_index=True), path)
    return path


def test_prepare_dedups_both_orders_and_splits_by_prompt(train_csv, tmp_path):
    said = []
    result = prepare.prepare(tmp_path / "run", train_csv, folds=3, holdout=0.1, seed=1, log=said.append)
    data = tmp_path / "run" / "data"
    train = parsing.read_competition(data / "train.csv").frame
    hold = parsing.read_competition(data / "holdout.csv").frame
    folds = pd.read_parquet(data / "folds.parquet")
    assert result.report["duplicates_dropped"] == 2 and "dropped 2 repeated conversations" in said[0]
    assert len(train) + len(hold) == 300 and not {10**9 + 1, 10**9 + 2} & (set(train["id"]) | set(hold["id"]))
    assert abs(len(hold) - 30) <= 6  # whole prompt groups: about the share asked for
    key = parsing.prompt_key
    assert not set(train["prompt"].map(key)) & set(hold["prompt"].map(key))  # no holdout prompt is trained on
    assert list(folds["id"]) == list(train["id"]) and sorted(folds["fold"].unique()) == [0, 1, 2]
    by_prompt = pd.DataFrame({"k": train["prompt"].map(key), "fold": folds["fold"]}).groupby("k")["fold"].nunique()
    assert (by_prompt == 1).all()
    raw_in, raw_out = parsing.read_table(train_csv), parsing.read_table(data / "train.csv")
    assert raw_out.iloc[0].to_dict() == raw_in.set_index("id").loc[raw_out.iloc[0]["id"]].to_dict() | {
        "id": raw_out.iloc[0]["id"]}  # cells copied as written
    frame, fold_of = teacher.load_split(tmp_path / "run")  # what every stage reads
    assert len(frame) == len(train)


def test_prepare_is_a_no_op_again_refuses_other_inputs_unless_forced(train_csv, tmp_path):
    run = tmp_path / "run"
    prepare.prepare(run, train_csv, folds=2, holdout=0.05, log=lambda _: None)
    assert prepare.prepare(run, train_csv, folds=2, holdout=0.05, log=lambda _: None).skipped
    with pytest.raises(Exception, match="prepared from other files or settings"):
        prepare.prepare(run, train_csv, folds=3, holdout=0.05, log=lambda _: None)
    assert not prepare.prepare(run, train_csv, folds=3, holdout=0.05, force=True, log=lambda _: None).skipped
    moved = tmp_path / "moved"  # identity is the content, not the path: a copy elsewhere still matches
    shutil.copytree(run, moved)
    copy = tmp_path / "elsewhere.csv"
    shutil.copy(train_csv, copy)
    assert prepare.prepare(moved, copy, folds=3, holdout=0.05, log=lambda _: None).skipped


def test_prepare_share_and_extra_data_without_leaks(train_csv, tmp_path):
    frame = parsing.read_competition(train_csv).frame
    extra = synthetic.generate(SynthConfig(n_train=40, n_test=5, seed=11))["train"]
    extra = pd.concat([extra, parsing.read_table(train_csv).iloc[:5]], ignore_index=True)  # 5 repeat train rows
    extra["id"] = [f"x{i:04x}" for i in range(len(extra))]
    synthetic.write_table(extra, tmp_path / "extra.csv")
    result = prepare.prepare(tmp_path / "run", train_csv, extra=[tmp_path / "extra.csv"], folds=2, holdout=0.1,
                             share=0.5, log=lambda _: None)
    written = parsing.read_extra(tmp_path / "run" / "data" / "extra.csv").frame
    seen = pd.concat([parsing.read_competition(tmp_path / "run" / "data" / n).frame for n in ("train.csv", "holdout.csv")])
    repeats = int(frame["id"].iloc[:5].isin(seen["id"]).sum())  # the repeated rows inside the share
    assert result.report["extra_overlap_dropped"] == repeats and result.report["extra_rows_read"] == 45
    assert parsing.drop_overlap(written, seen)[1] == 0  # nothing of train or holdout is post-pretrained on
    assert result.report["extra_rows"] == len(written) <= 40 + 5
    assert 120 <= result.report["share_rows"] <= 180  # about half the prompt groups


def test_cli_prepare_names_a_bad_row(tmp_path):
    raw = synthetic.generate(SynthConfig(n_train=20, n_test=2, seed=1))["train"]
    raw.loc[3, "winner_model_a"] = "7"
    synthetic.write_table(raw, tmp_path / "bad.csv")
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "prepare", "--train", str(tmp_path / "bad.csv"),
                           "--run-dir", str(tmp_path / "run"), "--folds", "2"], capture_output=True, text=True)
    assert proc.returncode != 0 and "labels not one-hot" in proc.stderr and str(raw.loc[3, "id"]) in proc.stderr


# -- logits made elsewhere ------------------------------------------------------------------------------


def _logits_file(run, path, drop=None, fold_shift=False, own=False):
    frame, fold_of = teacher.load_split(run)
    ids = frame["id"].to_numpy()
    rng = np.random.default_rng(0)
    parts = [pd.DataFrame({"id": ids, "fold": (fold_of + 1) % 2 if fold_shift else fold_of, "split": "held_out"})]
    for k in range(2):
        rows = ids[fold_of != k] if not own else ids
        parts.append(pd.DataFrame({"id": rows, "fold": k, "split": "train"}))
    table = pd.concat(parts, ignore_index=True)
    for c in ("logit_a", "logit_b", "logit_tie"):
        table[c] = rng.normal(size=len(table))
    table["teacher"] = "outside"
    if drop is not None:
        table = table.drop(index=drop)
    table.to_parquet(path)
    return table


def test_import_logits_feeds_both_kinds_of_targets_and_refuses_bad_files(train_csv, tmp_path):
    from lmsys_lib import distill
    from lmsys_lib.config import DistillConfig

    run = tmp_path / "run"
    prepare.prepare(run, train_csv, folds=2, holdout=0.1, log=lambda _: None)
    table = _logits_file(run, tmp_path / "good.parquet")
    summary = teacher.import_logits(run, tmp_path / "good.parquet", log=lambda _: None)
    assert summary == {"teacher": "outside", "oof_rows": int((table["split"] == "held_out").sum()),
                       "in_fold_folds": [0, 1], "source": str(tmp_path / "good.parquet")}
    frame, fold_of = teacher.load_split(run)
    ids, held = frame["id"].to_numpy()[fold_of != 0], frame["id"].to_numpy()[fold_of == 0]
    in_fold = distill.targets_for(run, DistillConfig(teachers=("outside",)), 0, ids, held)
    want = table[(table["split"] == "train") & (table["fold"] == 0)].set_index("id").loc[ids]
    assert np.allclose(in_fold.logits[:, 0], want[["logit_a", "logit_b", "logit_tie"]].to_numpy())
    assert distill.targets_for(run, DistillConfig(teachers=("outside",), targets="oof"), 0, ids, held).mask.all()
    assert (run / "teachers" / "outside" / "temperature.json").exists()
    with pytest.raises(ValueError, match="in the run already"):
        teacher.import_logits(run, tmp_path / "good.parquet", log=lambda _: None)

    for kwargs, match in (({"drop": [0]}, "missing ids"), ({"fold_shift": True}, "scored by another fold"),
                          ({"own": True}, "rows of fold 0 itself")):
        _logits_file(run, tmp_path / "bad.parquet", **kwargs)
        with pytest.raises(ValueError, match=match):
            teacher.import_logits(run, tmp_path / "bad.parquet", name="bad", log=lambda _: None)
    broken = table.copy()
    broken.loc[3, "logit_b"] = np.nan
    broken.to_parquet(tmp_path / "nan.parquet")
    with pytest.raises(ValueError, match="non-finite"):
        teacher.import_logits(run, tmp_path / "nan.parquet", name="nan", log=lambda _: None)
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "import-logits", "--run-dir", str(run), "--file",
                           str(tmp_path / "nan.parquet"), "--name", "nan"], capture_output=True, text=True)
    assert proc.returncode == 2 and "non-finite" in proc.stderr


# -- recipes and the planner ----------------------------------------------------------------------------


def test_every_recipe_config_loads_and_the_architectures_have_their_real_sizes():
    for name in ("winner", "prototype"):
        cfg, stages = recipe.load(ROOT / "configs" / "recipe" / name)
        assert [s.stage for s, _ in stages][0] == "prepare" and stages[-1][0].stage == "inference"
    counts = {hub: recipe.model_counts(hub, 64, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"))
              for hub in ("google/gemma-2-9b-it", "meta-llama/Meta-Llama-3-70B-Instruct", "Qwen/Qwen2-72B-Instruct")}
    billions = {hub: round(c["causal_lm"] / 1e9, 2) for hub, c in counts.items()}
    assert billions == {"google/gemma-2-9b-it": 9.24, "meta-llama/Meta-Llama-3-70B-Instruct": 70.55,
                        "Qwen/Qwen2-72B-Instruct": 72.71}
    # LoRA r = 64 on every linear layer: r·(in + out) summed — Gemma-2-9B 216.1 M, Llama-3-70B 828.4 M
    assert round(counts["google/gemma-2-9b-it"]["lora"] / 1e6, 1) == 216.1
    assert round(counts["meta-llama/Meta-Llama-3-70B-Instruct"]["lora"] / 1e6, 1) == 828.4
    g = counts["google/gemma-2-9b-it"]
    per_layer = 64 * ((3584 + 4096) * 2 + (3584 + 2048) * 2 + (3584 + 14336) * 3)
    assert g["lora"] == 42 * per_layer and g["head"] == 3 * 3584


def test_plan_prints_every_stage_and_refuses_an_unknown_key(tmp_path):
    outputs = {}
    for name in ("winner", "prototype"):
        proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "plan", "--recipe",
                               str(ROOT / "configs" / "recipe" / name)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stages = [line for line in proc.stdout.splitlines() if line[:2].rstrip(".").isdigit()]
        assert len(stages) == len(recipe.load(ROOT / "configs" / "recipe" / name)[1])
        assert proc.stdout.count("memory: fits") == len(stages) - 1 and "DOES NOT FIT" not in proc.stdout
        assert "GPU-hours" in proc.stdout and "$ lmsys prepare" in proc.stdout
        outputs[name] = proc.stdout
    assert "70.55 B parameters as a causal LM" in outputs["winner"] and "LoRA r = 64 828.4 M" in outputs["winner"]
    assert "accelerate launch --config_file configs/accelerate/8xA100-ddp.yaml" in outputs["winner"]
    planted = tmp_path / "recipe"
    shutil.copytree(ROOT / "configs" / "recipe" / "winner", planted)
    path = planted / "student-gemma2-9b.json"
    data = json.loads(path.read_text())
    data["train"]["learning_rate"] = 1e-4
    path.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "plan", "--recipe", str(planted)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "student-gemma2-9b.json" in proc.stderr and "learning_rate" in proc.stderr and "train" in proc.stderr


def test_training_memory_follows_the_engine():
    teacher = recipe.load(ROOT / "configs" / "recipe" / "winner")[1][1][1]  # the Llama-3-70B QLoRA teacher
    counts = recipe.model_counts(teacher.model.model_dir, teacher.model.lora_r, tuple(teacher.model.target_modules))
    ddp = recipe.training_memory(counts, teacher, recipe.RecipeStage("teacher", processes=8, engine="ddp"))
    assert 30 < ddp["weights"] < 45 and ddp["total"] < 80  # nf4: ~0.55 B per linear weight
    # FSDP (16-bit weights): the decoder layers are split over the processes, the root unit (embeddings, norm,
    # head) stays whole on each, and each process first loads a whole copy
    student = next(c for st, c in recipe.load(ROOT / "configs" / "recipe" / "winner")[1] if st.stage == "student")
    counts = recipe.model_counts(student.model.model_dir, student.model.lora_r, tuple(student.model.target_modules))
    one = recipe.training_memory(counts, student, recipe.RecipeStage("student", processes=8, engine="ddp"))
    fsdp = recipe.training_memory(counts, student, recipe.RecipeStage("student", processes=8, engine="fsdp"))
    root = (counts["classifier"] - counts["linear"]) * 2.0 / recipe.GIB
    linear = counts["linear"] * 2.0 / recipe.GIB
    assert fsdp["weights"] == pytest.approx(linear / 8 + root * (1 + 1 / 8))  # the root: its shard + whole gathered
    assert fsdp["trainable"] == pytest.approx(one["trainable"] / 8) and fsdp["activations"] == one["activations"]
    assert fsdp["load_peak"] == pytest.approx(one["weights"] + counts["trainable"] * 4.0 / recipe.GIB)
    assert one["load_peak"] == 0.0 and fsdp["weights"] < one["weights"] / 2


@pytest.mark.parametrize("change, message", [
    ({"engine": "fsdp"}, "needs train.fsdp = true"),
    ({"accelerate_config": ""}, "needs accelerate_config"),
    ({"engine": "single"}, "with engine 'single': use"),
    ({"engine": "replicas"}, "with engine 'replicas': use"),
])
def test_recipe_engine_must_agree_with_the_stage_config(tmp_path, change, message):
    planted = tmp_path / "winner"
    shutil.copytree(ROOT / "configs" / "recipe" / "winner", planted)
    data = json.loads((planted / "recipe.json").read_text())
    student = next(s for s in data["stages"] if s["stage"] == "student")
    student.update(change)
    (planted / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="stages\\[\\d\\] \\(student") as err:
        recipe.load(planted)
    assert message in str(err.value)


def test_recipe_refuses_fsdp_over_nf4_and_fsdp_config_under_ddp(tmp_path):
    planted = tmp_path / "winner"
    shutil.copytree(ROOT / "configs" / "recipe" / "winner", planted)
    data = json.loads((planted / "recipe.json").read_text())
    teacher = next(s for s in data["stages"] if s["stage"] == "teacher")
    path = planted / teacher["config"]
    cfg = json.loads(path.read_text())
    cfg.setdefault("train", {})["fsdp"] = True
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sets train.fsdp but the stage's engine is 'ddp'"):
        recipe.load(planted)
    teacher["engine"] = "fsdp"
    (planted / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cannot shard nf4"):
        recipe.load(planted)
    teacher["processes"] = 1
    (planted / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="needs 2 or more processes"):
        recipe.load(planted)
    cfg["train"]["fsdp"] = False
    cfg.setdefault("pretrain", {})["data"] = ["data/extra.csv"]
    cfg["pretrain"]["train"] = {"fsdp": True}
    path.write_text(json.dumps(cfg))
    teacher["engine"], teacher["processes"] = "ddp", 8
    (planted / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sets pretrain.train.fsdp but the stage's engine is 'ddp'"):
        recipe.load(planted)


def _planted_winner(tmp_path):
    planted = tmp_path / "winner"
    shutil.copytree(ROOT / "configs" / "recipe" / "winner", planted)
    data = json.loads((planted / "recipe.json").read_text())
    student = next(s for s in data["stages"] if s["stage"] == "student")
    return planted, data, student, planted / student["config"]


def test_a_valid_fsdp_student_loads_and_its_post_pretraining_must_agree(tmp_path):
    planted, data, student, path = _planted_winner(tmp_path)
    student.update(engine="fsdp", accelerate_config="configs/accelerate/8xA100-fsdp.yaml")
    (planted / "recipe.json").write_text(json.dumps(data))
    cfg = json.loads(path.read_text())
    cfg.setdefault("train", {})["fsdp"] = True
    cfg.setdefault("pretrain", {})["data"] = ["data/extra.csv"]  # post-pretraining under FSDP too
    cfg["pretrain"].setdefault("train", {})["fsdp"] = True
    path.write_text(json.dumps(cfg))
    _, stages = recipe.load(planted)
    assert next(st for st, _ in stages if st.stage == "student").engine == "fsdp"
    cfg["pretrain"]["train"]["fsdp"] = False  # … must say so
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="needs pretrain.train.fsdp = true"):
        recipe.load(planted)
    cfg["pretrain"] = {"train": {"fsdp": True}}  # no pretrain data: the flag is harmless but still not refused
    path.write_text(json.dumps(cfg))
    recipe.load(planted)
    cfg["train"]["fsdp"] = False
    path.write_text(json.dumps(cfg))
    student["engine"] = "ddp"
    student["accelerate_config"] = "configs/accelerate/8xA100-ddp.yaml"
    (planted / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sets pretrain.train.fsdp"):  # set without pretrain data: still refused
        recipe.load(planted)


@pytest.mark.parametrize("config, message", [
    ("configs/accelerate/nope.yaml", "not found"),
    ("configs/accelerate/2xT4.yaml", "launches num_processes 2, the stage says processes 8"),
])
def test_the_accelerate_config_must_exist_and_launch_the_stage_processes(tmp_path, config, message):
    planted, data, student, _ = _planted_winner(tmp_path)
    student["accelerate_config"] = config
    (planted / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        recipe.load(planted)


def test_the_accelerate_config_is_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a notebook's folder, say: the repository is found above the recipe
    assert recipe.load(ROOT / "configs" / "recipe" / "winner")[1]


def test_recipe_refuses_a_training_engine_on_an_inference_stage(tmp_path):
    planted = tmp_path / "winner"
    shutil.copytree(ROOT / "configs" / "recipe" / "winner", planted)
    data = json.loads((planted / "recipe.json").read_text())
    next(s for s in data["stages"] if s["stage"] == "inference")["engine"] = "ddp"
    (planted / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is for teacher / student training"):
        recipe.load(planted)


def test_training_memory_follows_the_attention_kernel_of_the_hardware():
    """Gemma-2 soft-caps attention: flash-attention-2 on an A100 (no length² term), eager on a T4."""
    cfg = next(c for st, c in recipe.load(ROOT / "configs" / "recipe" / "winner")[1] if st.stage == "student")
    counts = recipe.model_counts(cfg.model.model_dir, cfg.model.lora_r, tuple(cfg.model.target_modules))
    assert counts["softcap"]
    a100 = recipe.training_memory(counts, cfg, recipe.RecipeStage("student", hardware="8xa100-80g", processes=8))
    t4 = recipe.training_memory(counts, cfg, recipe.RecipeStage("student", hardware="kaggle-2xt4", processes=2))
    assert not a100["eager"] and t4["eager"] and t4["activations"] > a100["activations"]
    assert recipe.attention_of("auto", False, "kaggle-2xt4") == "sdpa"
    assert recipe.attention_of("eager", True, "8xa100-80g") == "eager"


# -- names of models, portable identity, CLI settings ------------------------------------------------------


def test_a_hub_id_resolves_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """The layout huggingface_hub itself writes (models--org--name/snapshots/<rev>, refs/main), read offline."""
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text('{"model_type": "llama"}')
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert zoo.is_hub_id("org/tiny") and not zoo.is_hub_id(str(tmp_path))
    assert zoo.resolve_model_dir("org/tiny") == str(snap)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        zoo.resolve_model_dir("org/absent")
    assert zoo.model_identity("org/tiny") == {"name": "org/tiny"}


def test_model_identity_is_the_content_not_the_path(tmp_path):
    a = tmp_path / "a" / "gemma"
    a.mkdir(parents=True)
    (a / "config.json").write_text('{"hidden_size": 8}')
    (a / "model.safetensors").write_bytes(b"x" * 10)
    b = tmp_path / "b" / "gemma"
    shutil.copytree(a, b)
    assert zoo.model_identity(str(a)) == zoo.model_identity(str(b))
    (b / "config.json").write_text('{"hidden_size": 16}')
    assert zoo.model_identity(str(a)) != zoo.model_identity(str(b))


def test_set_and_folds_flags():
    data = cli.apply_settings({"train": {"lr": 1.0}}, ["train.max_steps=2", "pack.max_length=96", "name=x",
                                                         "model.target_modules=[\"q_proj\"]"])
    assert data == {"train": {"lr": 1.0, "max_steps": 2}, "pack": {"max_length": 96}, "name": "x",
                    "model": {"target_modules": ["q_proj"]}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli.apply_settings({}, ["train.max_steps"])
    assert cli.parse_folds(["0,1"]) == [0, 1] and cli.parse_folds(["0", "2"]) == [0, 2] and cli.parse_folds(None) is None
    from lmsys_lib.config import TeacherConfig, from_dict

    with pytest.raises(ValueError, match=r"TeacherConfig.train: TrainConfig: unknown key\(s\) \['lrr'\]"):
        from_dict(TeacherConfig, cli.apply_settings({}, ["train.lrr=1"]))


def test_contract_pack_and_temperature(tmp_path):
    trained = PackConfig(max_length=512, fractions=(0.3, 0.35, 0.35), cut="middle")
    contract.write(tmp_path, trained, {"value": 0.9, "source": "s/oof.parquet"}, "bfloat16", "merge")
    said = []
    assert contract.pack_for(tmp_path, log=said.append) == trained and not said
    longer = contract.pack_for(tmp_path, max_length=2000, log=said.append)
    assert longer.max_length == 2000 and longer.cut == "middle" and "trained at 512" in said[-1]
    other = contract.pack_for(tmp_path, PackConfig(max_length=512), log=said.append)
    assert other == PackConfig(max_length=512) and said[-1].startswith("WARNING") and "cut 'middle' → 'end'" in said[-1]
    assert contract.temperature_of(tmp_path)[0] == 0.9
    data = json.loads((tmp_path / contract.CONTRACT_FILE).read_text())
    data["label_order"] = ["winner_model_b", "winner_model_a", "winner_tie"]
    (tmp_path / contract.CONTRACT_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="label_order"):
        contract.read(tmp_path)
    empty = tmp_path / "none"
    empty.mkdir()
    assert contract.pack_for(empty, log=said.append) == PackConfig() and "no lmsys_contract.json" in said[-1]
