"""The embedded default data: train/test/sample_submission in the exact competition dialect.

Contract:
- ``generate(cfg)`` is a pure function of ``cfg`` (seeded): the same config gives byte-identical files.
- Dialect (as the real files): UTF-8, LF, minimal quoting with doubled quotes, JSON-list cells without
  spaces, non-ASCII written as ``\\uXXXX`` escapes (emoji as surrogate pairs), ``/`` sometimes as ``\\/``,
  int64 ids above 2^31 in ascending order, labels written ``0``/``1``.
- Marginals close to the real train set: label mix ≈ 35/34/31 (A/B/tie), ~13 % multi-turn (up to 15
  rounds), ~0.35 % rows with a ``null`` turn (a few with both responses ``[null]``), empty turns, rare lone
  surrogates, response lengths with median ≈ 1k characters and a tail to ``max_chars``, many scripts, emoji.
- A learnable signal mirroring arena biases: a response's utility grows with its length (log), with
  markdown formatting and with relevance to the prompt, drops sharply for a refusal, plus a per-model
  skill; identical responses tie most of the time. The label is drawn from a Davidson tie model on the
  utility difference, so the Bayes log loss is well below the uniform 1.0986 but far from 0.

This module never imports torch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from .config import SynthConfig
from .parsing import LABEL_COLUMNS, TEST_COLUMNS, TRAIN_COLUMNS, encode_cell, write_table

MODEL_NAMES = (
    "gpt-4-1106-preview", "gpt-4-0613", "gpt-4-0314", "gpt-4-0125-preview", "gpt-3.5-turbo-0613",
    "gpt-3.5-turbo-0125", "gpt-3.5-turbo-1106", "claude-2.1", "claude-2.0", "claude-1", "claude-instant-1",
    "mistral-medium", "mixtral-8x7b-instruct-v0.1", "mistral-7b-instruct", "llama-2-70b-chat",
    "llama-2-13b-chat", "llama-2-7b-chat", "vicuna-33b", "vicuna-13b", "vicuna-7b", "zephyr-7b-beta",
    "openchat-3.5", "gemini-pro", "gemini-pro-dev-api", "yi-34b-chat", "qwen-14b-chat", "wizardlm-70b",
    "wizardlm-13b", "tulu-2-dpo-70b", "solar-10.7b-instruct-v1.0", "starling-lm-7b-alpha", "pplx-70b-online",
    "pplx-7b-online", "codellama-34b-instruct", "palm-2", "koala-13b", "alpaca-13b", "chatglm-6b",
    "chatglm2-6b", "chatglm3-6b", "oasst-pythia-12b", "fastchat-t5-3b", "dolly-v2-12b", "stablelm-tuned-alpha-7b",
    "mpt-7b-chat", "mpt-30b-chat", "guanaco-33b", "falcon-180b-chat", "RWKV-4-Raven-14B", "llama-13b",
    "gpt4all-13b-snoozy", "nous-hermes-2-mixtral-8x7b-dpo", "openhermes-2.5-mistral-7b", "deepseek-llm-67b-chat",
    "qwen1.5-72b-chat", "qwen1.5-7b-chat", "qwen1.5-4b-chat", "dolphin-2.2.1-mistral-7b", "mistral-large-2402",
    "claude-3-opus-20240229", "claude-3-sonnet-20240229", "claude-3-haiku-20240307", "gemma-7b-it", "gemma-2b-it",
)

_EN = ("the", "a", "model", "answer", "data", "system", "process", "value", "result", "user", "question",
       "approach", "method", "example", "function", "number", "time", "people", "world", "energy", "market",
       "history", "language", "problem", "solution", "important", "simple", "different", "common", "often",
       "because", "however", "therefore", "which", "can", "will", "should", "might", "is", "are", "was",
       "this", "that", "these", "with", "without", "between", "about", "into", "from", "for", "and", "or",
       "and/or", "input/output", "km/h", "24/7")
_TOPICS = ("pizza", "python", "taxes", "gravity", "poetry", "football", "vaccines", "bitcoin", "climate",
           "chess", "marriage", "resume", "sql", "rust", "dogs", "coffee", "mars", "democracy", "linux", "jazz")
_SCRIPTS = {  # (share of prompts, phrase bank); non-Latin text exercises the \u escapes
    "en": (0.72, None),
    "zh": (0.06, ("这是一个问题", "我们需要", "数据分析", "人工智能", "非常重要", "例如", "因此", "模型")),
    "ru": (0.05, ("это вопрос", "нужно", "данные", "модель", "очень важно", "например", "поэтому")),
    "ja": (0.03, ("これは質問です", "データ", "モデル", "とても大切", "例えば", "ですから")),
    "es": (0.05, ("la pregunta", "el modelo", "también", "información", "muy importante", "por ejemplo")),
    "de": (0.03, ("die Frage", "das Modell", "größer", "Lösung", "sehr wichtig", "zum Beispiel", "café")),
    "ar": (0.02, ("هذا سؤال", "البيانات", "النموذج", "مهم جدا", "على سبيل المثال")),
    "hi": (0.02, ("यह एक प्रश्न है", "डेटा", "मॉडल", "बहुत महत्वपूर्ण", "उदाहरण के लिए")),
    "ko": (0.02, ("이것은 질문입니다", "데이터", "모델", "매우 중요", "예를 들어")),
}
_EMOJI = ("😀", "🚀", "👍", "🔥", "🍕", "🤖", "✨", "📈", "🎉", "🙏")
_REFUSALS = (
    "I'm sorry, but I can't assist with that request.",
    "As an AI language model, I cannot help with that.",
    "I apologize, but I am unable to provide that information.",
)
_PROMPT_FORMS = ("How do I {v} {t}?", "Explain {t} to a beginner.", "Write a short poem about {t}.",
                 "What is the best way to learn {t}?", "Compare {t} and {u}.", "Is {t} better than {u}?",
                 "Give me three facts about {t}.", "Summarise the history of {t}.")
_VERBS = ("start with", "understand", "improve", "explain", "fix", "choose")

# Utility weights (arena biases): log-length, markdown, relevance, refusal. Davidson tie strength NU.
W_LENGTH, W_FORMAT, W_RELEVANT, W_REFUSAL, NU, A_BIAS = 0.55, 0.8, 0.8, -2.5, 1.08, 0.03


@dataclasses.dataclass
class _Model:
    name: str
    skill: float
    verbosity: float  # log-scale shift of the response length
    format_rate: float
    refusal_rate: float


def generate(cfg: SynthConfig) -> dict[str, pd.DataFrame]:
    """Build the three competition frames (cells already encoded as JSON text, like the real CSVs).

    Returns:
        {"train": the 9 train columns, "test": the 4 test columns,
         "sample_submission": id + three uniform probabilities}.
    """
    rng = np.random.default_rng(cfg.seed)
    models = _make_models(cfg.n_models, rng)
    ids = _unique_ids(cfg.n_train + cfg.n_test, rng)
    order = rng.permutation(len(ids))
    train_ids, test_ids = np.sort(ids[order[: cfg.n_train]]), np.sort(ids[order[cfg.n_train:]])
    train = pd.DataFrame([_labelled_row(i, models, cfg, rng) for i in train_ids], columns=list(TRAIN_COLUMNS))
    test = pd.DataFrame([_labelled_row(i, models, cfg, rng) for i in test_ids], columns=list(TRAIN_COLUMNS))
    third = repr(1 / 3)
    sample = pd.DataFrame({"id": test["id"], **{c: third for c in LABEL_COLUMNS}})
    return {"train": train, "test": test[list(TEST_COLUMNS)], "sample_submission": sample}


def write(cfg: SynthConfig, out_dir: str | Path) -> dict[str, Path]:
    """Generate and write ``train.csv``, ``test.csv``, ``sample_submission.csv`` into ``out_dir``."""
    out_dir = Path(out_dir)
    return {name: write_table(frame, out_dir / f"{name}.csv") for name, frame in generate(cfg).items()}


def _unique_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct int64 ids in [30 000, 2^32): many exceed 2^31, as in the real files."""
    ids = np.unique(rng.integers(30_000, 2**32, size=2 * n + 16, dtype=np.int64))
    return ids[rng.permutation(len(ids))[:n]]


def _make_models(n: int, rng: np.random.Generator) -> list[_Model]:
    names = rng.choice(MODEL_NAMES, n, replace=False)
    return [_Model(str(name), float(rng.normal(0, 0.4)), float(rng.normal(0, 0.35)),
                   float(rng.uniform(0.1, 0.8)), float(rng.uniform(0.02, 0.15))) for name in names]


def _labelled_row(row_id: int, models: list[_Model], cfg: SynthConfig,
                  rng: np.random.Generator) -> dict[str, object]:
    ma, mb = rng.choice(len(models), 2, replace=False)
    script = _pick_script(rng)
    n_rounds = _n_rounds(cfg, rng)
    topics = [str(rng.choice(_TOPICS)) for _ in range(n_rounds)]
    prompt = [_prompt_text(t, script, rng) for t in topics]
    resp_a, u_a = _response(models[ma], topics, script, cfg, rng)
    if rng.random() < cfg.identical_rate:
        resp_b, u_b, identical = list(resp_a), u_a, True
    else:
        (resp_b, u_b), identical = _response(models[mb], topics, script, cfg, rng), False
    prompt, resp_a, resp_b = _inject_nulls(prompt, resp_a, resp_b, cfg, rng)
    winner = _draw_label(u_a - u_b, identical, rng)
    return {"id": int(row_id), "model_a": models[ma].name, "model_b": models[mb].name,
            "prompt": _encode(prompt, rng), "response_a": _encode(resp_a, rng),
            "response_b": _encode(resp_b, rng)} | dict(zip(LABEL_COLUMNS, map(str, winner)))


def _pick_script(rng: np.random.Generator) -> str:
    names = list(_SCRIPTS)
    shares = np.array([_SCRIPTS[n][0] for n in names])
    return names[int(rng.choice(len(names), p=shares / shares.sum()))]


def _n_rounds(cfg: SynthConfig, rng: np.random.Generator) -> int:
    if rng.random() >= cfg.multi_turn_rate:
        return 1
    return int(min(15, 2 + rng.geometric(0.45) - 1))


def _prompt_text(topic: str, script: str, rng: np.random.Generator) -> str:
    form = str(rng.choice(_PROMPT_FORMS))
    text = form.format(t=topic, u=rng.choice(_TOPICS), v=rng.choice(_VERBS))
    if script != "en":
        text = f"{_phrases(script, int(rng.integers(1, 4)), rng)} {topic}? {text}"
    n_chars = int(min(20_000, rng.lognormal(np.log(60), 1.3)))
    if n_chars > len(text) + 40:  # pasted context: prompts have a long tail
        text += "\n\n" + _sentences(n_chars - len(text), script, topic, rng)
    if rng.random() < 0.03:
        text += " " + str(rng.choice(_EMOJI))
    return text


def _response(model: _Model, topics: list[str], script: str, cfg: SynthConfig,
              rng: np.random.Generator) -> tuple[list[str], float]:
    """A response (one turn per round) and its utility (the last round counts double)."""
    turns, utility = [], float(model.skill)
    for i, topic in enumerate(topics):
        text, u = _turn(model, topic, script, cfg, rng)
        turns.append(text)
        utility += u * (2.0 if i == len(topics) - 1 else 1.0) / (len(topics) + 1)
    return turns, utility


def _turn(model: _Model, topic: str, script: str, cfg: SynthConfig,
          rng: np.random.Generator) -> tuple[str, float]:
    if rng.random() < model.refusal_rate:
        text = str(rng.choice(_REFUSALS))
        return text, W_REFUSAL + W_LENGTH * np.log(len(text) / 1000)
    n_chars = _response_length(model, cfg, rng)
    relevant = rng.random() < 0.8
    body = _sentences(n_chars, script, topic if relevant else str(rng.choice(_TOPICS)), rng)
    formatted = rng.random() < model.format_rate
    text = _markdown(body, topic, rng) if formatted else body
    if rng.random() < 0.02:
        text += " " + "".join(rng.choice(_EMOJI, int(rng.integers(1, 4))))
    u = W_LENGTH * np.log(len(text) / 1000) + W_FORMAT * formatted + W_RELEVANT * relevant
    return text, float(u)


def _response_length(model: _Model, cfg: SynthConfig, rng: np.random.Generator) -> int:
    if rng.random() < 0.003:  # the real tail: a few answers of 10k–25k characters
        return int(rng.integers(min(10_000, cfg.max_chars // 2), cfg.max_chars + 1))
    return int(np.clip(rng.lognormal(np.log(900) + model.verbosity, 0.7), 20, cfg.max_chars))


def _sentences(n_chars: int, script: str, topic: str, rng: np.random.Generator) -> str:
    """About ``n_chars`` characters of sentences mentioning ``topic`` (all random draws made in bulk)."""
    n_sent = n_chars // 45 + 2  # an English sentence here averages ~60 characters
    lengths = rng.integers(5, 16, size=n_sent)
    words = rng.integers(len(_EN), size=int(lengths.sum()))
    slots = rng.integers(0, lengths)
    ends = rng.choice([".", ".", ".", "?", "!"], size=n_sent)
    foreign = (rng.random(n_sent) >= 0.3) if script != "en" else np.zeros(n_sent, dtype=bool)
    bank = _SCRIPTS[script][1] or _EN
    phrase_ids = rng.integers(len(bank), size=(n_sent, 4))
    parts, size, start = [], 0, 0
    for i, n in enumerate(lengths):
        if foreign[i]:
            sentence = " ".join(bank[j] for j in phrase_ids[i]) + ("。" if script in ("zh", "ja") else ".")
        else:
            chosen = [_EN[j] for j in words[start: start + n]]
            chosen[slots[i]] = topic
            sentence = " ".join(chosen).capitalize() + ends[i]
        start += n
        parts.append(sentence)
        size += len(sentence) + 1
        if size >= n_chars:
            break
    text = " ".join(parts)
    return text[:n_chars] if size >= n_chars else text + " " + _sentences(n_chars - size, script, topic, rng)


def _phrases(script: str, n: int, rng: np.random.Generator) -> str:
    bank = _SCRIPTS[script][1] or _EN
    return " ".join(bank[j] for j in rng.integers(len(bank), size=n))


def _markdown(body: str, topic: str, rng: np.random.Generator) -> str:
    words = body.split(" ")
    chunk = max(8, len(words) // 5)
    items = [" ".join(words[i: i + chunk]) for i in range(0, len(words), chunk)]
    bullet = "- " if rng.random() < 0.5 else "1. "
    return f"## {topic.capitalize()}\n\n" + "\n".join(f"{bullet}**{it[:12]}**{it[12:]}" for it in items)


def _inject_nulls(prompt: list[str], a: list[str], b: list[str], cfg: SynthConfig,
                  rng: np.random.Generator) -> tuple[list, list, list]:
    """Real oddities: null turns (both responses [null] in a few rows), empty turns, lone surrogates."""
    p, a2, b2 = list(prompt), list(a), list(b)
    if rng.random() < cfg.null_turn_rate:
        which = int(rng.integers(3))
        if which == 2:
            a2, b2 = [None] * len(a2), [None] * len(b2)
        else:
            (a2 if which == 0 else b2)[int(rng.integers(len(a2)))] = None
    if rng.random() < 0.003:
        (a2 if rng.random() < 0.5 else b2)[-1] = ""
    if rng.random() < 0.001:
        a2[0] = (a2[0] or "") + "\ud83d broken emoji"
    return p, a2, b2


def _draw_label(diff: float, identical: bool, rng: np.random.Generator) -> tuple[int, int, int]:
    """Davidson model: P(A) ∝ e^{d/2 + bias}, P(B) ∝ e^{-d/2}, P(tie) ∝ NU; identical → mostly tie."""
    probs = label_probs(diff, identical)
    return ((1, 0, 0), (0, 1, 0), (0, 0, 1))[int(rng.choice(3, p=probs))]


def label_probs(diff: float, identical: bool = False) -> np.ndarray:
    """The generator's true P(A), P(B), P(tie) for a utility difference ``diff`` = u_A − u_B."""
    if identical:
        return np.array([0.07, 0.07, 0.86])
    w = np.array([np.exp(diff / 2 + A_BIAS), np.exp(-diff / 2), NU])
    return w / w.sum()


def _encode(turns: list[str | None], rng: np.random.Generator) -> str:
    """JSON cell like the real file; in ~30 % of cells every ``/`` is written ``\\/`` (still valid JSON)."""
    cell = encode_cell(turns)
    return cell.replace("/", "\\/") if rng.random() < 0.3 else cell
