"""Kaggle, Colab or local: where things are, and how the suite gets onto Kaggle.

Paths — every location a stage uses comes from here; nothing else in the package hard-codes one:
- Kaggle: competition data in ``/kaggle/input/lmsys-chatbot-arena``, attached datasets in
  ``/kaggle/input/<slug>``, outputs and checkpoints under ``/kaggle/working``.
- Colab: outputs and checkpoints under ``/content/drive/MyDrive/arena-distill`` when Drive is mounted (work
  survives a dropped session), else ``/content`` (with a warning: a dropped session loses it).
- Local: outputs under ``./runs``; the data folder must be given (or the demo writes one).
- The submission kernel's run: ``submission_run`` tells Kaggle's scoring rerun (``KAGGLE_IS_COMPETITION_RERUN``:
  the hidden test set, in full) from the interactive / save run (the 3 public rows: a quick full-path check).

The suite — six kernels (one per numbered notebook) and two datasets (the wheels, the quantised student):
- ``kernel_metadata`` / ``dataset_metadata`` generate the JSON; ``enable_internet`` is always written
  ``false`` and every GPU kernel names ``NvidiaTeslaT4`` (2×T4).
- ``validate_*`` check offline everything ``kaggle`` checks before it goes online, and what it does not check
  but costs a run; every problem names the file and the field.
- ``build`` writes the folders to upload (wheel + offline wheelhouse, the student, the kernels);
  ``push_plan`` / ``push`` print and run the exact ``kaggle`` commands in dependency order, datasets with
  ``--dir-mode zip`` (the CLI's default silently drops subfolders).
- Credentials are only looked for where the CLI looks (``credential_source``); they are never read out,
  copied, logged or written by this module — the ``kaggle`` CLI reads them itself.

This module never imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import unicodedata
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPETITION = "lmsys-chatbot-arena"
KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
COLAB_DRIVE = Path("/content/drive/MyDrive")


def detect_env() -> str:
    """"kaggle", "colab" or "local" (from the variables each platform sets)."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.environ.get("KAGGLE_URL_BASE"):
        return "kaggle"
    if os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU") is not None:
        return "colab"
    return "local"


RERUN_VARIABLE = "KAGGLE_IS_COMPETITION_RERUN"  # set by Kaggle in the scoring rerun on the hidden test set
PUBLIC_TEST_ROWS = 3  # what test.csv holds in the interactive / save run
SUBMIT_COMMAND = f"kaggle competitions submit -c {COMPETITION} -k USER/KERNEL -v VERSION -m MESSAGE"


@dataclass(frozen=True)
class SubmissionRun:
    """Which run of the submission kernel this is, and what it does: ``rerun`` (Kaggle's scoring rerun: the
    hidden test set, in full), ``save`` (the interactive or save run on Kaggle: the public rows through the
    whole path, a quick check), ``local`` (anywhere else: the given dry-run ``fraction``)."""

    mode: str
    fraction: float
    message: str


def submission_run(test_rows: int, fraction: float = 1.0, env: str | None = None,
                   environ: Mapping[str, str] | None = None) -> SubmissionRun:
    """What the submission kernel should do in this run (notebook 05 prints ``message`` in its first cells).

    On Kaggle a dry-run ``fraction`` < 1 is ignored — a file covering part of the test set cannot be scored;
    the save run scores the public rows (3) through the full path — packing, the model, TTA, the file and
    its validation — in a few minutes of GPU time, and the rerun that ``kaggle competitions submit`` starts
    scores the hidden test set in full."""
    environ = os.environ if environ is None else environ
    env = env or detect_env()
    ignored = f" (fraction {fraction:g} ignored: Kaggle scores whole files only)" if fraction < 1 else ""
    if environ.get(RERUN_VARIABLE):
        return SubmissionRun("rerun", 1.0, f"competition rerun ({RERUN_VARIABLE} set): scoring all {test_rows} "
                                           f"rows of the hidden test set{ignored}")
    if env == "kaggle":
        what = (f"the {test_rows} public test rows" if test_rows <= 10 * PUBLIC_TEST_ROWS
                else f"{test_rows} rows (more than the {PUBLIC_TEST_ROWS} public ones: all of them)")
        return SubmissionRun("save", 1.0, f"interactive / save run: {what} through the whole path as a check"
                                          f"{ignored}; the hidden test set is scored in the rerun that a "
                                          f"submission starts: {SUBMIT_COMMAND}")
    return SubmissionRun("local", fraction, f"local run: {test_rows} rows"
                                            + (f", a dry run on {fraction:g} of them" if fraction < 1 else ""))


def competition_dir(explicit: str | Path | None = None, env: str | None = None) -> Path:
    """The folder holding train.csv / test.csv: ``explicit`` if given, else the platform's default.

    Raises ``FileNotFoundError`` naming the folder tried, and how to pass one, when none is found.
    """
    if explicit is not None:
        path = Path(explicit)
    elif (env or detect_env()) == "kaggle":
        path = KAGGLE_INPUT / COMPETITION
    else:
        raise FileNotFoundError("no data folder given: pass data_dir=… (or run `lmsys demo` to make one)")
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} does not exist")
    return path


def runs_root(env: str | None = None) -> Path:
    """Where run folders (and the checkpoints inside them) live on this platform."""
    env = env or detect_env()
    if env == "kaggle":
        return KAGGLE_WORKING / "runs"
    if env == "colab":
        if COLAB_DRIVE.is_dir():
            return COLAB_DRIVE / "arena-distill" / "runs"
        warnings.warn("Google Drive is not mounted: runs go to /content/runs and are lost when the session "
                      "drops (drive.mount('/content/drive') first to keep them)", stacklevel=2)
        return Path("/content") / "runs"
    return Path("runs")


def dataset_dir(slug: str, explicit: str | Path | None = None, env: str | None = None) -> Path:
    """An attached dataset's folder (wheels, model weights): ``explicit`` if given, else on Kaggle
    ``/kaggle/input/<slug>`` (``input_dir``: nested layouts too). Raises ``FileNotFoundError`` naming the folder tried."""
    if explicit is not None:
        path = Path(explicit)
    elif (env or detect_env()) == "kaggle":
        path = input_dir(slug) or KAGGLE_INPUT / slug
    else:
        raise FileNotFoundError(f"dataset {slug!r}: pass its folder (it is /kaggle/input/{slug} on Kaggle)")
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder {path} does not exist (attach {slug!r} to the kernel)")
    return path


def resolve_run_dir(run_dir: str | Path, env: str | None = None) -> Path:
    """A notebook's run folder on this platform: an absolute path as given; a relative one under
    ``runs_root()`` — ``"runs/teacher"`` and ``"teacher"`` alike become ``<runs root>/teacher`` (``runs/teacher``
    locally, ``/kaggle/working/runs/teacher`` on Kaggle, Drive on Colab when mounted). Created."""
    path = Path(run_dir)
    if not path.is_absolute():
        parts = path.parts[1:] if path.parts[:1] == ("runs",) else path.parts
        path = runs_root(env).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# bytes: an upstream file this big is linked, not copied (Kaggle keeps 20 GB of output). A link lives only
# while that kernel is attached: the next kernel in the chain sees it dangling (reported, never silently).
LINK_ABOVE = 2**30


def input_dir(slug: str, input_root: str | Path = KAGGLE_INPUT) -> Path | None:
    """Where an attached dataset or kernel output is mounted: ``/kaggle/input/<slug>`` (or one or two folders
    deeper, as newer Kaggle layouts nest sources by kind and owner); None when it is not attached."""
    root = Path(input_root)
    for candidate in (root / slug, *sorted(root.glob(f"*/{slug}")), *sorted(root.glob(f"*/*/{slug}"))):
        if candidate.is_dir():
            return candidate
    return None


def find_run(output: Path, name: str) -> Path:
    """The run folder (the one holding ``data/folds.parquet``) inside a kernel's output: the one called
    ``name``, or the only one. Raises ``FileNotFoundError`` listing what is there."""
    runs = sorted({p.parent.parent for p in output.rglob("data/folds.parquet")})
    named = [r for r in runs if r.name == name]
    if len(named) == 1 or len(runs) == 1:
        return (named or runs)[0]
    found = ", ".join(str(r.relative_to(output)) for r in runs) or "none"
    raise FileNotFoundError(f"{output}: no single run folder {name!r} in this kernel's output (run folders: {found}); "
                            "set run_dir to the one to continue")


def chain_run(run_dir: str | Path, upstream: str | None = None, env: str | None = None,
              input_root: str | Path = KAGGLE_INPUT, log: Callable[[str], None] = print) -> Path:
    """The run folder a chained notebook works in, with its inputs in place, and a line saying where they came
    from. On Kaggle, when the kernel ``upstream`` (the previous notebook's kernel, a ``kernel_sources`` entry) is
    attached, its run folder is brought from ``/kaggle/input/<upstream>/…`` into the writable run folder:
    files copied (over ``LINK_ABOVE`` linked), never over a file already there — a restarted session keeps its
    own work. Elsewhere, or without it attached, the run folder (``resolve_run_dir``) as it is."""
    path = resolve_run_dir(run_dir, env)
    output = input_dir(upstream, input_root) if upstream and (env or detect_env()) == "kaggle" else None
    if output is None:
        where = f" (kernel {upstream}'s output is not attached)" if upstream and (env or detect_env()) == "kaggle" else ""
        log(f"inputs: the run folder {path}{where}")
        return path
    source = find_run(output, path.name)
    copied, linked, dangling = _bring(source, path)
    log(f"inputs: kernel {upstream}'s output {source} → {path} ({copied} files copied, {linked} linked, "
        "files already there kept)")
    if dangling:
        log(f"WARNING: {len(dangling)} files of {upstream}'s output are links into a kernel not attached here "
            f"(e.g. {dangling[0]}): attach that kernel too (kernel_sources) if this stage reads them")
    return path


def _bring(source: Path, dest: Path) -> tuple[int, int, list[str]]:
    """Copy (or, over ``LINK_ABOVE``, link) every file of ``source`` that ``dest`` lacks; a copy is written
    under a temporary name and renamed, so a session killed mid-copy leaves no truncated file behind.
    Returns the counts and the links in ``source`` that point nowhere here."""
    copied, linked, dangling = 0, 0, []
    for file in sorted(source.rglob("*")):
        if file.is_symlink() and not file.exists():
            dangling.append(str(file.relative_to(source)))
            continue
        target = dest / file.relative_to(source)
        if not file.is_file() or file.name.endswith(".partial") or target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if file.stat().st_size > LINK_ABOVE:
            target.symlink_to(file.resolve())
            linked += 1
        else:
            partial = target.with_name(target.name + ".partial")
            shutil.copy2(file, partial)
            os.replace(partial, target)
            copied += 1
    return copied, linked, dangling


def chain_model(model_dir: str | Path, upstream: str, env: str | None = None,
                input_root: str | Path = KAGGLE_INPUT, log: Callable[[str], None] = print) -> str:
    """The submission kernel's model folder: ``model_dir`` when it exists (the student dataset, a folder,
    or a ``zoo:`` / hub name, returned as given); on Kaggle without it, the ``quantized/`` folder of the
    attached kernel ``upstream``'s run (notebook 04's output: the all-Kaggle chain). Says which."""
    text = str(model_dir)
    if Path(text).is_dir() or (not Path(text).is_absolute()):  # a folder, or a zoo: / hub name
        log(f"model: {text}")
        return text
    on_kaggle = (env or detect_env()) == "kaggle"
    nested = input_dir(Path(text).name, input_root) if on_kaggle and text.startswith(str(KAGGLE_INPUT)) \
        else None  # the dataset attached, in a newer, nested input layout
    if nested is not None:
        log(f"model: {nested}")
        return str(nested)
    output = input_dir(upstream, input_root) if on_kaggle else None
    if output is not None:
        runs = sorted(p.parent for p in output.rglob("quantized/config.json"))
        if len(runs) == 1:
            log(f"model: {runs[0]} (kernel {upstream}'s output; {text} is not attached)")
            return str(runs[0])
        found = f"several quantised models ({', '.join(map(str, runs))}): set model_dir to the one to score with" \
            if runs else f"no quantized/ in it (did {upstream} finish?)"
        raise FileNotFoundError(f"{output}: {found}")
    raise FileNotFoundError(f"model folder {text} does not exist: attach the student dataset "
                            f"({STUDENT.slug}) or the kernel {upstream} (kernel_sources), or set model_dir")


class ParameterError(ValueError):
    """A notebook parameter that must be set is empty: raised in the notebook's first cells, before the GPU."""


def require_parameters(notebook: str, config: Any = None, **values: tuple[Any, str]) -> None:
    """Stop a notebook at once when a required parameter is empty (``name=(value, what to set it to)``);
    ``config``: a stage config file was given, which carries them instead."""
    if config:
        return
    empty = [f"{name} is empty: set it to {hint}" for name, (value, hint) in values.items() if value in ("", None)]
    if empty:
        raise ParameterError(f"{notebook}: " + "; ".join(empty) + " (papermill -p NAME VALUE, the parameters cell, "
                             "or `lmsys kaggle build --param NB:NAME=VALUE`)")


def run_dir(name: str, root: str | Path | None = None) -> Path:
    """``<runs root>/<name>``, created."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"run name {name!r} must be a plain folder name")
    path = Path(root) if root is not None else runs_root()
    path = path / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- the suite: what goes to Kaggle, and in which order

PLACEHOLDER_USER = "your-kaggle-username"
KERNEL_SHAPE = "NvidiaTeslaT4"  # = 2×T4; without it Kaggle may hand out a P100, which its CUDA 12.8 torch cannot use
TITLE_MIN, TITLE_MAX = 5, 50    # kernel titles (the CLI checks ≥ 5; the site truncates past 50)
DATASET_SLUG_MIN, DATASET_SLUG_MAX = 6, 50  # dataset titles and slugs (the CLI's own limits)
_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
KERNEL_KEYS = {"id", "id_no", "title", "code_file", "language", "kernel_type", "is_private", "enable_gpu",
               "enable_tpu", "enable_internet", "machine_shape", "dataset_sources", "competition_sources",
               "kernel_sources", "model_sources", "keywords", "docker_image", "docker_image_pinning_type"}
DATASET_KEYS = {"id", "id_no", "title", "subtitle", "description", "licenses", "keywords", "resources",
                "collaborators", "data", "isPrivate", "expectedUpdateFrequency", "userSpecifiedSources"}


def slugify(text: str) -> str:
    """Kaggle's slug of a title: the CLI compares the kernel id with python-slugify's ``slugify(title)``, used
    here when installed (it comes with ``kaggle``). Without it: lower case, every run of characters other than
    ASCII letters and digits one hyphen, accents dropped — the same for ASCII titles, which the suite uses.
    ``slugify("arena-distill 05 inference 2xT4")`` → ``"arena-distill-05-inference-2xt4"``."""
    try:
        from slugify import slugify as cli_slugify
    except ImportError:
        folded = "".join(unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "-" for ch in text)
        return re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    return cli_slugify(text)


@dataclass(frozen=True)
class DatasetSpec:
    """A Kaggle dataset of the suite; ``content`` says what ``lmsys kaggle build`` puts in it."""

    title: str
    content: str

    @property
    def slug(self) -> str:
        return slugify(self.title)


@dataclass(frozen=True)
class KernelSpec:
    """A Kaggle kernel of the suite: one numbered notebook, what it reads, whether it needs the T4s."""

    notebook: str
    title: str
    gpu: bool
    datasets: tuple[str, ...] = ()   # dataset slugs of the suite it attaches
    kernels: tuple[str, ...] = ()    # kernel slugs whose output it reads (pushed before it)
    submission: bool = False         # writes submission.csv: the competition must be a source
    required: tuple[str, ...] = ()   # notebook parameters that must not be empty (else it fails at once)

    @property
    def slug(self) -> str:
        return slugify(self.title)


WHEELS = DatasetSpec("arena-distill wheels", "the lmsys_lib wheel and an offline wheelhouse of what Kaggle lacks")
STUDENT = DatasetSpec("arena-distill student GPTQ", "the quantised student (a run's quantized/ folder)")
SUITE_DATASETS = (WHEELS, STUDENT)
SUITE_KERNELS = (
    KernelSpec("00_eda.ipynb", "arena-distill 00 EDA", gpu=False, datasets=(WHEELS.slug,)),
    KernelSpec("01_teacher_training.ipynb", "arena-distill 01 teacher training", gpu=True,
               datasets=(WHEELS.slug,), required=("model_dir",)),
    KernelSpec("02_distillation.ipynb", "arena-distill 02 distillation", gpu=True, datasets=(WHEELS.slug,),
               kernels=("arena-distill-01-teacher-training",), required=("model_dir",)),
    KernelSpec("03_lora_merge.ipynb", "arena-distill 03 LoRA merge", gpu=False, datasets=(WHEELS.slug,),
               kernels=("arena-distill-02-distillation",)),
    KernelSpec("04_quantization.ipynb", "arena-distill 04 quantization", gpu=True, datasets=(WHEELS.slug,),
               kernels=("arena-distill-03-lora-merge",)),
    KernelSpec("05_inference_2xT4.ipynb", "arena-distill 05 inference 2xT4", gpu=True,
               datasets=(WHEELS.slug, STUDENT.slug), submission=True),
)


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """A notebook's parameters as it will run: its ``parameters`` cell, then any ``injected-parameters`` cell
    (papermill's, or ``inject_parameters``'s) on top. Values are Python literals; anything else is kept as
    its source text."""
    import ast

    values: dict[str, Any] = {}
    cells = json.loads(Path(path).read_text(encoding="utf-8")).get("cells", [])
    for tag in ("parameters", "injected-parameters"):
        for cell in (c for c in cells if tag in c.get("metadata", {}).get("tags", [])):
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            for node in ast.parse(source).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        values[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError:
                        values[node.targets[0].id] = ast.get_source_segment(source, node.value)
    return values


def inject_parameters(path: str | Path, params: Mapping[str, Any]) -> None:
    """Set notebook parameters the way papermill does: a code cell tagged ``injected-parameters`` right after
    the ``parameters`` cell (replacing an earlier one). Unknown names are an error naming the notebook."""
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    known = notebook_parameters(path)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{path.name}: no parameter {unknown}; it has {sorted(known)}")
    cells = [c for c in nb["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    at = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "# Parameters set by `lmsys kaggle build --param`\n" + "".join(
        f"{name} = {value!r}\n" for name, value in params.items())
    cells.insert(at + 1, {"cell_type": "code", "execution_count": None, "id": "injected-parameters",
                          "metadata": {"tags": ["injected-parameters"]}, "outputs": [],
                          "source": source.splitlines(keepends=True)})
    nb["cells"] = cells
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_params(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--param 01:model_dir=/kaggle/input/x`` → ``{"01": {"model_dir": "/kaggle/input/x"}}`` (values read as
    JSON when they parse — numbers, booleans, lists — else as text)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        nb, colon, rest = item.partition(":")
        name, eq, raw = rest.partition("=")
        if not colon or not eq or not nb or not name:
            raise ValueError(f"--param {item!r}: expected NB:NAME=VALUE, e.g. 01:model_dir=/kaggle/input/gemma-2")
        try:
            value = json.loads(raw, parse_constant=_not_json)  # NaN / Infinity: not Python literals, kept as text
        except (json.JSONDecodeError, ValueError):
            value = raw
        out.setdefault(nb, {})[name] = value
    return out


def _not_json(text: str) -> Any:
    raise ValueError(text)


def kernel_metadata(spec: KernelSpec, user: str, code_file: str) -> dict[str, Any]:
    """The kernel-metadata.json of a suite kernel; ``enable_internet`` is always written (the CLI defaults
    it to true) and a GPU kernel always names the 2×T4 shape."""
    meta: dict[str, Any] = {
        "id": f"{user}/{spec.slug}", "title": spec.title, "code_file": code_file, "language": "python",
        "kernel_type": "notebook", "is_private": True, "enable_gpu": spec.gpu, "enable_tpu": False,
        "enable_internet": False}
    if spec.gpu:
        meta["machine_shape"] = KERNEL_SHAPE
    meta |= {"dataset_sources": [f"{user}/{slug}" for slug in spec.datasets],
             "competition_sources": [COMPETITION],
             "kernel_sources": [f"{user}/{slug}" for slug in spec.kernels], "model_sources": []}
    return meta


# Licences. The wheels: third-party packages, each under its own licence (lmsys_lib itself: Apache-2.0).
# A model: the base model's terms travel with every derivative (a Gemma student stays under the Gemma Terms
# of Use; CC0 would misstate them). Kaggle's licence name for these is "other", named in the description.
WHEELS_LICENCE = ("the lmsys_lib wheel (Apache-2.0) and unmodified third-party wheels, each under the licence in "
                  "its own metadata")
MODEL_LICENCES = {  # model_type of the checkpoint's config.json → the terms a derivative carries
    "gemma": "the Gemma Terms of Use (https://ai.google.dev/gemma/terms): this model is derived from Gemma",
    "gemma2": "the Gemma Terms of Use (https://ai.google.dev/gemma/terms): this model is derived from Gemma",
    "gemma3": "the Gemma Terms of Use (https://ai.google.dev/gemma/terms): this model is derived from Gemma",
    "gemma3_text": "the Gemma Terms of Use (https://ai.google.dev/gemma/terms): this model is derived from Gemma",
}
UNKNOWN_MODEL_LICENCE = ("the licence of the base model it was fine-tuned from (name it: licenses and description "
                         "in datasets-metadata/arena-distill-student-gptq/dataset-metadata.json)")


def model_licence(model_type: str | None) -> tuple[str, bool]:
    """The terms a fine-tuned model of ``model_type`` is shared under, and whether they are known from the type
    alone (``llama`` covers Meta's Llama and Apache-licensed SmolLM2 alike: not known)."""
    known = MODEL_LICENCES.get(str(model_type))
    return (known, True) if known else (UNKNOWN_MODEL_LICENCE, False)


def dataset_metadata(spec: DatasetSpec, user: str, terms: str | None = None) -> dict[str, Any]:
    """The dataset-metadata.json of a suite dataset (private; one licence, as the CLI requires): licence
    "other", the terms named in the description (``terms``: a model's, from ``model_licence``)."""
    terms = terms or (WHEELS_LICENCE if spec == WHEELS else UNKNOWN_MODEL_LICENCE)
    return {"title": spec.title, "id": f"{user}/{spec.slug}", "subtitle": _subtitle(spec.content),
            "description": f"{spec.content} (arena-distill). Licence: {terms}.",
            "licenses": [{"name": "other"}], "isPrivate": True}


def _subtitle(text: str) -> str:
    return text[:80] if len(text) >= 20 else f"{text} (arena-distill)"


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- the committed files are the user's: overlays

BUILD_KEYS = ("code_file",)  # the build's own: its notebook sits beside the metadata


def kernel_template(spec: KernelSpec) -> dict[str, Any]:
    """What ``lmsys kaggle metadata`` commits for a kernel (placeholder user, code_file in ``notebooks/``)."""
    return kernel_metadata(spec, PLACEHOLDER_USER, f"../../notebooks/{spec.notebook}")


def dataset_template(spec: DatasetSpec) -> dict[str, Any]:
    """What ``lmsys kaggle metadata`` commits for a dataset."""
    return dataset_metadata(spec, PLACEHOLDER_USER)


def user_edits(committed: dict[str, Any] | None, template: dict[str, Any]) -> dict[str, Any]:
    """The user's edits of a committed metadata file: every key whose value differs from the template (a list
    whole: entries added or removed), and ``REMOVED`` for a generated key the user set to ``null`` (a key
    missing from the file is not an edit: the generator's value applies). The owner the file
    was written for (``lmsys kaggle metadata --user alice``) counts as the placeholder, so building for
    another user is not an edit. ``{}`` for no file."""
    if not committed:
        return {}
    owner = str(committed.get("id", "")).split("/")[0]
    if owner and owner != PLACEHOLDER_USER:
        committed = _with_user(committed, PLACEHOLDER_USER, owner)
    edits: dict[str, Any] = {k: v for k, v in committed.items() if k not in template or template[k] != v}
    for key, value in committed.items():  # `"key": null` removes a generated key; a missing key is not an edit
        if value is None and key in template and key not in BUILD_KEYS + ("id",):
            edits[key] = REMOVED
    return edits


REMOVED = "(removed by the user)"


def apply_edits(generated: dict[str, Any], edits: dict[str, Any], user: str) -> dict[str, Any]:
    """``generated`` with the user's ``edits`` on top: an edited key takes the user's value (a list as the
    user wrote it), a removed key is dropped, the placeholder owner becomes ``user``; ``code_file`` stays
    the build's."""
    out = json.loads(json.dumps(generated))
    for key, value in _with_user(edits, user).items():
        if key in BUILD_KEYS:
            continue
        if value == REMOVED:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _with_user(value: Any, user: str, owner: str = PLACEHOLDER_USER) -> Any:
    """Every ``owner/…`` string in ``value`` as ``user/…``."""
    if isinstance(value, str) and value.startswith(owner + "/"):
        return user + value[len(owner):]
    if isinstance(value, list):
        return [_with_user(v, user, owner) for v in value]
    if isinstance(value, dict):
        return {k: _with_user(v, user, owner) for k, v in value.items()}
    return value


def read_committed(path: Path) -> dict[str, Any] | None:
    """A committed metadata file (None when there is none); unreadable JSON is an error naming the file."""
    if not path.is_file():
        return None
    data, problems, _ = _read_meta(path)
    if data is None:
        raise MetadataError(problems)
    return data


def write_repo_metadata(repo: str | Path, user: str = PLACEHOLDER_USER, reset: bool = False) -> list[Path]:
    """(Re)write ``kernel-metadata/<slug>/`` (code_file pointing at ``notebooks/``) and
    ``datasets-metadata/<slug>/`` in the checkout — the files ``lmsys kaggle build`` lays the user's edits of
    onto what it generates. The user's edits of the files already there are kept (``reset``: written anew)."""
    repo = Path(repo)
    files = [(repo / "kernel-metadata" / k.slug / "kernel-metadata.json", kernel_template(k)) for k in SUITE_KERNELS]
    files += [(repo / "datasets-metadata" / d.slug / "dataset-metadata.json", dataset_template(d))
              for d in SUITE_DATASETS]
    paths = []
    for path, template in files:
        edits = {} if reset else user_edits(read_committed(path), template)
        paths.append(write_json(path, apply_edits(_with_user(template, user), edits, user)))
    return paths


# ---------------------------------------------------------------- offline validation

@dataclass(frozen=True)
class MetadataProblem:
    """One problem in one metadata file, naming the field: ``<file>: <field>: <message>``."""

    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


class MetadataError(ValueError):
    """Metadata that ``kaggle`` would refuse, or accept and then do the wrong thing with."""

    def __init__(self, problems: list[MetadataProblem]):
        self.problems = problems
        super().__init__(f"{len(problems)} metadata problem(s):\n" + "\n".join(f"  {p}" for p in problems))


def _read_meta(path: Path) -> tuple[dict[str, Any] | None, list[MetadataProblem], Callable[[str, str], None]]:
    """The metadata object (None when unreadable), its problem list, and ``add(field, message)`` filling it."""
    problems: list[MetadataProblem] = []

    def add(field: str, message: str) -> None:
        problems.append(MetadataProblem(str(path), field, message))

    if not path.is_file():
        add("(file)", "missing")
        return None, problems, add
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        add("(file)", f"not valid JSON: {err}")
        return None, problems, add
    if not isinstance(data, dict):
        add("(file)", "must hold one JSON object")
        return None, problems, add
    return data, problems, add


def _check_ref(value: Any, field: str, add: Callable[[str, str], None], slug_len: tuple[int, int] = (1, 50),
               ) -> str | None:
    """``owner/slug`` with both parts well-formed; returns the slug."""
    if not isinstance(value, str) or value.count("/") != 1:
        add(field, f"{value!r} must be 'owner/slug' (no version)")
        return None
    owner, slug = value.split("/")
    if not owner or not re.fullmatch(r"[A-Za-z0-9_-]+", owner):
        add(field, f"{value!r}: owner {owner!r} is not a Kaggle user name")
    if not _SLUG.match(slug) or not slug_len[0] <= len(slug) <= slug_len[1]:
        add(field, f"{value!r}: slug {slug!r} must be lower-case letters, digits and single hyphens, "
                   f"{slug_len[0]}–{slug_len[1]} characters")
    return slug


def _check_sources(meta: dict[str, Any], add: Callable[[str, str], None]) -> None:
    for field, slug_len in (("dataset_sources", (DATASET_SLUG_MIN, DATASET_SLUG_MAX)), ("kernel_sources", (1, 50))):
        values = meta.get(field, [])
        if not isinstance(values, list):
            add(field, "must be a list of 'owner/slug' strings")
            continue
        for i, value in enumerate(values):
            _check_ref(value, f"{field}[{i}]", add, slug_len)
    for field in ("competition_sources", "model_sources"):
        values = meta.get(field, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
            add(field, "must be a list of non-empty strings")
    for i, value in enumerate(meta.get("model_sources", []) or []):
        if isinstance(value, str) and value.count("/") != 4:
            add(f"model_sources[{i}]", f"{value!r} must be 'owner/model/framework/variation/version'")


def _check_identity(meta: dict[str, Any], known: set[str], lengths: tuple[int, int], for_push: bool,
                    add: Callable[[str, str], None]) -> tuple[str | None, str | None]:
    """Unknown keys, the title's length, a well-formed ``owner/slug`` id (not the placeholder user when
    ``for_push``); returns the title and slug when they are well-formed."""
    for key in sorted(set(meta) - known):
        add(key, f"unknown key (the CLI ignores it silently); known: {', '.join(sorted(known))}")
    title = meta.get("title")
    if not isinstance(title, str) or not lengths[0] <= len(title) <= lengths[1]:
        add("title", f"{title!r} must be a string of {lengths[0]}–{lengths[1]} characters")
        title = None
    if "id" not in meta:
        add("id", "missing: 'owner/slug'")
        return title, None
    slug = _check_ref(meta["id"], "id", add, lengths)
    if for_push and str(meta["id"]).startswith(PLACEHOLDER_USER + "/"):
        add("id", f"still the placeholder user {PLACEHOLDER_USER!r}: build with --user")
    return title, slug


def validate_kernel_metadata(folder: str | Path, submission: bool | None = None,
                             for_push: bool = False) -> list[MetadataProblem]:
    """Every check ``kaggle kernels push`` makes before it goes online, plus the ones it does not make and that
    cost a run: internet written false, the 2×T4 shape for a GPU kernel, well-formed sources, the competition
    for the submission kernel (``submission=None``: decided by the suite's table), no unknown keys (the CLI
    ignores a misspelt key silently). ``for_push``: the placeholder user is an error too."""
    path = Path(folder) / "kernel-metadata.json"
    meta, problems, add = _read_meta(path)
    if meta is None:
        return problems
    title, slug = _check_identity(meta, KERNEL_KEYS, (TITLE_MIN, TITLE_MAX), for_push, add)
    if slug and title and slug != slugify(title):
        add("id", f"slug {slug!r} must equal slugify(title) = {slugify(title)!r}")
    _check_code_file(Path(folder), meta, add)
    if meta.get("language") != "python":
        add("language", f"{meta.get('language')!r}: must be 'python'")
    if meta.get("kernel_type") not in ("notebook", "script"):
        add("kernel_type", f"{meta.get('kernel_type')!r}: must be 'notebook' or 'script'")
    _check_runtime(meta, add)
    _check_sources(meta, add)
    if submission is None:
        submission = any(k.slug == slug and k.submission for k in SUITE_KERNELS)
    if submission and COMPETITION not in (meta.get("competition_sources") or []):
        add("competition_sources", f"the submission kernel must list {COMPETITION!r}")
    return problems


def _check_code_file(folder: Path, meta: dict[str, Any], add: Callable[[str, str], None]) -> None:
    code = meta.get("code_file")
    if not isinstance(code, str) or not code:
        add("code_file", "missing: the notebook or script to push, relative to the folder")
        return
    path = folder / code  # the CLI joins it to the folder exactly like this
    if not path.is_file():
        add("code_file", f"{code!r} not found (looked for {path})")
    elif meta.get("kernel_type") == "notebook":
        try:
            cells = json.loads(path.read_text(encoding="utf-8")).get("cells")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            add("code_file", f"{code!r} is not a notebook: {err}")
            return
        if not isinstance(cells, list):
            add("code_file", f"{code!r} has no cells")


def _check_runtime(meta: dict[str, Any], add: Callable[[str, str], None]) -> None:
    for key in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        if key in meta and not isinstance(meta[key], bool):
            add(key, f"{meta[key]!r} must be true or false (a JSON boolean)")
    if "enable_internet" not in meta:
        add("enable_internet", "missing: write false — the CLI defaults it to true, and competition "
                               "kernels must run offline")
    elif meta["enable_internet"] is not False:
        add("enable_internet", "must be false: a code competition kernel cannot submit with internet on")
    shape = meta.get("machine_shape")
    if meta.get("enable_gpu") is True and shape is None:
        add("machine_shape", f"missing: a GPU kernel must ask for {KERNEL_SHAPE!r} (2×T4); left out, Kaggle may "
                             "give a P100, which its CUDA 12.8 torch cannot use")
    elif shape is not None and shape != KERNEL_SHAPE:
        add("machine_shape", f"{shape!r}: the suite runs on {KERNEL_SHAPE!r} (2×T4)")
    elif shape is not None and meta.get("enable_gpu") is not True:
        add("enable_gpu", f"must be true with machine_shape {shape!r}")


def validate_dataset_metadata(folder: str | Path, for_push: bool = False) -> list[MetadataProblem]:
    """The CLI's checks for ``datasets create/version`` (title and slug 6–50 characters, exactly one licence,
    subtitle 20–80), well-formed id, no unknown keys; ``for_push``: the placeholder user is an error."""
    path = Path(folder) / "dataset-metadata.json"
    meta, problems, add = _read_meta(path)
    if meta is None:
        return problems
    _check_identity(meta, DATASET_KEYS, (DATASET_SLUG_MIN, DATASET_SLUG_MAX), for_push, add)
    licenses = meta.get("licenses")
    if not isinstance(licenses, list) or len(licenses) != 1 or not isinstance(licenses[0], dict) \
            or not licenses[0].get("name"):
        add("licenses", "must be a list of exactly one {\"name\": …} licence")
    subtitle = meta.get("subtitle")
    if subtitle is not None and (not isinstance(subtitle, str) or not 20 <= len(subtitle) <= 80):
        add("subtitle", f"{subtitle!r} must be 20–80 characters")
    return problems


def validate_tree(root: str | Path, for_push: bool = False, client: bool = False) -> list[MetadataProblem]:
    """Every ``kernel-metadata.json`` and ``dataset-metadata.json`` under ``root`` (a checkout or a build);
    ``client``: also the real ``kaggle`` client's own checks (``client_problems``) of each folder ours passed."""
    root = Path(root)
    problems: list[MetadataProblem] = []
    for kind, name, check in (("kernel", "kernel-metadata.json", validate_kernel_metadata),
                              ("dataset", "dataset-metadata.json", validate_dataset_metadata)):
        for path in sorted(root.rglob(name)):
            ours = check(path.parent, for_push=for_push)
            problems += ours or (client_problems(path.parent, kind) if client else [])
    return problems


class _Offline(Exception):
    """Raised where the real client would go online: everything it checks comes before."""


def client_problems(folder: str | Path, kind: str) -> list[MetadataProblem]:
    """What the installed ``kaggle`` client itself refuses in ``folder``, found by running its own
    ``kernels_push`` / ``dataset_create_new`` up to the point where it would go online (stopped there: nothing
    is sent, no credentials are needed). ``[]`` when the client is not installed (``pip install
    'lmsys_lib[kaggle]'``): our checks above still ran."""
    from importlib import metadata

    try:
        version = metadata.version("kaggle")
    except metadata.PackageNotFoundError:
        return []
    if int(version.split(".")[0]) < 2:
        return []  # checked against the 2.x client (kagglesdk); an older one goes online another way
    try:  # the package's __init__ tries to authenticate and prints how to when it cannot: not our output
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except (Exception, SystemExit):  # a client that raises or exits when it cannot authenticate
        return []
    if not hasattr(KaggleApi, "build_kaggle_client"):
        return []
    folder = Path(folder)
    api = KaggleApi()

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise _Offline

    api.build_kaggle_client = offline  # kernels_push: every check, then the request
    api.dataset_status = offline       # dataset_create_new: every check, then "does it exist?"
    file = folder / f"{kind}-metadata.json"
    try:
        if kind == "kernel":
            api.kernels_push(str(folder))
        else:
            owner = str(json.loads(file.read_text(encoding="utf-8")).get("id", "")).split("/")[0]
            api.config_values = {**getattr(api, "config_values", {}), api.CONFIG_NAME_USER: owner}
            api.dataset_create_new(str(folder), dir_mode="zip")
    except _Offline:
        return []
    except (ValueError, KeyError, TypeError, OSError) as err:
        return [MetadataProblem(str(file), "(kaggle client)", str(err))]
    return [MetadataProblem(str(file), "(kaggle client)", "the client went on without reaching the network: "
                                                        "this check no longer matches its version")]


# ---------------------------------------------------------------- credentials: looked for the CLI's way, never read out or written

def kaggle_config_file(env: Mapping[str, str] | None = None) -> Path:
    """Where the ``kaggle`` CLI looks for kaggle.json: ``$KAGGLE_CONFIG_DIR``, else ``~/.kaggle`` when it exists,
    else ``$XDG_CONFIG_HOME/kaggle`` (``~/.config/kaggle``) on Linux."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"]) / "kaggle.json"
    if (home / ".kaggle").is_dir() or not sys.platform.startswith("linux"):
        return home / ".kaggle" / "kaggle.json"
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle" / "kaggle.json"


def credential_source(env: Mapping[str, str] | None = None) -> str | None:
    """Which of the CLI's credential sources is present (a name, never the secret), or None."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    if env.get("KAGGLE_API_TOKEN"):
        return "$KAGGLE_API_TOKEN"
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "$KAGGLE_USERNAME + $KAGGLE_KEY"
    for path in (home / ".kaggle" / "access_token", home / ".kaggle" / "access_token.txt",
                 kaggle_config_file(env)):
        if path.is_file():
            return str(path)
    return None


def kaggle_user(explicit: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The Kaggle user name: ``explicit``, else ``$KAGGLE_USERNAME``, else the ``username`` of kaggle.json
    (only that key is read)."""
    env = os.environ if env is None else env
    if explicit:
        return explicit
    if env.get("KAGGLE_USERNAME"):
        return env["KAGGLE_USERNAME"]
    path = kaggle_config_file(env)
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("username")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


# ---------------------------------------------------------------- build: the folders `kaggle` uploads

def build(out: str | Path, user: str, project_dir: str | Path, run_dir: str | Path | None = None,
          wheels: bool = True, target: Any = None, extras: tuple[str, ...] = ("train", "quantize"),
          extra_wheels: tuple[str | Path, ...] = (), params: Mapping[str, Mapping[str, Any]] | None = None,
          image: Any = None, allow_replace: tuple[str, ...] = (), log: Callable[[str], None] = print,
          ) -> dict[str, Any]:
    """Write everything the suite pushes under ``out``:

    - ``kernels/<slug>/``: the notebook and its kernel-metadata.json (code_file beside it);
    - ``datasets/arena-distill-wheels/``: the lmsys_lib wheel and the offline wheelhouse for Kaggle's image
      (``wheels=False`` skips the pip work), ``wheelhouse.json`` listing what is in it and why;
    - ``datasets/arena-distill-student-gptq/``: a copy of ``<run_dir>/quantized`` when a run is given (a
      folder whose fidelity check failed is refused).

    The wheelhouse is built for ``image`` (``wheelhouse.Image``; default ``wheelhouse.KAGGLE_IMAGE``): its
    Python, gptqmodel re-pinned to the newest release the image satisfies, and a requirement that would
    replace a package the image ships is a problem (unless named in ``allow_replace``: then it is shipped).

    ``params``: notebook parameters per kernel (``{"01": {"model_dir": "/kaggle/input/…"}}``, by notebook number
    or slug), injected the way papermill does; the committed metadata files' edits are laid on top of the
    generated metadata (``user_edits``).

    Everything is validated (``for_push`` unless ``user`` is the placeholder); returns a summary with
    ``problems`` (strings: metadata problems, wheelhouse conflicts) — empty when the build can be pushed —
    and ``warnings`` (sdists Kaggle would have to compile offline, with the command that builds their wheels).
    """
    unknown = sorted(set(params or {}) - {k.notebook[:2] for k in SUITE_KERNELS} - {k.slug for k in SUITE_KERNELS})
    if unknown:
        raise ValueError(f"--param for unknown kernels {unknown}; known: {[k.notebook[:2] for k in SUITE_KERNELS]}")
    out, project_dir = Path(out), Path(project_dir)
    summary: dict[str, Any] = {"out": str(out), "user": user, "kernels": [], "datasets": {}, "overlays": {},
                               "warnings": []}
    for spec in SUITE_KERNELS:
        folder = out / "kernels" / spec.slug
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(project_dir / "notebooks" / spec.notebook, folder / spec.notebook)
        given = {**(params or {}).get(spec.notebook[:2], {}), **(params or {}).get(spec.slug, {})}
        if given:
            inject_parameters(folder / spec.notebook, given)
        committed = project_dir / "kernel-metadata" / spec.slug / "kernel-metadata.json"
        _write_overlaid(folder / "kernel-metadata.json", kernel_metadata(spec, user, spec.notebook), committed,
                        kernel_template(spec), user, summary)
        summary["kernels"].append(spec.slug)
    wheel_problems: list[str] = []
    if wheels:
        report, notes, image_problems = _build_wheels(out / "datasets" / WHEELS.slug, project_dir, target, extras,
                                                      extra_wheels, image, allow_replace, log)
        summary["datasets"][WHEELS.slug] = f"{len(report.files)} files, {report.total_bytes / 2**20:.1f} MiB"
        summary["warnings"] += report.sdists + notes  # sdists: Kaggle would compile them offline (--add-wheel)
        wheel_problems = report.conflicts + report.problems + image_problems
        _overlay_dataset(out / "datasets" / WHEELS.slug, WHEELS, project_dir, user, summary)
    if run_dir is not None:
        folder = out / "datasets" / STUDENT.slug
        summary["datasets"][STUDENT.slug], terms = _build_student(folder, Path(run_dir))
        _overlay_dataset(folder, STUDENT, project_dir, user, summary, terms)
    problems = validate_tree(out, for_push=user != PLACEHOLDER_USER, client=True)
    summary["problems"] = [str(p) for p in problems] + wheel_problems
    summary["warnings"] += empty_required(out)  # push refuses these kernels
    return summary


def build_problems(build_dir: str | Path) -> list[str]:
    """What the build of ``build_dir`` refused that a push must not ship: the wheelhouse's conflicts,
    problems and image misfits (``wheelhouse.json``)."""
    manifest = Path(build_dir) / "datasets" / WHEELS.slug / "wheelhouse.json"
    if not manifest.is_file():
        return []
    data = json.loads(manifest.read_text(encoding="utf-8"))
    found = data.get("conflicts", []) + data.get("problems", []) + data.get("image_problems", [])
    return [f"{manifest}: {p}" for p in found]


def _write_overlaid(path: Path, generated: dict[str, Any], committed: Path, template: dict[str, Any], user: str,
                    summary: dict[str, Any]) -> None:
    """Write ``generated`` with the user's edits of the ``committed`` file on top; the summary names them."""
    edits = user_edits(read_committed(committed), template)
    write_json(path, apply_edits(generated, edits, user))
    if edits:
        summary["overlays"][str(committed)] = sorted(edits)


def _overlay_dataset(folder: Path, spec: DatasetSpec, project_dir: Path, user: str, summary: dict[str, Any],
                     terms: tuple[str, bool] | None = None) -> None:
    committed = project_dir / "datasets-metadata" / spec.slug / "dataset-metadata.json"
    _write_overlaid(folder / "dataset-metadata.json", dataset_metadata(spec, user, terms and terms[0]), committed,
                    dataset_template(spec), user, summary)
    if terms and not terms[1] and "licenses" not in summary["overlays"].get(str(committed), []):
        summary["warnings"].append(f"{spec.slug}: the base model's licence is not known from its model type: name "
                                   f"it in {committed} (licenses + description), the build keeps your edit")


def _build_wheels(folder: Path, project_dir: Path, target: Any, extras: tuple[str, ...],
                  extra_wheels: tuple[str | Path, ...], image: Any, allow_replace: tuple[str, ...],
                  log: Callable[[str], None]) -> tuple[Any, list[str], list[str]]:
    """The wheel and the wheelhouse for ``image``; returns the report, notes and warnings, problems."""
    from packaging.utils import canonicalize_name

    from . import wheelhouse

    folder.mkdir(parents=True, exist_ok=True)
    image = image or wheelhouse.KAGGLE_IMAGE
    target = target or wheelhouse.Target.kaggle(".".join(image.python.split(".")[:2]))
    wheel = wheelhouse.build_wheel(project_dir, folder)
    fit = wheelhouse.fit_to_image(wheelhouse.lmsys_requirements(wheel, extras=extras, target=target), image,
                                  target, allow_replace)
    exclude = wheelhouse.KAGGLE_SHIPS - {canonicalize_name(n) for n in allow_replace}
    report = wheelhouse.build_wheelhouse(folder, fit.requirements, target, exclude=exclude,
                                         extra_wheels=tuple(Path(p) for p in extra_wheels), log=log)
    wheelhouse.write_requirements(folder, wheel, extras, target, fit, note=f"for {image.name} (lmsys kaggle build)")
    misfits, unchecked = wheelhouse.replaced_by(report, image)
    manifest = wheelhouse.write_manifest(report, folder / "wheelhouse.json")
    data = json.loads(manifest.read_text(encoding="utf-8"))
    data |= {"image": image.to_dict(), "chosen": fit.notes, "replaces": sorted(allow_replace),
             "image_problems": fit.problems + misfits}
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log(report.summary())
    for line in fit.notes + [f"UNCHECKED {u}" for u in unchecked]:
        log(f"  {line}")
    return report, fit.notes + unchecked, fit.problems + misfits


def _build_student(folder: Path, run_dir: Path) -> tuple[str, tuple[str, bool]]:
    """Copy ``<run>/quantized`` into ``folder``; returns a line for the summary and the licence terms."""
    source = run_dir / "quantized"
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} holds no quantised model (run 04_quantization / `lmsys quantize`)")
    fidelity = source / "fidelity.json"
    if fidelity.is_file() and json.loads(fidelity.read_text()).get("passed") is False:
        raise ValueError(f"{source} failed its fidelity check ({fidelity}); it is not shipped")
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(source, folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    model_type = json.loads((source / "config.json").read_text(encoding="utf-8")).get("model_type")
    return f"{source} ({size / 2**20:.0f} MiB)", model_licence(model_type)


# ---------------------------------------------------------------- push: the exact commands, in dependency order

@dataclass(frozen=True)
class PushStep:
    """One ``kaggle`` command; a ``wait`` step polls it: ``"dataset"`` (``datasets status`` until Kaggle has
    processed the upload) or ``"kernel"`` (``kernels status`` until the kernel's run is over — a later kernel
    reads its output; on failure its output and log are fetched into ``logs`` and the log printed)."""

    argv: tuple[str, ...]
    what: str
    wait: str = ""
    logs: str = ""

    def __str__(self) -> str:
        return shlex.join(self.argv)


def kernel_order(kernels: tuple[KernelSpec, ...] = SUITE_KERNELS) -> list[KernelSpec]:
    """Kernels so that each comes after the kernels whose output it reads (a cycle is an error)."""
    by_slug = {k.slug: k for k in kernels}
    done: list[KernelSpec] = []
    pending = list(kernels)
    while pending:  # the first kernel (in notebook order) whose sources are all pushed goes next
        pushed = {k.slug for k in done}
        ready = next((k for k in pending if all(d in pushed or d not in by_slug for d in k.kernels)), None)
        if ready is None:
            raise ValueError(f"kernel sources form a cycle: {[k.slug for k in pending]}")
        done.append(ready)
        pending.remove(ready)
    return done


def push_plan(build_dir: str | Path, user: str, message: str = "arena-distill update", new: bool = False,
              only: tuple[str, ...] = (), check_required: bool = True) -> list[PushStep]:
    """Datasets first (``create`` when ``new``, else ``version``; always ``--dir-mode zip``: the default
    ``skip`` silently drops subfolders), each followed by a wait until Kaggle has processed it, then the kernels
    in dependency order; a kernel whose output a later pushed kernel reads is waited for (its run must be
    over before the next one can attach its output). Which kernel reads which comes from the built
    kernel-metadata.json (``kernel_sources``, the user's overlay included), else from the suite's table.
    ``only``: notebook numbers ("05") or kernel slugs to push; the datasets they attach come with them. A built
    kernel whose required parameter is empty is refused (``ValueError``; ``check_required=False`` skips that,
    for a dry run): it would fail at once on Kaggle's GPU."""
    build_dir = Path(build_dir)
    kernels = selected_kernels(build_dir, only)
    empty = empty_required(build_dir, kernels) if check_required else []
    if empty:
        raise ValueError(empty[0])
    needed = {slug for k in kernels for slug in k.datasets}  # the suite's datasets these kernels attach
    steps: list[PushStep] = []
    for spec in (d for d in SUITE_DATASETS if d.slug in needed):
        if build_dir.is_dir() and not (build_dir / "datasets" / spec.slug / "dataset-metadata.json").is_file():
            continue  # not built (no --run-dir: the student is not shipped this time)
        folder = str(build_dir / "datasets" / spec.slug)
        argv = (("kaggle", "datasets", "create", "-p", folder, "--dir-mode", "zip") if new else
                ("kaggle", "datasets", "version", "-p", folder, "-m", message, "--dir-mode", "zip"))
        steps.append(PushStep(argv, f"dataset {spec.slug}: {spec.content}"))
        steps.append(PushStep(("kaggle", "datasets", "status", f"{user}/{spec.slug}"),
                              f"wait until {spec.slug} is ready", wait="dataset"))
    for k in kernels:
        steps.append(PushStep(("kaggle", "kernels", "push", "-p", str(build_dir / "kernels" / k.slug)),
                              f"kernel {k.slug} ({k.notebook}{', 2×T4' if k.gpu else ''})"))
        readers = [r.slug for r in kernels if k.slug in r.kernels]
        if readers:
            steps.append(PushStep(("kaggle", "kernels", "status", f"{user}/{k.slug}"),
                                  f"wait until kernel {k.slug} has run: {', '.join(readers)} reads its output",
                                  wait="kernel", logs=str(build_dir / "logs" / k.slug)))
    return steps


def selected_kernels(build_dir: str | Path, only: tuple[str, ...] = ()) -> list[KernelSpec]:
    """The kernels to push, in dependency order: all, or those ``only`` names (notebook numbers or slugs)."""
    kernels = [k for k in kernel_order(built_kernels(Path(build_dir)))
               if not only or k.slug in only or k.notebook[:2] in only]
    if only and not kernels:
        raise ValueError(f"--only {only} matches no kernel; known: {[k.notebook[:2] for k in SUITE_KERNELS]}")
    return kernels


def built_kernels(build_dir: Path) -> tuple[KernelSpec, ...]:
    """The suite's kernels, each reading the kernels and datasets its built metadata lists (``kernel_sources``,
    ``dataset_sources``: the user's overlay included), or the table's when it is not built."""
    out = []
    for spec in SUITE_KERNELS:
        path = build_dir / "kernels" / spec.slug / "kernel-metadata.json"
        sources, datasets = spec.kernels, spec.datasets
        if path.is_file():
            meta = json.loads(path.read_text(encoding="utf-8"))
            sources = tuple(str(ref).split("/")[-1] for ref in meta.get("kernel_sources") or [])
            datasets = tuple(str(ref).split("/")[-1] for ref in meta.get("dataset_sources") or [])
        out.append(dataclasses.replace(spec, kernels=sources, datasets=datasets))
    return tuple(out)


def empty_required(build_dir: str | Path, kernels: Sequence[KernelSpec] = SUITE_KERNELS) -> list[str]:
    """One line naming every built kernel (of ``kernels``) whose required notebook parameter is still empty and
    saying how to set it; ``[]`` when there is none (or nothing is built)."""
    empty = []
    for spec in kernels:
        notebook = Path(build_dir) / "kernels" / spec.slug / spec.notebook
        if spec.required and notebook.is_file():
            values = notebook_parameters(notebook)
            if not values.get("config"):
                empty += [f"{spec.slug}: {name}" for name in spec.required if values.get(name) in ("", None)]
    if not empty:
        return []
    return [f"required notebook parameters are empty ({'; '.join(empty)}): the kernel would fail at once on "
            "Kaggle's GPU; build with --param NB:NAME=VALUE, e.g. "
            "--param 01:model_dir=/kaggle/input/gemma-2/transformers/gemma-2-2b-it/2"]


Runner = Callable[[tuple[str, ...]], "subprocess.CompletedProcess[str]"]


def _run_cli(argv: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


# What kaggle 2.x prints, exit code 0, when a push or an upload did not happen — or happened without a
# source the chain needs (the kernel runs, but without its inputs). Invalid tags are only a warning.
PUSH_FAILED = ("Kernel push error", "Dataset version creation error", "Dataset creation error",
               "not valid dataset sources", "not valid competition sources", "not valid kernel sources")


def push(steps: list[PushStep], dry_run: bool = True, poll_s: float = 15.0, timeout_s: float = 3600.0,
         kernel_timeout_s: float = 13 * 3600.0, log: Callable[[str], None] = print, runner: Runner = _run_cli,
         sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> int:
    """Print every command; unless ``dry_run``, run them in order with the ``kaggle`` CLI (which reads the
    credentials itself — nothing here reads or writes them). ``runner`` runs one argv (the real CLI by
    default). A command fails on a non-zero exit or on the lines the CLI prints, exit 0, when nothing was
    pushed (``PUSH_FAILED``). Stops at the first failure; returns its exit code."""
    for step in steps:
        log(f"# {step.what}\n{step}")
    if dry_run:
        return 0
    for step in steps:
        if step.wait:
            code = _wait(step, poll_s, kernel_timeout_s if step.wait == "kernel" else timeout_s, log, runner, sleep,
                         clock)
        else:
            log(f"$ {step}")
            proc = runner(step.argv)
            text = "\n".join(t for t in ((proc.stdout or "").strip(), (proc.stderr or "").strip()) if t)
            log(text)
            code = proc.returncode or (1 if any(marker in text for marker in PUSH_FAILED) else 0)
            if code and "successfully pushed" in text:
                log("pushed, but without a source it needs: the chain stops here — fix its metadata and push again")
        if code:
            log(f"failed ({code}): {step}")
            return code
    return 0


_STATUS = re.compile(r'has status "([^"]+)"')
KERNEL_DONE, KERNEL_FAILED = {"complete"}, {"error", "cancel_requested", "cancel_acknowledged"}
KERNEL_ACTIVE = {"queued", "running", "new_script"}
DATASET_FAILED = ("error", "failed", "deleted")
# Right after a push, `status` may still report the previous version's run: a final status counts only once
# the new run was seen queued or running; never seen so within this many seconds is a failure.
KERNEL_GRACE_S = 600.0
STATUS_RETRIES = 5  # consecutive failed `status` calls (network, 429, 5xx) tolerated during a long wait


def _wait(step: PushStep, poll_s: float, timeout_s: float, log: Callable[[str], None], runner: Runner,
          sleep: Callable[[float], None], clock: Callable[[], float]) -> int:
    """Poll ``step`` until ready (0), failed (1, a kernel's log fetched and printed) or ``timeout_s`` (1)."""
    start, active, failures = clock(), False, 0
    while clock() - start <= timeout_s:
        proc = runner(step.argv)
        if proc.returncode:
            failures += 1
            log(f"{shlex.join(step.argv)}: exit {proc.returncode} ({failures}/{STATUS_RETRIES}): "
                + (proc.stderr or proc.stdout or "").strip()[-300:])
            if failures >= STATUS_RETRIES:
                return proc.returncode
            sleep(poll_s * failures)  # back off
            continue
        failures = 0
        state, active = _state(step, (proc.stdout or "").strip(), active, clock() - start)
        if state != "waiting":
            log(f"{step.argv[-1]}: {(proc.stdout or '').strip()}" + (f" — {state}" if state != "done" else ""))
            if state != "done" and step.wait == "kernel":
                _print_kernel_log(step, log, runner)
            return 0 if state == "done" else 1
        sleep(poll_s)
    log(f"{step.argv[-1]} not done after {timeout_s:.0f} s ({shlex.join(step.argv)} to look again)")
    return 1


def _state(step: PushStep, text: str, active: bool, waited: float) -> tuple[str, bool]:
    """("done" | "waiting" | a failure's reason, whether the new run or upload has been seen in progress)."""
    if step.wait == "dataset":
        status = text.lower().split()[-1] if text else ""
        if any(word in status for word in DATASET_FAILED):
            return f"the upload {status}", active
        active = active or status not in ("ready", "")
        done = status == "ready" and (active or waited >= 60.0)  # a fresh version may still report the old one
        return ("done" if done else "waiting"), active
    found = _STATUS.search(text)
    status = found.group(1).rsplit(".", 1)[-1].lower() if found else ""
    active = active or status in KERNEL_ACTIVE
    if status in KERNEL_DONE | KERNEL_FAILED and not active:
        if waited < KERNEL_GRACE_S:
            return "waiting", active  # perhaps the previous version's final status
        return (f"never seen queued or running within {KERNEL_GRACE_S:.0f} s: the new version did not start "
                "(look at it on kaggle.com)"), active
    if status in KERNEL_DONE:
        return "done", active
    if status in KERNEL_FAILED:
        return f"the run ended {status}", active
    return "waiting", active


def _print_kernel_log(step: PushStep, log: Callable[[str], None], runner: Runner) -> None:
    """The failed kernel's log (``kaggle kernels logs``; its JSON records read as text) — its last lines
    printed, the whole saved to ``step.logs`` — and its log files (``kaggle kernels output … --file-pattern``,
    not its model files)."""
    kernel = step.argv[-1]
    folder = Path(step.logs)
    folder.mkdir(parents=True, exist_ok=True)
    runner(("kaggle", "kernels", "output", kernel, "-p", str(folder), "-o", "--file-pattern", r"\.(log|txt)$"))
    proc = runner(("kaggle", "kernels", "logs", kernel))
    text = log_text(proc.stdout or "") if not proc.returncode else ""
    if not text:
        named = folder / f"{kernel.split('/')[-1]}.log"
        text = log_text(named.read_text(encoding="utf-8", errors="replace")) if named.is_file() else ""
    (folder / "kernel.log").write_text(text, encoding="utf-8")
    tail = "\n".join(text.strip().splitlines()[-40:]) or "(no log came back)"
    log(f"--- {kernel}: the end of its log (all of it: {folder / 'kernel.log'}) ---\n{tail}")


def log_text(raw: str) -> str:
    """A kernel log as text: Kaggle stores it as a JSON list of ``{"stream_name", "time", "data"}`` records
    (or one record per line); anything else is returned as it is."""
    stripped = raw.strip()
    records: list[Any] = []
    try:
        parsed = json.loads(stripped) if stripped else []
        records = parsed if isinstance(parsed, list) else [parsed]
    except json.JSONDecodeError:
        try:
            pieces = (line.strip().strip(",").removeprefix("[").removesuffix("]").strip(",")
                      for line in stripped.splitlines())
            records = [json.loads(piece) for piece in pieces if piece]
        except json.JSONDecodeError:
            return raw
    if not all(isinstance(r, dict) and "data" in r for r in records):
        return raw
    return "".join(str(r["data"]) for r in records)
