"""Real small pretrained models from PyPI wheels: converted offline, loaded as classifiers, packed real rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmsys_lib import batching, modeling, parsing, zoo
from lmsys_lib.config import ModelConfig, PackConfig
from lmsys_lib.prompting import Packer, frame_ids


@pytest.fixture(scope="module")
def cache():
    return zoo.models_cache()  # ~/.cache/lmsys_lib/models unless LMSYS_MODELS says otherwise


@pytest.mark.parametrize("name, has_bos, model_type", [("smollm2-135m", False, "llama"),
                                                       ("gemma3-270m", True, "gemma3_text")])
def test_real_model_converts_once_and_classifies_real_rows(cache, real_sample, name, has_bos, model_type):
    try:
        path = zoo.prepare_model(name, cache)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    stamp = json.loads((path / "lmsys_zoo.json").read_text())
    assert stamp["name"] == name and (path / "model.safetensors").exists()
    assert zoo.prepare_model(name, cache) == path  # cached: no second conversion
    torch.manual_seed(0)
    model, tok = modeling.load_classifier(ModelConfig(model_dir=str(path), lora_r=4, lora_alpha=8))
    assert model.config.model_type == model_type and model.config.num_labels == 3
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    assert (frame_ids(tok)[0] == [tok.bos_token_id]) == has_bos
    frame = parsing.read_competition(real_sample / "train_head_100.csv").frame.iloc[:4]
    packed = Packer(tok, PackConfig(max_length=256)).pack_frame(frame)
    batch = batching.collate(list(packed["input_ids"]), tok.pad_token_id, frame["label"].to_numpy())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    alone = model(**batching.collate([packed["input_ids"].iloc[3]], tok.pad_token_id)).logits
    assert np.allclose(alone.detach().numpy(), logits[3:4].numpy(), atol=1e-4)  # padding-invariant
