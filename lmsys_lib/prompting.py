"""Conversation → token ids for a 3-class classifier, under a budget counted in ids.

Layout of one packed row (every piece is token ids; texts are tokenized once, never decoded again)::

    prefix  [drop marker]  round … round  [drop marker]  tail  suffix
    round = [separator] prompt_header <prompt ids> a_header <response A ids> b_header <response B ids>

``prefix``/``suffix`` are what the tokenizer itself adds around a text (e.g. ``<bos>``), or, with
``use_chat_template``, the tokenizer's chat template around one user turn. A part that is too long loses
ids at its end, start or middle and shows ``cut_marker`` where it was cut; rounds that no longer fit are
dropped from the start (``keep_rounds="last"``) or the end, and ``cut_marker`` shows where.

Invariants (each tested, fuzzed):
- ``len(ids) <= max_length``, always (asserted on every row);
- every kept round shows its prompt header, A header and B header, each part with at least one id of
  its content (or the cut marker) when that part is non-empty;
- deterministic: the same conversation, tokenizer and config give the same ids;
- swapping A and B swaps the two response spans and changes nothing else (budgets are symmetric);
- user text never becomes a control token: ``<eos>``, ``<pad>``, ``<|eot_id|>`` written in a prompt or a
  response are tokenised as the characters they are (only ``prefix``/``suffix`` hold special ids);
- a chat template that stamps a date (Llama-3.1+ writes "Today Date: …") gets ``TEMPLATE_DATE``, so the
  packed ids do not change from one day to the next.

The content budget of a round is split between prompt / A / B by ``fractions``; a part shorter than its
share gives the rest to the others (water-filling, in integer arithmetic). A round that does not fit whole
is kept, cut, only if at least ``min_round_tokens`` of content budget remain for it (the first round is
always kept: the constructor refuses a ``max_length`` too small for that).

This module never imports torch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .config import PackConfig
from .parsing import repair_surrogates, swap_labels

Ids = list[int]
_SENTINEL = "LMSYSBODYSENTINEL"
TEMPLATE_DATE = "26 Jul 2024"  # Llama-3.1's own fallback; any fixed date keeps the ids stable
_WEIGHT_SCALE = 1_000_000  # fractions → integer weights, so A and B shares are exactly equal


@dataclasses.dataclass(frozen=True)
class Packed:
    """One packed row.

    Attributes:
        input_ids: the ids, ``len <= max_length``.
        rounds_kept: how many rounds are in ``input_ids`` (the others were dropped).
        n_rounds: rounds in the conversation.
        truncated: True when any part was cut or any round dropped.
        spans: per kept round (in output order), ``(start, end)`` of the prompt, A and B content in
            ``input_ids`` (headers excluded; cut markers inside a part included).
    """

    input_ids: Ids
    rounds_kept: int
    n_rounds: int
    truncated: bool
    spans: tuple[tuple[tuple[int, int], tuple[int, int], tuple[int, int]], ...]


class Packer:
    """Packs conversations for one tokenizer and one ``PackConfig``.

    >>> packer = Packer(tokenizer, PackConfig(max_length=256))           # doctest: +SKIP
    >>> row = packer.pack(["Hi?"], ["Hello!"], ["Hey."])                 # doctest: +SKIP
    >>> len(row.input_ids) <= 256                                          # doctest: +SKIP
    True
    """

    def __init__(self, tokenizer: Any, cfg: PackConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self._batch_ids = batch_encoder(tokenizer)
        self.prefix, self.suffix = frame_ids(tokenizer, cfg.use_chat_template)
        enc = self.encode
        self.headers = (enc(cfg.prompt_header), enc(cfg.a_header), enc(cfg.b_header))
        self.separator = enc(cfg.round_separator)
        self.marker = enc(cfg.cut_marker)
        self.tail = enc(cfg.tail)
        if not self.marker:
            raise ValueError(f"cut_marker {cfg.cut_marker!r} tokenizes to no ids")
        self.weights = _integer_weights(cfg.fractions)
        self.min_content = self._min_content()
        self.fixed = len(self.prefix) + len(self.tail) + len(self.suffix)
        smallest = self.fixed + len(self.marker) + sum(map(len, self.headers)) + self.min_content
        if cfg.max_length < smallest:
            raise ValueError(f"max_length={cfg.max_length} is too small for this tokenizer and layout: "
                             f"need >= {smallest} ids (fixed {self.fixed}, headers, marker, and "
                             f"{self.min_content} content ids so each part shows at least one id)")

    # -- tokenizing -------------------------------------------------------------------------------

    def encode(self, text: str) -> Ids:
        """Ids of ``text`` without special tokens."""
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str]) -> list[Ids]:
        """Ids of many texts in one batched call (fast tokenizers run it in parallel). Lone surrogates
        (which make tokenizers raise) are replaced by U+FFFD first, as ``parsing`` does."""
        if not texts:
            return []
        return self._batch_ids([repair_surrogates(t)[0] for t in texts])

    # -- packing ----------------------------------------------------------------------------------

    def pack(self, prompt: Sequence[str], response_a: Sequence[str], response_b: Sequence[str],
             swap: bool = False) -> Packed:
        """Pack one conversation given as aligned turn lists; ``swap`` puts B first (the A/B swap)."""
        if not (len(prompt) == len(response_a) == len(response_b)) or not prompt:
            raise ValueError("prompt, response_a and response_b must be non-empty lists of equal length")
        n = len(prompt)
        ids = self.encode_many([*prompt, *response_a, *response_b])
        rounds = [(ids[i], ids[n + i], ids[2 * n + i]) for i in range(n)]
        return self.pack_ids(rounds, swap=swap)

    def pack_ids(self, rounds: Sequence[tuple[Ids, Ids, Ids]], swap: bool = False) -> Packed:
        """Pack already tokenized rounds ``[(prompt ids, A ids, B ids), …]`` (chronological order)."""
        if swap:
            rounds = [(p, b, a) for p, a, b in rounds]
        n = len(rounds)
        reserve = len(self.marker) if n > 1 else 0  # room for the dropped-rounds marker
        budget = self.cfg.max_length - self.fixed - reserve
        chosen = self._choose_rounds(rounds, budget)
        packed = self._assemble(chosen, n)
        if len(packed.input_ids) > self.cfg.max_length:  # a broken invariant must never pass silently
            raise AssertionError(f"packed {len(packed.input_ids)} ids > max_length {self.cfg.max_length}")
        return packed

    def _choose_rounds(self, rounds: Sequence[tuple[Ids, Ids, Ids]],
                       budget: int) -> list[tuple[int, tuple[Ids, Ids, Ids], bool]]:
        """Rounds kept, as (index, parts after cutting, was cut), in the order they were considered."""
        order = range(len(rounds) - 1, -1, -1) if self.cfg.keep_rounds == "last" else range(len(rounds))
        used, chosen = 0, []
        for idx in order:
            overhead = sum(map(len, self.headers)) + (len(self.separator) if chosen else 0)
            room = budget - used - overhead
            need = sum(map(len, rounds[idx]))
            if need <= room:
                chosen.append((idx, rounds[idx], False))
                used += overhead + need
                continue
            if room >= (self.min_content if not chosen else max(self.cfg.min_round_tokens, self.min_content)):
                parts = self._cut_round(rounds[idx], room)
                chosen.append((idx, parts, True))
            break
        return chosen

    def _cut_round(self, parts: tuple[Ids, Ids, Ids], room: int) -> tuple[Ids, Ids, Ids]:
        alloc = water_fill([len(p) for p in parts], self.weights, room)
        return tuple(self._cut(p, k) for p, k in zip(parts, alloc))  # type: ignore[return-value]

    def _cut(self, ids: Ids, keep: int) -> Ids:
        """``ids`` shortened to ``keep`` ids, the marker included where it was cut."""
        if len(ids) <= keep:
            return ids
        body = keep - len(self.marker)  # >= 1 by construction of min_content
        if self.cfg.cut == "end":
            return ids[:body] + self.marker
        if self.cfg.cut == "start":
            return self.marker + ids[len(ids) - body:]
        head = (body + 1) // 2
        tail = body - head
        return ids[:head] + self.marker + (ids[len(ids) - tail:] if tail else [])

    def _assemble(self, chosen: list[tuple[int, tuple[Ids, Ids, Ids], bool]], n_rounds: int) -> Packed:
        chosen = sorted(chosen)  # back to chronological order
        dropped = len(chosen) < n_rounds
        out: Ids = list(self.prefix)
        if dropped and self.cfg.keep_rounds == "last":
            out += self.marker
        spans = []
        for j, (_, parts, _) in enumerate(chosen):
            if j:
                out += self.separator
            round_spans = []
            for header, part in zip(self.headers, parts):
                out += header
                round_spans.append((len(out), len(out) + len(part)))
                out += part
            spans.append(tuple(round_spans))
        if dropped and self.cfg.keep_rounds == "first":
            out += self.marker
        out += self.tail + self.suffix
        cut = dropped or any(was_cut for _, _, was_cut in chosen)
        return Packed(out, len(chosen), n_rounds, cut, tuple(spans))  # type: ignore[arg-type]

    def _min_content(self) -> int:
        """Content budget at which every part's share is at least marker + 1 ids."""
        total = sum(self.weights)
        return math.ceil((len(self.marker) + 1) * total / min(self.weights))

    # -- frames -----------------------------------------------------------------------------------

    def pack_frame(self, frame: pd.DataFrame, swap: bool = False, progress: bool = False,
                   chunk: int = 2000) -> pd.DataFrame:
        """Pack every row of a conversation frame (from ``parsing``), in order.

        Returns a frame with ``id``, ``input_ids`` (int32 arrays), ``n_tokens``, ``rounds_kept``,
        ``n_rounds``, ``truncated`` and ``label`` (swapped with ``swap``), one row per input row.
        """
        return self.pack_frame_orientations(frame, (swap,), progress, chunk)[0]

    def pack_frame_orientations(self, frame: pd.DataFrame, swaps: Sequence[bool] = (False, True),
                                progress: bool = False, chunk: int = 2000) -> list[pd.DataFrame]:
        """``pack_frame`` for several A/B orientations at once: each text is tokenized a single time."""
        from tqdm.auto import tqdm

        packed: list[list[Packed]] = [[] for _ in swaps]
        with tqdm(total=len(frame), desc="pack", unit="row", disable=not progress) as bar:
            for start in range(0, len(frame), chunk):
                part = frame.iloc[start: start + chunk]
                rounds = self._tokenize_chunk(part)
                for out, swap in zip(packed, swaps):
                    out += [self.pack_ids(r, swap=swap) for r in rounds]
                bar.update(len(part))
        return [self._packed_frame(frame, rows, swap) for rows, swap in zip(packed, swaps)]

    @staticmethod
    def _packed_frame(frame: pd.DataFrame, packed: list[Packed], swap: bool) -> pd.DataFrame:
        labels = frame["label"].to_numpy() if "label" in frame.columns else np.full(len(frame), -1)
        return pd.DataFrame({
            "id": frame["id"].to_numpy(),
            "input_ids": [np.asarray(p.input_ids, dtype=np.int32) for p in packed],
            "n_tokens": np.array([len(p.input_ids) for p in packed], dtype=np.int32),
            "rounds_kept": np.array([p.rounds_kept for p in packed], dtype=np.int16),
            "n_rounds": np.array([p.n_rounds for p in packed], dtype=np.int16),
            "truncated": np.array([p.truncated for p in packed]),
            "label": swap_labels(labels) if swap else labels,
        })

    def _tokenize_chunk(self, part: pd.DataFrame) -> list[list[tuple[Ids, Ids, Ids]]]:
        """Each row's rounds as (prompt ids, A ids, B ids), every turn of the chunk tokenized in one call."""
        texts, bounds = [], []
        for row_id, p, a, b in zip(part["id"], part["prompt"], part["response_a"], part["response_b"]):
            if not (len(p) == len(a) == len(b)) or not p:
                raise ValueError(f"row id={row_id}: prompt/response_a/response_b have {len(p)}/{len(a)}/{len(b)} "
                                 "turns; use parsing.read_competition, which aligns them")
            bounds.append((len(texts), len(p)))
            texts += [*p, *a, *b]
        ids = self.encode_many(texts)
        return [[(ids[start + i], ids[start + n + i], ids[start + 2 * n + i]) for i in range(n)]
                for start, n in bounds]


_PROBES = ("Hello, world!", "  leading and trailing  ", "为什么天空是蓝色的？", "Привет 😀🚀", "tab\tnew\nline",
           "<|im_start|>user<|im_end|> <bos> <eos>", "ÀÉÎÕÜ ß ﬁ", "x" * 300, "")


def batch_encoder(tokenizer: Any) -> Callable[[list[str]], list[Ids]]:
    """A function texts → ids for ``tokenizer``: no special tokens added, and none *read* — user text that
    spells a control token (``<eos>``, ``<pad>``, ``<start_of_turn>``, ``<|eot_id|>``) is tokenised as plain
    text (``split_special_tokens``), so a conversation can never end a turn, fake padding or open a role.

    For a fast tokenizer it calls a copy of the Rust backend with ``encode_special_tokens`` set through its
    ``encode_batch_fast`` (no offsets, no per-row Python conversion: ~1.9× faster here), but only after
    checking on probe texts that it gives exactly the ids of ``tokenizer(texts, add_special_tokens=False,
    split_special_tokens=True)``; otherwise it uses that call. Either way the result is checked to map the
    tokenizer's own special-token strings to no special id (else ``ValueError``).
    """
    def wrapper(texts: list[str]) -> list[Ids]:
        out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [list(ids) for ids in out]

    encoder = wrapper
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(backend, "encode_batch_fast", None) is not None or getattr(backend, "encode_batch", None) is not None:
        backend = copy.deepcopy(backend)  # the tokenizer's own backend keeps reading control tokens
        backend.encode_special_tokens = True
        fast = getattr(backend, "encode_batch_fast", None) or backend.encode_batch

        def direct(texts: list[str]) -> list[Ids]:
            return [enc.ids for enc in fast(texts, add_special_tokens=False)]

        try:
            if direct(list(_PROBES)) == wrapper(list(_PROBES)):
                encoder = direct
        except Exception:  # any backend quirk: fall back to the documented call
            pass
    _check_no_control_tokens(tokenizer, encoder)
    return encoder


def control_tokens(tokenizer: Any) -> dict[str, int]:
    """Every special token of ``tokenizer`` (text → id): the named ones (bos, eos, pad, …) and every added
    token marked special (ChatML's ``<|im_start|>``, Gemma's ``<start_of_turn>``, Llama-3's reserved ones)."""
    found = dict(zip(getattr(tokenizer, "all_special_tokens", []), getattr(tokenizer, "all_special_ids", [])))
    for idx, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            found[str(token)] = int(idx)
    return {text: idx for text, idx in found.items() if text}


def _check_no_control_tokens(tokenizer: Any, encoder: Callable[[list[str]], list[Ids]]) -> None:
    """Refuse an encoder that maps the text of a special token to that token."""
    controls = control_tokens(tokenizer)
    special_ids = set(controls.values())
    leaked = sorted({t for t, ids in zip(controls, encoder([f"x {t} y" for t in controls]))
                     if special_ids & set(ids)})
    if leaked:
        raise ValueError(f"this tokenizer reads control tokens inside user text ({leaked[:5]}) even with "
                         "split_special_tokens: use a fast tokenizer (tokenizer.json) for this model")


def water_fill(needs: Sequence[int], weights: Sequence[int], budget: int) -> list[int]:
    """Split ``budget`` ids between parts in proportion to ``weights``, never giving a part more than it
    needs; what a capped part leaves is shared among the others. Integer, symmetric in equal weights.

    >>> water_fill([10, 500, 500], [2, 4, 4], 100)
    [10, 45, 45]
    """
    alloc = [0] * len(needs)
    active = [i for i, need in enumerate(needs) if need > 0]
    left = budget
    while active:
        total = sum(weights[i] for i in active)
        capped = [i for i in active if needs[i] * total <= left * weights[i]]
        if not capped:
            for i in active:
                alloc[i] = left * weights[i] // total
            break
        for i in capped:
            alloc[i] = needs[i]
            left -= needs[i]
        active = [i for i in active if i not in capped]
    return alloc


def _integer_weights(fractions: Sequence[float]) -> list[int]:
    total = sum(fractions)
    return [max(1, round(f / total * _WEIGHT_SCALE)) for f in fractions]


def frame_ids(tokenizer: Any, use_chat_template: bool = False) -> tuple[Ids, Ids]:
    """The ids a tokenizer puts before and after a text: (prefix, suffix).

    Without a chat template: what ``tokenizer(text)`` adds (e.g. ``[<bos>]``, ``[]``, or an EOS after).
    With one: the template rendered around a single user turn, with the generation prompt.
    """
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=True, date_string=TEMPLATE_DATE)
        before, _, after = text.partition(_SENTINEL)
        enc = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        dec = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        return list(enc), list(dec)
    probe = "probe text"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise ValueError("cannot find the text's ids inside tokenizer(text): unsupported tokenizer")
