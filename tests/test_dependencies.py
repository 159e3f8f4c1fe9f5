"""The dependency floors: the same in pyproject.toml and requirements.txt, new enough for the APIs the code
calls, and met by what is installed."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(re.sub(r"\s+#.*", "", line)) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name: r for r in reqs}


def _pyproject() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    specs = list(data["project"]["dependencies"])
    for extra in ("train", "quantize"):
        specs += data["project"]["optional-dependencies"][extra]
    return {r.name: r for r in map(Requirement, specs)}


def test_floors_agree_between_pyproject_and_requirements():
    runtime, project = _requirements(), _pyproject()
    shared = set(runtime) & set(project)
    assert {"transformers", "peft", "accelerate", "tokenizers"} <= shared
    assert {n: str(runtime[n].specifier) for n in shared} == {n: str(project[n].specifier) for n in shared}


def test_floors_cover_the_apis_used_and_are_installed():
    project = _pyproject()
    floor = {n: min(Version(s.version) for s in r.specifier if s.operator in (">=", "==")) for n, r in project.items()
             if any(s.operator in (">=", "==") for s in r.specifier)}
    assert floor["transformers"] >= Version("4.56")  # from_pretrained(dtype=...)
    assert floor["peft"] >= Version("0.12")  # get_peft_model's autocast_adapter_dtype, kbit gradient_checkpointing_kwargs
    assert floor["tokenizers"] >= Version("0.15")  # Tokenizer.encode_special_tokens
    for name, req in project.items():
        assert req.specifier.contains(version(name), prereleases=True), f"{name} {version(name)} vs {req}"


def test_the_torch_floor_is_stated_and_met():
    """torch is not installed from these files (the images ship it; setup.sh pins the CPU wheel), but the
    code needs >= 2.6: torch.amp.GradScaler on any device, FSDP2's public fully_shard / FSDPModule."""
    import torch

    assert "torch itself: >= 2.6" in (ROOT / "requirements.txt").read_text()
    assert Version(torch.__version__.split("+")[0]) >= Version("2.6")
