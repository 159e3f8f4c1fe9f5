"""Environment detection and the path resolver."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmsys_lib import kaggle


def test_detect_env(monkeypatch):
    for var in ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "COLAB_RELEASE_TAG", "COLAB_GPU"):
        monkeypatch.delenv(var, raising=False)
    assert kaggle.detect_env() == "local"
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261101")
    assert kaggle.detect_env() == "colab"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert kaggle.detect_env() == "kaggle"


def test_competition_dir(tmp_path):
    assert kaggle.competition_dir(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kaggle.competition_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no data folder given"):
        kaggle.competition_dir(env="local")
    assert str(kaggle.runs_root("kaggle")) == "/kaggle/working/runs"


def test_run_dir(tmp_path):
    assert kaggle.run_dir("exp1", root=tmp_path).is_dir()
    with pytest.raises(ValueError, match="plain folder name"):
        kaggle.run_dir("../escape", root=tmp_path)


ROOT = Path(__file__).resolve().parents[1]


def test_committed_metadata_is_what_the_generator_writes_and_validates(tmp_path):
    written = kaggle.write_repo_metadata(tmp_path, reset=True)  # what the generator writes today, no edits
    for path in written:
        committed = ROOT / path.relative_to(tmp_path)
        assert json.loads(committed.read_text()) == json.loads(path.read_text()), f"{committed} is stale: lmsys kaggle metadata"
    assert kaggle.validate_tree(ROOT / "kernel-metadata", client=True) == []
    assert kaggle.validate_tree(ROOT / "datasets-metadata", client=True) == []
    submission = json.loads((ROOT / "kernel-metadata" / "arena-distill-05-inference-2xt4" / "kernel-metadata.json").read_text())
    assert submission["machine_shape"] == "NvidiaTeslaT4" and submission["enable_internet"] is False
    assert submission["competition_sources"] == ["lmsys-chatbot-arena"]


def test_slugify_matches_the_kaggle_cli(monkeypatch):
    slugify = pytest.importorskip("slugify").slugify  # what `kaggle kernels push` compares the id with
    titles = [k.title for k in kaggle.SUITE_KERNELS] + [d.title for d in kaggle.SUITE_DATASETS] + [
        "Gemma-2 9B: 8-bit GPTQ (fold 0+1)", "  Uber   Unicode  ", "don't stop", "a__b--c", "x.y/z"]
    for title in titles + ["Über straße — ÆON"]:
        assert kaggle.slugify(title) == slugify(title), title
    monkeypatch.setitem(sys.modules, "slugify", None)  # the fallback, for a box without python-slugify
    for title in titles:
        assert kaggle.slugify(title) == slugify(title), title


def _good_kernel(tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "k"
    folder.mkdir(exist_ok=True)
    (folder / "05_inference_2xT4.ipynb").write_text((ROOT / "notebooks" / "05_inference_2xT4.ipynb").read_text())
    spec = kaggle.SUITE_KERNELS[-1]
    meta = kaggle.kernel_metadata(spec, "alice", "05_inference_2xT4.ipynb") | changes
    meta = {k: v for k, v in meta.items() if v is not _DROP}
    (folder / "kernel-metadata.json").write_text(json.dumps(meta))
    return folder


_DROP = object()


def test_good_kernel_metadata_passes(tmp_path):
    assert kaggle.validate_kernel_metadata(_good_kernel(tmp_path), for_push=True) == []


@pytest.mark.parametrize("changes, field, words", [
    ({"id": "alice/arena-distill-05-inference"}, "id", "slugify(title)"),
    ({"id": "alice/arena-distill-05-inference-2xt4/3"}, "id", "owner/slug"),
    ({"enable_internet": True}, "enable_internet", "must be false"),
    ({"enable_internet": _DROP}, "enable_internet", "defaults it to true"),
    ({"enable_internet": "false"}, "enable_internet", "JSON boolean"),
    ({"machine_shape": _DROP}, "machine_shape", "P100"),
    ({"machine_shape": "NvidiaTeslaP100"}, "machine_shape", "NvidiaTeslaT4"),
    ({"code_file": "missing.ipynb"}, "code_file", "not found"),
    ({"code_file": _DROP}, "code_file", "missing"),
    ({"dataset_sources": ["alice-arena-distill-wheels"]}, "dataset_sources[0]", "owner/slug"),
    ({"dataset_sources": ["alice/Arena Wheels"]}, "dataset_sources[0]", "lower-case"),
    ({"kernel_sources": "alice/k"}, "kernel_sources", "list"),
    ({"competition_sources": []}, "competition_sources", "lmsys-chatbot-arena"),
    ({"title": "2xT4"}, "title", "5–50"),
    ({"enable_internets": False}, "enable_internets", "unknown key"),
    ({"language": "r"}, "language", "python"),
    ({"id": "your-kaggle-username/arena-distill-05-inference-2xt4"}, "id", "placeholder"),
])
def test_each_broken_kernel_field_is_named(tmp_path, changes, field, words):
    problems = kaggle.validate_kernel_metadata(_good_kernel(tmp_path, **changes), for_push=True)
    assert problems, changes
    assert any(p.field == field and words in p.message for p in problems), [str(p) for p in problems]
    assert all(str(p).startswith(str(tmp_path / "k" / "kernel-metadata.json")) for p in problems)


def test_unreadable_metadata_names_the_file(tmp_path):
    (tmp_path / "kernel-metadata.json").write_text("{not json")
    [problem] = kaggle.validate_kernel_metadata(tmp_path)
    assert problem.field == "(file)" and "not valid JSON" in problem.message
    [problem] = kaggle.validate_dataset_metadata(tmp_path / "nowhere")
    assert problem.message == "missing"


@pytest.mark.parametrize("changes, field", [
    ({"title": "wheel"}, "title"), ({"licenses": [{"name": "CC0-1.0"}, {"name": "MIT"}]}, "licenses"),
    ({"licenses": _DROP}, "licenses"), ({"id": "alice/whl"}, "id"), ({"subtitle": "too short"}, "subtitle"),
    ({"isprivate": True}, "isprivate"),
])
def test_each_broken_dataset_field_is_named(tmp_path, changes, field):
    meta = kaggle.dataset_metadata(kaggle.WHEELS, "alice")
    assert kaggle.validate_dataset_metadata(_write(tmp_path / "ok", meta)) == []
    meta = {k: v for k, v in (meta | changes).items() if v is not _DROP}
    problems = kaggle.validate_dataset_metadata(_write(tmp_path / "bad", meta))
    assert [p.field for p in problems] == [field], [str(p) for p in problems]


def _write(folder: Path, meta: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "dataset-metadata.json").write_text(json.dumps(meta))
    return folder


def test_kernel_order_puts_sources_first_and_refuses_a_cycle():
    order = [k.notebook[:2] for k in kaggle.kernel_order()]
    assert order == ["00", "01", "02", "03", "04", "05"]
    a = kaggle.KernelSpec("a.ipynb", "kernel aaaa", gpu=False, kernels=("kernel-bbbb",))
    b = kaggle.KernelSpec("b.ipynb", "kernel bbbb", gpu=False, kernels=("kernel-aaaa",))
    with pytest.raises(ValueError, match="cycle"):
        kaggle.kernel_order((a, b))


def _fake_run(tmp_path: Path, passed: bool = True) -> Path:
    quantized = tmp_path / "run" / "quantized"
    quantized.mkdir(parents=True)
    (quantized / "config.json").write_text("{}")
    (quantized / "model.safetensors").write_bytes(b"\0" * 1024)
    (quantized / "fidelity.json").write_text(json.dumps({"passed": passed}))
    return tmp_path / "run"


def test_build_writes_pushable_folders_and_never_the_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret-key-value")
    user = kaggle.kaggle_user()
    summary = kaggle.build(tmp_path / "build", user, ROOT, run_dir=_fake_run(tmp_path), wheels=False)
    assert summary["problems"] == []
    kernels = tmp_path / "build" / "kernels"
    assert sorted(p.name for p in kernels.iterdir()) == sorted(k.slug for k in kaggle.SUITE_KERNELS)
    meta = json.loads((kernels / "arena-distill-05-inference-2xt4" / "kernel-metadata.json").read_text())
    assert meta["id"] == "alice/arena-distill-05-inference-2xt4" and meta["code_file"] == "05_inference_2xT4.ipynb"
    student = tmp_path / "build" / "datasets" / "arena-distill-student-gptq"
    assert (student / "model.safetensors").stat().st_size == 1024
    assert json.loads((student / "dataset-metadata.json").read_text())["id"] == "alice/arena-distill-student-gptq"
    for path in (tmp_path / "build").rglob("*"):
        assert not path.is_file() or b"s3cret" not in path.read_bytes(), path
    assert kaggle.validate_tree(tmp_path / "build", for_push=True) == []


def test_build_refuses_a_student_that_failed_its_fidelity_check(tmp_path):
    with pytest.raises(ValueError, match="failed its fidelity check"):
        kaggle.build(tmp_path / "build", "alice", ROOT, run_dir=_fake_run(tmp_path, passed=False), wheels=False)


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    return env | {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config")}


def test_push_dry_run_prints_the_whole_suite_without_credentials_or_network(tmp_path):
    env = _clean_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "kaggle", "push", "--dry-run", "--new",
                           "--build", str(tmp_path / "b")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if line.startswith("kaggle ")]
    creates = [i for i, c in enumerate(commands) if c.startswith("kaggle datasets create")]
    pushes = [c for c in commands if c.startswith("kaggle kernels push")]
    assert len(creates) == 2 and all("--dir-mode zip" in commands[i] for i in creates)
    assert len(pushes) == 6 and max(creates) < commands.index(pushes[0])
    assert [c.rsplit("-", 3)[0][-2:] for c in pushes]  # every notebook, in dependency order
    assert [next(k.notebook[:2] for k in kaggle.SUITE_KERNELS if c.endswith(k.slug)) for c in pushes] == \
        ["00", "01", "02", "03", "04", "05"]
    assert "credentials: none found" in proc.stdout
    assert not (tmp_path / "home" / ".kaggle").exists() and not (tmp_path / "b").exists()  # nothing written


def test_push_without_credentials_refuses_before_running_anything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "kaggle", "push", "--build", str(tmp_path / "b")],
                          capture_output=True, text=True, env=_clean_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "no Kaggle credentials" in proc.stderr


def test_credentials_are_found_where_the_cli_looks_and_only_the_user_name_is_read(tmp_path):
    env = {"HOME": str(tmp_path)}
    assert kaggle.credential_source(env) is None and kaggle.kaggle_user(env=env) is None
    config = tmp_path / "cfg" / "kaggle.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"username": "bob", "key": "0123"}))
    env["KAGGLE_CONFIG_DIR"] = str(config.parent)
    assert kaggle.credential_source(env) == str(config) and kaggle.kaggle_user(env=env) == "bob"
    assert kaggle.kaggle_user("carol", env) == "carol"
    assert kaggle.credential_source({"HOME": str(tmp_path), "KAGGLE_API_TOKEN": "x"}) == "$KAGGLE_API_TOKEN"


def test_colab_without_drive_warns_and_dataset_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(kaggle, "COLAB_DRIVE", tmp_path / "not-mounted")
    with pytest.warns(UserWarning, match="Drive is not mounted"):
        assert kaggle.runs_root("colab") == Path("/content/runs")
    (tmp_path / "MyDrive").mkdir()
    monkeypatch.setattr(kaggle, "COLAB_DRIVE", tmp_path / "MyDrive")
    assert kaggle.runs_root("colab") == tmp_path / "MyDrive" / "arena-distill" / "runs"
    assert kaggle.dataset_dir("x", explicit=tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="/kaggle/input/arena-distill-wheels"):
        kaggle.dataset_dir("arena-distill-wheels", env="local")


@pytest.mark.slow
def test_kaggle_build_command_ships_the_wheel_and_the_wheelhouse(tmp_path):
    """`lmsys kaggle build` as users start it: the lmsys_lib wheel and the offline wheelhouse for Kaggle's image
    (train + quantize extras, what Kaggle ships left out, never torch), the student, the kernels — all pushable."""
    env = _clean_env(tmp_path) | {"KAGGLE_USERNAME": "alice"}
    out = tmp_path / "build"
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "kaggle", "build", "--out", str(out), "--image", "local",
                           "--run-dir", str(_fake_run(tmp_path))], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)  # built for this machine's image: gptqmodel 7.6.0 fits it
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = out / "datasets" / "arena-distill-wheels"
    names = sorted(p.name for p in wheels.iterdir())
    assert any(n.startswith("lmsys_lib-") and n.endswith(".whl") for n in names)
    assert any(n.startswith("optimum-") for n in names) and any(n.startswith("gptqmodel-") for n in names)
    assert not any(n.startswith(("torch-", "nvidia")) for n in names)
    manifest = json.loads((wheels / "wheelhouse.json").read_text())
    assert "torch" in manifest["excluded"] and "transformers" in manifest["excluded"]
    assert manifest["image"]["name"].startswith("live:") and "chose gptqmodel 7.6.0" in manifest["chosen"][0]
    assert ["gptqmodel", ">=2.8.0"] in manifest["image_needs"]["torch"]  # what the kernel's first cell checks
    listing = (wheels / "requirements-quantize.txt").read_text().splitlines()  # what notebooks 04/05 install
    assert "gptqmodel==7.6.0" in listing and not any(line.startswith("peft") for line in listing)
    assert (wheels / "requirements.txt").is_file() and (wheels / "requirements-train.txt").is_file()
    assert kaggle.validate_tree(out, for_push=True) == []
    dry = subprocess.run([sys.executable, "-m", "lmsys_lib", "kaggle", "push", "--dry-run", "--build", str(out)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert dry.returncode == 0 and f"kaggle datasets version -p {wheels}" in dry.stdout
    assert "# a real push refuses: required notebook parameters are empty" in dry.stdout  # 01/02's model_dir


def test_the_submission_kernel_knows_which_run_it_is():
    rerun = kaggle.submission_run(25_000, fraction=0.1, env="kaggle", environ={kaggle.RERUN_VARIABLE: "1"})
    assert rerun.mode == "rerun" and rerun.fraction == 1.0 and "fraction 0.1 ignored" in rerun.message
    save = kaggle.submission_run(3, fraction=1.0, env="kaggle", environ={})
    assert save.mode == "save" and save.fraction == 1.0 and "3 public test rows" in save.message
    assert "kaggle competitions submit -c lmsys-chatbot-arena -k USER/KERNEL" in save.message
    odd = kaggle.submission_run(500, fraction=0.5, env="kaggle", environ={})
    assert odd.mode == "save" and odd.fraction == 1.0 and "all of them" in odd.message
    local = kaggle.submission_run(120, fraction=0.5, env="local", environ={})
    assert local.mode == "local" and local.fraction == 0.5
    assert kaggle.submission_run(120, env="local", environ={kaggle.RERUN_VARIABLE: "1"}).mode == "rerun"


def _project(tmp_path: Path) -> Path:
    """A copy of the checkout's notebooks and committed metadata: the files a user edits."""
    project = tmp_path / "project"
    for folder in ("notebooks", "kernel-metadata", "datasets-metadata"):
        shutil.copytree(ROOT / folder, project / folder)
    return project


GEMMA_MODEL = "google/gemma-2/transformers/gemma-2-9b-it/2"  # a Kaggle Model: owner/model/framework/variation/version


def test_an_edit_to_committed_metadata_survives_build_and_metadata_and_validates(tmp_path):
    project = _project(tmp_path)
    path = project / "kernel-metadata" / "arena-distill-05-inference-2xt4" / "kernel-metadata.json"
    meta = json.loads(path.read_text())
    meta["model_sources"].append(GEMMA_MODEL)
    meta["dataset_sources"].append("kaggle-user/extra-priors")
    meta["is_private"] = False
    meta["keywords"] = ["gpu"]
    path.write_text(json.dumps(meta, indent=2))
    summary = kaggle.build(tmp_path / "build", "alice", project, wheels=False)
    assert summary["problems"] == [] and sorted(summary["overlays"][str(path)]) == \
        ["dataset_sources", "is_private", "keywords", "model_sources"]
    built = json.loads((tmp_path / "build" / "kernels" / "arena-distill-05-inference-2xt4" /
                        "kernel-metadata.json").read_text())
    assert built["model_sources"] == [GEMMA_MODEL] and built["is_private"] is False and built["keywords"] == ["gpu"]
    assert built["dataset_sources"] == ["alice/arena-distill-wheels", "alice/arena-distill-student-gptq",
                                        "kaggle-user/extra-priors"]  # generated first, the user's added
    assert built["id"] == "alice/arena-distill-05-inference-2xt4" and built["code_file"] == "05_inference_2xT4.ipynb"
    assert kaggle.validate_tree(tmp_path / "build", for_push=True, client=True) == []
    kaggle.write_repo_metadata(project)  # `lmsys kaggle metadata` keeps the edit …
    assert json.loads(path.read_text())["model_sources"] == [GEMMA_MODEL]
    kaggle.write_repo_metadata(project, user="alice")  # … also written for a user: building for bob is no edit
    assert json.loads(path.read_text())["id"] == "alice/arena-distill-05-inference-2xt4"
    kaggle.build(tmp_path / "build", "bob", project, wheels=False)
    built = json.loads((tmp_path / "build" / "kernels" / "arena-distill-05-inference-2xt4" /
                        "kernel-metadata.json").read_text())
    assert built["id"] == "bob/arena-distill-05-inference-2xt4" and built["model_sources"] == [GEMMA_MODEL]
    assert built["dataset_sources"][:2] == ["bob/arena-distill-wheels", "bob/arena-distill-student-gptq"]
    kaggle.write_repo_metadata(project, reset=True)  # … and --reset drops it
    assert json.loads(path.read_text())["model_sources"] == []


def test_a_source_or_key_the_user_removed_stays_removed(tmp_path):
    project = _project(tmp_path)
    path = project / "kernel-metadata" / "arena-distill-05-inference-2xt4" / "kernel-metadata.json"
    meta = json.loads(path.read_text())
    meta["dataset_sources"].remove("your-kaggle-username/arena-distill-student-gptq")  # the model comes from 04
    meta["kernel_sources"].append("your-kaggle-username/arena-distill-04-quantization")
    meta["model_sources"] = None  # null removes a generated key; a key merely missing is not an edit
    meta.pop("keywords", None)
    path.write_text(json.dumps(meta))
    kaggle.build(tmp_path / "build", "alice", project, wheels=False)
    built = json.loads((tmp_path / "build" / "kernels" / "arena-distill-05-inference-2xt4" /
                        "kernel-metadata.json").read_text())
    assert built["dataset_sources"] == ["alice/arena-distill-wheels"] and "model_sources" not in built
    assert built["kernel_sources"] == ["alice/arena-distill-04-quantization"] and built["machine_shape"]
    steps = kaggle.push_plan(tmp_path / "build", "alice", only=("04", "05"), check_required=False)
    assert [s.argv[-1] for s in steps if s.wait == "kernel"] == ["alice/arena-distill-04-quantization"]
    meta = json.loads(path.read_text())
    del meta["machine_shape"]  # a file from before the generator wrote this key: it is still generated
    path.write_text(json.dumps(meta))
    kaggle.build(tmp_path / "build", "alice", project, wheels=False)
    built = json.loads((tmp_path / "build" / "kernels" / "arena-distill-05-inference-2xt4" /
                        "kernel-metadata.json").read_text())
    assert built["machine_shape"] == "NvidiaTeslaT4"


def test_a_broken_edit_is_refused_by_our_checks_and_by_the_real_client(tmp_path):
    project = _project(tmp_path)
    path = project / "kernel-metadata" / "arena-distill-00-eda" / "kernel-metadata.json"
    meta = json.loads(path.read_text()) | {"enable_internet": True}
    path.write_text(json.dumps(meta))
    summary = kaggle.build(tmp_path / "build", "alice", project, wheels=False)
    assert any("enable_internet: must be false" in p for p in summary["problems"])
    meta = json.loads(path.read_text()) | {"enable_internet": False, "docker_image_pinning_type": "sometimes"}
    path.write_text(json.dumps(meta))  # a value only the client itself checks
    summary = kaggle.build(tmp_path / "build", "alice", project, wheels=False)
    pytest.importorskip("kaggle")
    [problem] = summary["problems"]
    assert "(kaggle client)" in problem and "docker_image_pinning_type" in problem and "00-eda" in problem


def test_the_student_dataset_names_the_base_models_terms(tmp_path):
    project = _project(tmp_path)
    run = _fake_run(tmp_path)
    (run / "quantized" / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    summary = kaggle.build(tmp_path / "build", "alice", project, run_dir=run, wheels=False)
    meta = json.loads((tmp_path / "build" / "datasets" / "arena-distill-student-gptq" /
                       "dataset-metadata.json").read_text())
    assert meta["licenses"] == [{"name": "other"}] and "Gemma Terms of Use" in meta["description"]
    assert summary["problems"] == [] and not any("licence" in w for w in summary["warnings"])
    (run / "quantized" / "config.json").write_text(json.dumps({"model_type": "llama"}))  # Llama or SmolLM2?
    summary = kaggle.build(tmp_path / "build", "alice", project, run_dir=run, wheels=False)
    assert any("licence is not known" in w for w in summary["warnings"])
    committed = project / "datasets-metadata" / "arena-distill-student-gptq" / "dataset-metadata.json"
    edit = json.loads(committed.read_text()) | {"licenses": [{"name": "apache-2.0"}],
                                               "description": "SmolLM2-135M fine-tuned (Apache-2.0)"}
    committed.write_text(json.dumps(edit))
    summary = kaggle.build(tmp_path / "build", "alice", project, run_dir=run, wheels=False)
    meta = json.loads((tmp_path / "build" / "datasets" / "arena-distill-student-gptq" /
                       "dataset-metadata.json").read_text())
    assert meta["licenses"] == [{"name": "apache-2.0"}]  # the user's licence wins, and ends the warning
    assert not any("licence" in w for w in summary["warnings"])


# ---------------------------------------------------------------- the chain on Kaggle: inputs, parameters, waits

def test_run_folders_go_under_the_platforms_runs_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert kaggle.resolve_run_dir("runs/teacher", env="local") == Path("runs/teacher")
    assert kaggle.resolve_run_dir("teacher", env="local") == Path("runs/teacher")
    assert kaggle.resolve_run_dir(tmp_path / "abs", env="kaggle") == tmp_path / "abs"
    (tmp_path / "MyDrive").mkdir()
    monkeypatch.setattr(kaggle, "COLAB_DRIVE", tmp_path / "MyDrive")
    assert kaggle.resolve_run_dir("runs/teacher", env="colab") == tmp_path / "MyDrive" / "arena-distill" / "runs" / "teacher"
    assert (tmp_path / "MyDrive" / "arena-distill" / "runs" / "teacher").is_dir()


def _kernel_output(root: Path, slug: str, run: str = "teacher") -> Path:
    """What Kaggle mounts for an attached kernel: its /kaggle/working, read-only, under /kaggle/input/<slug>."""
    out = root / slug / "runs" / run
    (out / "data").mkdir(parents=True)
    (out / "data" / "folds.parquet").write_bytes(b"PAR1")
    (out / "teachers" / "t" / "oof.parquet").parent.mkdir(parents=True)
    (out / "teachers" / "t" / "oof.parquet").write_bytes(b"x" * 100)
    (out / "teachers" / "t" / "big.safetensors").write_bytes(b"y" * 5000)
    return out


def test_a_chained_notebook_brings_the_upstream_kernels_run_folder(tmp_path, monkeypatch):
    inputs = tmp_path / "input"
    source = _kernel_output(inputs, "arena-distill-01-teacher-training")
    monkeypatch.setattr(kaggle, "LINK_ABOVE", 1000)
    lines: list[str] = []
    run = tmp_path / "working" / "runs" / "teacher"
    (run / "teachers" / "t").mkdir(parents=True)
    (run / "teachers" / "t" / "oof.parquet").write_bytes(b"mine")  # a restarted session's own work is kept
    got = kaggle.chain_run(run, "arena-distill-01-teacher-training", env="kaggle", input_root=inputs,
                           log=lines.append)
    assert got == run and (run / "data" / "folds.parquet").read_bytes() == b"PAR1"
    assert (run / "teachers" / "t" / "oof.parquet").read_bytes() == b"mine"
    assert (run / "teachers" / "t" / "big.safetensors").is_symlink()
    assert (run / "teachers" / "t" / "big.safetensors").resolve() == (source / "teachers" / "t" / "big.safetensors")
    assert "arena-distill-01-teacher-training's output" in lines[0] and "1 files copied, 1 linked" in lines[0]
    lines.clear()  # not attached (or not on Kaggle): the run folder as it is, said so
    kaggle.chain_run(tmp_path / "other", "arena-distill-02-distillation", env="kaggle", input_root=inputs,
                     log=lines.append)
    assert "is not attached" in lines[0]
    kaggle.chain_run(tmp_path / "local", "arena-distill-01-teacher-training", env="local", input_root=inputs,
                     log=lines.append)
    assert lines[-1] == f"inputs: the run folder {tmp_path / 'local'}"


def test_newer_input_layouts_and_several_runs(tmp_path):
    inputs = tmp_path / "input"
    _kernel_output(inputs / "notebooks" / "alice", "arena-distill-02-distillation", run="a")
    _kernel_output(inputs / "notebooks" / "alice" / "x", "unrelated", run="b")
    output = kaggle.input_dir("arena-distill-02-distillation", inputs)
    assert output == inputs / "notebooks" / "alice" / "arena-distill-02-distillation"
    assert kaggle.find_run(output, "whatever").name == "a"  # the only run there
    (output / "runs" / "c" / "data").mkdir(parents=True)
    (output / "runs" / "c" / "data" / "folds.parquet").write_bytes(b"PAR1")
    assert kaggle.find_run(output, "c").name == "c"
    with pytest.raises(FileNotFoundError, match=r"no single run folder 'z'.*runs/a, runs/c"):
        kaggle.find_run(output, "z")


def test_a_required_parameter_left_empty_stops_the_notebook_at_once(tmp_path):
    with pytest.raises(kaggle.ParameterError, match=r"01_teacher_training: model_dir is empty: set it to a folder"):
        kaggle.require_parameters("01_teacher_training", None, model_dir=("", "a folder"), name=("t", "a name"))
    kaggle.require_parameters("01_teacher_training", "teacher.json", model_dir=("", "a folder"))  # config carries it
    pm = pytest.importorskip("papermill")
    with pytest.raises(pm.PapermillExecutionError, match="model_dir is empty") as err:
        pm.execute_notebook(str(ROOT / "notebooks" / "01_teacher_training.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"run_dir": str(tmp_path / "run")}, kernel_name="python3",
                            progress_bar=False, cwd=str(tmp_path))
    assert err.value.exec_count <= 4 and not (tmp_path / "run").exists()  # before any data or model work


def test_build_injects_parameters_and_push_refuses_an_empty_required_one(tmp_path):
    project = _project(tmp_path)
    summary = kaggle.build(tmp_path / "b", "alice", project, wheels=False)
    assert any("arena-distill-01-teacher-training: model_dir" in w for w in summary["warnings"])
    with pytest.raises(ValueError, match="required notebook parameters are empty.*01-teacher-training: model_dir"):
        kaggle.push_plan(tmp_path / "b", "alice")
    assert kaggle.push_plan(tmp_path / "b", "alice", only=("05",))  # the submission kernel alone is fine
    params = kaggle.parse_params(["01:model_dir=/kaggle/input/gemma-2/transformers/gemma-2-2b-it/2", "01:k_folds=3",
                                  "arena-distill-02-distillation:model_dir=/kaggle/input/qwen"])
    summary = kaggle.build(tmp_path / "b", "alice", project, wheels=False, params=params)
    assert summary["problems"] == [] and not any("model_dir" in w for w in summary["warnings"])
    notebook = tmp_path / "b" / "kernels" / "arena-distill-01-teacher-training" / "01_teacher_training.ipynb"
    values = kaggle.notebook_parameters(notebook)
    assert values["model_dir"] == "/kaggle/input/gemma-2/transformers/gemma-2-2b-it/2" and values["k_folds"] == 3
    pm = pytest.importorskip("papermill")
    assert "model_dir" in pm.inspect_notebook(str(notebook))  # papermill still sees the parameters cell
    with pytest.raises(ValueError, match="no parameter \\['modeldir'\\]"):
        kaggle.build(tmp_path / "b", "alice", project, wheels=False, params={"01": {"modeldir": "x"}})
    with pytest.raises(ValueError, match="expected NB:NAME=VALUE"):
        kaggle.parse_params(["model_dir=/x"])


class _FakeKaggle:
    """The `kaggle` CLI's argument shapes and output lines, scripted: `kernels status` answers in turn; time
    passes only when the push loop sleeps."""

    def __init__(self, statuses: dict[str, list[str]], log_text: str = "", push_out: str = ""):
        self.statuses, self.calls, self.log_text, self.push_out, self.now = statuses, [], log_text, push_out, 0.0

    def __call__(self, argv):
        self.calls.append(argv)
        out, code = "", 0
        if argv[1:3] == ("kernels", "status"):
            status = self.statuses[argv[3]].pop(0)
            if status == "blip":
                return subprocess.CompletedProcess(argv, 1, "", "503 Service Unavailable")
            out = f'{argv[3]} has status "KernelWorkerStatus.{status.upper()}"'
        elif argv[1:3] == ("datasets", "status"):
            out = "ready"
        elif argv[1:3] == ("kernels", "push"):
            out = self.push_out or "Kernel version 3 successfully pushed.  Please check progress at https://…"
        elif argv[1:3] == ("kernels", "logs"):
            out = json.dumps([{"stream_name": "stdout", "time": 1.0, "data": line + "\n"}
                              for line in self.log_text.splitlines()])
        return subprocess.CompletedProcess(argv, code, out, "")

    def sleep(self, seconds):
        self.now += seconds

    def clock(self):
        return self.now


def _push(steps, fake, lines=None, poll_s=60.0):
    log = lines.append if lines is not None else (lambda _: None)
    return kaggle.push(steps, dry_run=False, poll_s=poll_s, log=log, runner=fake, sleep=fake.sleep, clock=fake.clock)


def test_push_waits_for_each_kernel_whose_output_the_next_reads(tmp_path):
    params = {"01": {"model_dir": "/kaggle/input/m"}, "02": {"model_dir": "/kaggle/input/m"}}
    kaggle.build(tmp_path / "b", "alice", _project(tmp_path), wheels=False, params=params)
    steps = kaggle.push_plan(tmp_path / "b", "alice")
    waits = [s.argv[-1] for s in steps if s.wait == "kernel"]
    assert waits == ["alice/arena-distill-01-teacher-training", "alice/arena-distill-02-distillation",
                     "alice/arena-distill-03-lora-merge"]  # 04 and 05 feed no kernel
    assert not any("student-gptq" in str(s) for s in steps)  # not built (no --run-dir): not pushed
    order = [str(s) for s in steps]
    assert order.index("kaggle kernels status alice/arena-distill-01-teacher-training") < \
        order.index(f"kaggle kernels push -p {tmp_path / 'b' / 'kernels' / 'arena-distill-02-distillation'}")
    fake = _FakeKaggle({waits[0]: ["complete", "queued", "blip", "running", "complete"],  # the old run's status first
                        waits[1]: ["running", "complete"], waits[2]: ["running", "complete"]})
    assert _push(steps, fake) == 0
    assert [c[1:3] for c in fake.calls].count(("kernels", "push")) == 6
    assert fake.statuses[waits[0]] == []  # the stale "complete" did not end the wait; one failed call was retried


def test_a_kernel_never_seen_running_or_a_push_that_prints_an_error_stops_the_chain(tmp_path):
    params = {"01": {"model_dir": "/kaggle/input/m"}, "02": {"model_dir": "/kaggle/input/m"}}
    kaggle.build(tmp_path / "b", "alice", _project(tmp_path), wheels=False, params=params)
    steps = kaggle.push_plan(tmp_path / "b", "alice", only=("01", "02"))
    fake = _FakeKaggle({"alice/arena-distill-01-teacher-training": ["complete"] * 20})
    lines: list[str] = []
    assert _push(steps, fake, lines) == 1 and any("never seen queued or running" in line for line in lines)
    fake = _FakeKaggle({}, push_out="Kernel push error: Notebook not found")  # kaggle 2.x exits 0 here
    assert _push(steps, fake) == 1
    assert [c[1:3] for c in fake.calls].count(("kernels", "push")) == 1  # nothing after it


def test_a_failed_upstream_kernel_stops_the_push_and_prints_its_log(tmp_path):
    params = {"01": {"model_dir": "/kaggle/input/m"}, "02": {"model_dir": "/kaggle/input/m"}}
    kaggle.build(tmp_path / "b", "alice", _project(tmp_path), wheels=False, params=params)
    steps = kaggle.push_plan(tmp_path / "b", "alice", only=("01", "02"))
    fake = _FakeKaggle({"alice/arena-distill-01-teacher-training": ["running", "error"]},
                       log_text="cell 4\nCUDA out of memory\n")
    lines: list[str] = []
    assert _push(steps, fake, lines) == 1
    logs = tmp_path / "b" / "logs" / "arena-distill-01-teacher-training"
    assert ("kaggle", "kernels", "output", "alice/arena-distill-01-teacher-training", "-p", str(logs), "-o",
            "--file-pattern", r"\.(log|txt)$") in fake.calls  # its logs, not its model files
    assert any(line.endswith("cell 4\nCUDA out of memory") for line in lines)  # the JSON records read as text
    assert (logs / "kernel.log").read_text() == "cell 4\nCUDA out of memory\n"
    assert not any(c[1:3] == ("kernels", "push") and c[-1].endswith("02-distillation") for c in fake.calls)


def test_the_submission_kernel_takes_the_model_from_04s_output_when_the_student_is_not_attached(tmp_path):
    inputs = tmp_path / "input"
    quantized = inputs / "arena-distill-04-quantization" / "runs" / "teacher" / "quantized"
    quantized.mkdir(parents=True)
    (quantized / "config.json").write_text("{}")
    lines: list[str] = []
    student = "/kaggle/input/arena-distill-student-gptq"
    got = kaggle.chain_model(student, "arena-distill-04-quantization", env="kaggle", input_root=inputs,
                             log=lines.append)
    assert got == str(quantized) and "is not attached" in lines[0]
    assert kaggle.chain_model(tmp_path, "x", env="kaggle", input_root=inputs, log=lines.append) == str(tmp_path)
    assert kaggle.chain_model("zoo:smollm2-135m", "x", env="local", log=lines.append) == "zoo:smollm2-135m"
    with pytest.raises(FileNotFoundError, match="attach the student dataset"):
        kaggle.chain_model(student, "arena-distill-04-quantization", env="local", log=lines.append)


def test_links_into_a_kernel_not_attached_are_reported_and_copies_are_whole(tmp_path):
    inputs = tmp_path / "input"
    source = _kernel_output(inputs, "arena-distill-03-lora-merge")
    (source / "merged").mkdir()
    (source / "merged" / "model.safetensors").symlink_to(tmp_path / "gone" / "model.safetensors")  # 02's, not here
    (source / "teachers" / "t" / "x.partial").write_bytes(b"half")  # 03's own interrupted copy: not brought
    run = tmp_path / "working" / "teacher"
    (run / "teachers" / "t").mkdir(parents=True)
    (run / "teachers" / "t" / "big.safetensors.partial").write_bytes(b"y" * 10)  # a copy killed mid-way here
    lines: list[str] = []
    kaggle.chain_run(run, "arena-distill-03-lora-merge", env="kaggle", input_root=inputs, log=lines.append)
    assert any("1 files of arena-distill-03-lora-merge's output are links" in line and "merged/model.safetensors"
               in line for line in lines)
    big = run / "teachers" / "t" / "big.safetensors"
    assert not big.is_symlink() and big.read_bytes() == b"y" * 5000  # copied again, whole, then renamed
    assert not list(run.rglob("*.partial")) or list(run.rglob("*.partial")) == []
    assert not (run / "teachers" / "t" / "x.partial").exists()


def test_dataset_waits_and_parameter_values():
    step = kaggle.PushStep(("kaggle", "datasets", "status", "alice/x"), "wait", wait="dataset")
    assert kaggle._state(step, "failed", False, 0.0)[0] == "the upload failed"
    assert kaggle._state(step, "ready", False, 0.0) == ("waiting", False)  # maybe the previous version's
    assert kaggle._state(step, "ready", True, 0.0)[0] == "done" and kaggle._state(step, "ready", False, 61)[0] == "done"
    assert kaggle.parse_params(["05:time_budget=NaN", "05:tta=false", "05:devices=cpu:2"]) == \
        {"05": {"time_budget": "NaN", "tta": False, "devices": "cpu:2"}}
    assert kaggle.log_text("plain text\n") == "plain text\n"
    assert kaggle.log_text('{"stream_name": "stderr", "time": 2, "data": "Traceback"}\n') == "Traceback"
    truncated = '[{"stream_name":"stdout","time":1,"data":"a\\n"}\n,{"stream_name":"stderr","time":2,"data":"b"}\n'
    assert kaggle.log_text(truncated) == "a\nb"  # Kaggle's log, cut before its closing bracket
