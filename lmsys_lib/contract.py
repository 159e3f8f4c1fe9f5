"""A model folder's contract: what the model must be used with, in one small JSON beside its weights.

``merged/`` and ``quantized/`` (and any folder ``lmsys predict`` scores with) hold ``lmsys_contract.json``:

    {"pack": {...PackConfig...},          the prompt format the model was trained with (max_length: training's)
     "label_order": ["winner_model_a", "winner_model_b", "winner_tie"],   class index → submission column
     "temperature": {"value": T, "source": "...", "log_loss_before": …, "log_loss_after": …} | null,
     "source_dtype": "bfloat16",          the dtype of the weights it was trained on / merged into
     "produced_by": "merge" | "quantize", "model": "<student name>", "quantization": {...} (quantised only),
     "attention": {"choice": "eager" | "sdpa-no-softcap", "kl_mean": …, "delta_log_loss": …, …} (the gate's)}

Written by the merge (from the folds' own config and their ``temperature.json``) and carried by the
quantisation, which refits the temperature on the quantised model's own TTA output over the holdout when it
has enough rows (``set_temperature``: the carried one is kept as ``temperature_carried``); read by ``lmsys quantize``, ``lmsys predict`` and notebooks 04/05, which take the prompt format
and the temperature from it. An explicit setting wins, with a warning when it differs from the contract.
A contract that names another label order, or a pack config with unknown keys, is an error naming the file.

This module never imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import PackConfig, from_dict, to_dict
from .parsing import LABEL_COLUMNS

CONTRACT_FILE = "lmsys_contract.json"
STAGE_CONFIGS = ("student_config.json", "teacher_config.json")  # a k-fold model's saved config, beside fold*/


def write(folder: str | Path, pack: PackConfig | dict[str, Any] | None, temperature: dict[str, Any] | None,
          source_dtype: str | None, produced_by: str, **extra: Any) -> Path:
    """Write ``folder/lmsys_contract.json``; returns its path."""
    data = {"pack": None if pack is None else to_dict(pack), "label_order": list(LABEL_COLUMNS),
            "temperature": temperature, "source_dtype": source_dtype, "produced_by": produced_by, **extra}
    path = Path(folder) / CONTRACT_FILE
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def set_temperature(folder: str | Path, temperature: dict[str, Any]) -> Path:
    """Replace the contract's temperature with one fitted on this model's own output; the one it carried
    (the student's, fitted on its OOF logits) is kept as ``temperature_carried``."""
    path = Path(folder) / CONTRACT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no contract to record the temperature in")
    data = json.loads(path.read_text(encoding="utf-8"))
    data["temperature_carried"] = data.get("temperature")
    data["temperature"] = temperature
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def set_entry(folder: str | Path, key: str, value: Any) -> Path:
    """Record one more decision about the model (``attention``: the attention gate's) in its contract."""
    path = Path(folder) / CONTRACT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no contract to record {key!r} in")
    data = json.loads(path.read_text(encoding="utf-8"))
    data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read(folder: str | Path) -> dict[str, Any] | None:
    """The validated contract of ``folder`` (``pack`` as a ``PackConfig`` or None), or None when it has none."""
    path = Path(folder) / CONTRACT_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("label_order") != list(LABEL_COLUMNS):
        raise ValueError(f"{path}: label_order {data.get('label_order')} is not {list(LABEL_COLUMNS)}: this model's "
                         "class indices mean something else")
    try:
        data["pack"] = None if data.get("pack") is None else from_dict(PackConfig, data["pack"])
    except ValueError as err:
        raise ValueError(f"{path}: pack: {err}") from None
    value = (data.get("temperature") or {}).get("value")
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{path}: temperature.value must be a positive number, got {value!r}")
    return data


def from_folds(adapter_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """What fold adapters ``<model>/fold<k>/adapter`` say about their model: its saved stage config's ``pack``
    and its ``temperature.json`` (fitted on the OOF logits). Empty entries when the folds are not one model's."""
    roots = {Path(p).resolve().parents[1] for p in adapter_dirs}
    if len(roots) != 1:
        return {"pack": None, "temperature": None, "model": None}
    root = next(iter(roots))
    pack = None
    for name in STAGE_CONFIGS:
        if (root / name).is_file():
            pack = from_dict(PackConfig, json.loads((root / name).read_text(encoding="utf-8"))["pack"])
            break
    temperature = None
    if (root / "temperature.json").is_file():
        saved = json.loads((root / "temperature.json").read_text(encoding="utf-8"))
        temperature = {"value": saved["temperature"], **{k: v for k, v in saved.items() if k != "temperature"}}
    return {"pack": pack, "temperature": temperature, "model": root.name}


def pack_for(folder: str | Path, explicit: PackConfig | None = None, max_length: int | None = None,
             log: Callable[[str], None] = print) -> PackConfig:
    """The prompt format to run ``folder``'s model with: ``explicit`` when given (warned when it differs from the
    contract's), else the contract's, else ``PackConfig()`` (warned); ``max_length`` then replaces the length
    (inference may run longer than training: said, not warned)."""
    found = read(folder)
    trained = found["pack"] if found else None
    if explicit is not None:
        pack = explicit
        if trained is not None and _format(explicit) != _format(trained):
            log(f"WARNING: the prompt format given differs from the one {folder} was trained with "
                f"({CONTRACT_FILE}: {_diff(_format(trained), _format(explicit))}); using the one given")
    elif trained is not None:
        pack = trained
    else:
        log(f"WARNING: {folder} has no {CONTRACT_FILE} (not made by lmsys merge/quantize): the default prompt "
            "format is assumed — pass the PackConfig it was trained with")
        pack = PackConfig()
    if max_length is not None and max_length != pack.max_length:
        if trained is not None:
            log(f"prompt length {max_length} tokens (trained at {trained.max_length})")
        pack = from_dict(PackConfig, to_dict(pack) | {"max_length": max_length})
    return pack


def temperature_of(folder: str | Path) -> tuple[float, str] | None:
    """(T, where it came from) for ``folder``: its contract's, else a ``temperature.json`` beside the weights."""
    from .evaluate import TEMPERATURE_FILE, load_temperature

    found = read(folder)
    if found is not None and (found.get("temperature") or {}).get("value") is not None:
        t = found["temperature"]
        return float(t["value"]), f"{Path(folder) / CONTRACT_FILE} (fitted on {t.get('source', '?')})"
    legacy = load_temperature(folder)
    return None if legacy is None else (legacy, str(Path(folder) / TEMPERATURE_FILE))


def _format(pack: PackConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(pack).items() if k != "max_length"}


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ", ".join(f"{k} {a[k]!r} → {b[k]!r}" for k in sorted(a) if a[k] != b.get(k))
