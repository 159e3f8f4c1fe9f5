"""The competition's data, read exactly: JSON-list cells, nulls, labels, the A/B swap, grouped folds.

Contract of a *conversation frame* (what ``read_competition`` returns, what every later stage takes):
- one row per input row, in file order, none dropped; ``id`` is int64 when every id is a decimal integer
  (competition ids exceed 2^31), else str (the "33k" set's hex ids);
- ``prompt``, ``response_a``, ``response_b`` are lists of ``str`` of equal length ``n_rounds``: turn ``i``
  of the prompt is answered by turn ``i`` of each response. A JSON ``null`` turn becomes ``NULL_TURN``
  (never the string "None"); a missing turn (lists of unequal length) becomes ``MISSING_TURN``;
- lone UTF-16 surrogates (they crash tokenizers and UTF-8 encoders) are replaced by U+FFFD and counted;
- ``label`` is the class index A=0, B=1, tie=2 (``-1`` when the file has no labels);
- flags ``null_a``/``null_b`` (a null turn), ``empty_a``/``empty_b`` (no visible text at all),
  ``identical`` (same response text on both sides), ``n_surrogates`` (repairs in that row).

Bad input never passes silently: each problem is a ``Problem`` naming the row id, record number and
field. ``strict`` reading raises ``DataError`` listing every fatal problem; ``on_bad_cell="text"`` is the
documented fallback for inference (an undecodable cell is kept as one turn of raw text, with a warning).

This module never imports torch.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import math
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

LABEL_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
CLASSES = ("A", "B", "tie")
TEXT_COLUMNS = ("prompt", "response_a", "response_b")
TRAIN_COLUMNS = ("id", "model_a", "model_b", *TEXT_COLUMNS, *LABEL_COLUMNS)
TEST_COLUMNS = ("id", *TEXT_COLUMNS)
SUBMISSION_COLUMNS = ("id", *LABEL_COLUMNS)

# The A/B swap, as a permutation of the class index (A=0, B=1, tie=2): after exchanging response A and
# response B, class c of the original row is class AB_SWAP[c] of the swapped row. It is an involution.
AB_SWAP = (1, 0, 2)

NULL_TURN = "(null)"  # a JSON null turn: the arena logged no text for it (often a failed model call)
MISSING_TURN = "(missing)"  # a response list shorter than the prompt list
REPLACEMENT = "\ufffd"
# columns of a conversation frame (model_a/model_b follow id when the file has them)
FRAME_COLUMNS = ("id", "prompt", "response_a", "response_b", "n_rounds", "null_a", "null_b", "empty_a",
                 "empty_b", "identical", "n_surrogates", "label")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_INT_ID = re.compile(r"^-?\d{1,18}$")  # int64-safe; ids with a leading zero stay strings
_SPACES = re.compile(r"\s+")


class DataError(ValueError):
    """Fatal problems in an input file; ``problems`` lists each one."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{source}: {len(problems)} fatal problem(s)\n{shown}{more}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with one row (``record`` is the 1-based data record, header excluded)."""

    field: str
    message: str
    row_id: Any = None
    record: int | None = None
    fatal: bool = True

    def __str__(self) -> str:
        where = "file" if self.record is None else f"row id={self.row_id} (record {self.record})"
        return f"{where} field={self.field}: {self.message}"


@dataclasses.dataclass
class ParseResult:
    """A parsed frame with everything noticed while reading it."""

    frame: pd.DataFrame
    kind: str
    problems: list[Problem]

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.fatal]


class CellError(ValueError):
    """A text cell that is not a JSON list of strings/nulls."""


# ---------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------


def repair_surrogates(text: str) -> tuple[str, int]:
    """Replace lone UTF-16 surrogates by U+FFFD; returns (text, number replaced).

    >>> repair_surrogates("ok \\ud83d end")
    ('ok \\ufffd end', 1)
    """
    fixed, n = _LONE_SURROGATE.subn(REPLACEMENT, text)
    return fixed, n


def decode_cell(cell: Any, plain: bool = False) -> tuple[list[str], int, int]:
    """One prompt/response cell → (turns, n_null_turns, n_surrogates_repaired).

    ``cell`` is the competition's JSON list text (``'["a",null]'``), or an already decoded list (parquet).
    With ``plain`` (a file of plain-string cells, see ``looks_plain``) a text cell is one turn, verbatim,
    even when it happens to look like JSON. Raises ``CellError`` on anything else.
    """
    items = [cell] if plain and isinstance(cell, str) else _cell_items(cell)
    turns, n_null, n_fixed = [], 0, 0
    for i, item in enumerate(items):
        if item is None or (isinstance(item, float) and math.isnan(item)):
            turns.append(NULL_TURN)
            n_null += 1
        elif isinstance(item, str):
            text, n = repair_surrogates(item)
            turns.append(text)
            n_fixed += n
        else:
            raise CellError(f"turn {i} is {type(item).__name__}, expected a string or null")
    if not turns:
        raise CellError("empty list: a row needs at least one turn")
    return turns, n_null, n_fixed


def _cell_items(cell: Any) -> list[Any]:
    if isinstance(cell, (list, tuple, np.ndarray)):
        return list(cell)
    if not isinstance(cell, str):
        raise CellError(f"expected JSON list text, got {type(cell).__name__}")
    try:
        items = json.loads(cell, strict=False)  # raw control characters inside strings are unambiguous
    except json.JSONDecodeError as err:
        raise CellError(f"not valid JSON ({err}): {cell[:60]!r}") from None
    if isinstance(items, list):
        return items
    raise CellError(f"JSON {type(items).__name__}, expected a list of turns: {cell[:60]!r}")


def looks_plain(raw: pd.DataFrame, sample: int = 2000) -> bool:
    """True for a file of plain-string cells (UltraFeedback-derived): most of its prompt cells are text
    that is not a JSON list. In the competition's files (and the 33k set) every cell is a JSON list, so a
    few broken cells there stay errors instead of turning the whole file into plain text."""
    cells = [c for c in raw["prompt"][:sample] if isinstance(c, str)]
    return bool(cells) and sum(_is_json_list(c) for c in cells) < len(cells) / 2


def _is_json_list(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return False


def encode_cell(turns: Sequence[str | None]) -> str:
    """Turns → the competition's cell text: a JSON list, no spaces, ASCII with ``\\u`` escapes.

    >>> encode_cell(["héllo", None])
    '["h\\\\u00e9llo",null]'
    """
    return json.dumps(list(turns), ensure_ascii=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or parquet file as strings, exactly: no NA guessing, empty cells stay ''.

    CSV must be UTF-8 (a leading BOM is tolerated); an undecodable byte or a malformed line is a
    ``ValueError`` naming the file and where.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip-compressed CSV
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8: byte {err.start} (line {line}) is {data[err.start:err.start + 1]!r}") from None
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():  # a row with more fields than the header: an error, not a truncation
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False,
                               index_col=False)
    except (pd.errors.ParserError, pd.errors.ParserWarning, ValueError) as err:
        raise ValueError(f"{path}: malformed CSV: {err}") from None


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` in the competition's CSV dialect (UTF-8, LF, minimal quoting, quotes doubled)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(frame.columns)
        writer.writerows(frame.itertuples(index=False, name=None))
    return path


def detect_kind(columns: Iterable[str]) -> str:
    """Which file this is from its columns: train, test, submission or ultrafeedback."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "ultrafeedback"
    labelled = bool(cols & set(LABEL_COLUMNS))
    if cols & set(TEXT_COLUMNS):
        return "train" if labelled else "test"
    if labelled:
        return "submission"
    return "unknown"


def read_competition(path: str | Path, kind: str = "auto", strict: bool = True,
                     on_bad_cell: str = "raise", plain: bool = False) -> ParseResult:
    """Read train/test (or the 33k set, same columns) into a conversation frame.

    Args:
        path: CSV or parquet.
        kind: "train", "test" or "auto" (from the columns).
        strict: raise ``DataError`` listing every fatal problem; otherwise return them in the result.
        on_bad_cell: "raise" (a fatal problem) or "text" (documented fallback: the raw cell becomes one
            turn of text and a warning is recorded — for inference, where every row needs a prediction).
        plain: every text cell is one plain-string turn (UltraFeedback-derived data; see ``looks_plain``).
    Returns:
        ``ParseResult`` with the frame (all rows, file order), kind and problems.
    """
    raw = read_table(path)
    kind = detect_kind(raw.columns) if kind == "auto" else kind
    if kind not in ("train", "test"):
        raise DataError(str(path), [Problem("columns", f"not a train/test file (looks like {kind}); "
                                            f"columns are {list(raw.columns)}")])
    result = parse_frame(raw, kind, on_bad_cell=on_bad_cell, plain=plain)
    if strict and result.fatal:
        raise DataError(str(path), result.fatal)
    return result


def parse_frame(raw: pd.DataFrame, kind: str, on_bad_cell: str = "raise",
                plain: bool = False) -> ParseResult:
    """Raw string frame → conversation frame (see the module contract); never drops a row."""
    required = TRAIN_COLUMNS if kind == "train" else TEST_COLUMNS
    missing = [c for c in required if c not in raw.columns and c not in ("model_a", "model_b")]
    if missing:
        return ParseResult(pd.DataFrame(columns=list(FRAME_COLUMNS)), kind,
                           [Problem(c, "missing column") for c in missing])
    ids, problems = parse_ids(raw["id"])
    labels = np.full(len(raw), -1, dtype=np.int8)
    if kind == "train":
        labels, label_problems = parse_labels(raw, ids)
        problems += label_problems
    rows, cell_problems = _parse_rows(raw, ids, on_bad_cell, plain)
    problems += cell_problems
    frame = pd.DataFrame(rows, columns=list(FRAME_COLUMNS[1:-1]))
    frame.insert(0, "id", ids)
    for col in ("model_a", "model_b"):
        if col in raw.columns:
            frame[col] = raw[col].astype(str).to_numpy()
    frame["label"] = labels
    return ParseResult(frame, kind, problems)


def parse_ids(column: pd.Series) -> tuple[pd.Series, list[Problem]]:
    """Ids → int64 when all are decimal integers, else str; empty and duplicate ids are fatal."""
    text = column.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip())
    problems = [Problem("id", "empty id", row_id="", record=i + 1) for i in np.flatnonzero(text == "")]
    numeric = text.map(lambda s: bool(_INT_ID.match(s)) and not (len(s) > 1 and s.lstrip("-").startswith("0")))
    ids = text.astype("int64") if len(text) and numeric.all() else text
    dup = ids.duplicated(keep=False).to_numpy()
    for i in np.flatnonzero(dup & (text != "").to_numpy()):
        problems.append(Problem("id", "duplicate id", row_id=ids.iloc[i], record=i + 1))
    return ids.reset_index(drop=True), problems


def parse_labels(raw: pd.DataFrame, ids: pd.Series) -> tuple[np.ndarray, list[Problem]]:
    """The three one-hot winner columns → class index (A=0, B=1, tie=2); anything else is fatal."""
    labels = np.full(len(raw), -1, dtype=np.int8)
    problems = []
    values = raw[list(LABEL_COLUMNS)].astype(str).to_numpy()
    for i, row in enumerate(values):
        onehot = [_as_binary(v) for v in row]
        if None in onehot or sum(onehot) != 1:
            problems.append(Problem("winner_model_a/winner_model_b/winner_tie",
                                    f"labels not one-hot: {tuple(row)}", row_id=ids.iloc[i], record=i + 1))
        else:
            labels[i] = onehot.index(1)
    return labels, problems


def _as_binary(value: str) -> int | None:
    if value in ("True", "False"):  # boolean columns (parquet)
        return int(value == "True")
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


def _parse_rows(raw: pd.DataFrame, ids: pd.Series, on_bad_cell: str,
                plain: bool) -> tuple[list[dict[str, Any]], list[Problem]]:
    rows, problems = [], []
    cells = raw[list(TEXT_COLUMNS)].to_numpy()
    for i, triple in enumerate(cells):
        parts, counts = {}, {"null": {}, "fixed": 0}
        for field, cell in zip(TEXT_COLUMNS, triple):
            try:
                turns, n_null, n_fixed = decode_cell(cell, plain=plain)
            except CellError as err:
                fallback = on_bad_cell == "text" and isinstance(cell, str)
                problems.append(Problem(field, str(err) + ("; kept as one text turn" if fallback else ""),
                                        row_id=ids.iloc[i], record=i + 1, fatal=not fallback))
                turns, n_null, n_fixed = ([repair_surrogates(cell)[0]] if fallback else [""]), 0, 0
            parts[field], counts["null"][field] = turns, n_null
            counts["fixed"] += n_fixed
        problems += _row_warnings(parts, counts, ids.iloc[i], i + 1)
        rows.append(_align_rounds(parts) | _row_flags(parts, counts))
    return rows, problems


def _row_warnings(parts: dict[str, list[str]], counts: dict[str, Any], row_id: Any,
                  record: int) -> list[Problem]:
    out = []
    lengths = {f: len(t) for f, t in parts.items()}
    if len(set(lengths.values())) > 1:
        out.append(Problem("prompt/response_a/response_b", f"turn counts differ {lengths}; short lists "
                           f"padded with {MISSING_TURN!r}", row_id=row_id, record=record, fatal=False))
    if counts["fixed"]:
        out.append(Problem("text", f"{counts['fixed']} lone surrogate(s) replaced by U+FFFD",
                           row_id=row_id, record=record, fatal=False))
    return out


def _align_rounds(parts: dict[str, list[str]]) -> dict[str, Any]:
    n = max(len(t) for t in parts.values())
    aligned = {f: t + [MISSING_TURN] * (n - len(t)) for f, t in parts.items()}
    return aligned | {"n_rounds": n}


def _row_flags(parts: dict[str, list[str]], counts: dict[str, Any]) -> dict[str, Any]:
    a, b = parts["response_a"], parts["response_b"]
    return {
        "null_a": counts["null"]["response_a"] > 0,
        "null_b": counts["null"]["response_b"] > 0,
        "empty_a": is_empty(a),
        "empty_b": is_empty(b),
        "identical": a == b,
        "n_surrogates": counts["fixed"],
    }


def is_empty(turns: Sequence[str]) -> bool:
    """True when a response shows no text at all (every turn null, missing or blank)."""
    return all(t in (NULL_TURN, MISSING_TURN) or not t.strip() for t in turns)


# ---------------------------------------------------------------------------------------------------
# Extra data sets
# ---------------------------------------------------------------------------------------------------


def read_extra(path: str | Path, seed: int = 0, strict: bool = True) -> ParseResult:
    """Read an extra preference data set into a conversation frame.

    Formats:
    - the "33k" set: the train columns, hex-string ids, ``", "`` separators — read like train;
    - UltraFeedback-derived, competition columns with a plain-string prompt (and responses): plain
      strings become single turns;
    - UltraFeedback-derived ``chosen``/``rejected`` message lists with ratings (``score_chosen`` /
      ``score_rejected``): equal ratings are a tie; which side is A is drawn with ``seed`` (chosen always
      in A would teach the model a position).
    """
    result = _parse_extra(read_table(path), seed)
    if result.kind == "unknown":
        raise DataError(str(path), result.problems)
    if strict and result.fatal:
        raise DataError(str(path), result.fatal)
    return result


def _parse_extra(raw: pd.DataFrame, seed: int) -> ParseResult:
    kind = detect_kind(raw.columns)
    problems: list[Problem] = []
    if kind == "ultrafeedback":
        raw, problems = chosen_rejected_to_competition(raw, seed)
        kind = "train"
    if kind != "train":
        return ParseResult(pd.DataFrame(columns=list(FRAME_COLUMNS)), "unknown",
                           [Problem("columns", f"not a labelled preference file; columns are {list(raw.columns)}")])
    result = parse_frame(raw, "train", plain=looks_plain(raw))
    result.problems[:0] = problems
    return result


def chosen_rejected_to_competition(raw: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, list[Problem]]:
    """``chosen``/``rejected`` message lists (+ ratings) → competition columns, A/B drawn at random.

    Returns the frame (one row per input row; a row that cannot be read keeps empty cells, which
    ``parse_frame`` then reports) and the problems found, each naming its row and field.
    """
    rng = np.random.default_rng(seed)
    score_c = _first_column(raw, ("score_chosen", "chosen-rating", "chosen_rating"))
    score_r = _first_column(raw, ("score_rejected", "rejected-rating", "rejected_rating"))
    problems = []
    if (score_c is None) != (score_r is None):
        problems.append(Problem(score_c or score_r or "score", "only one side has a rating column"))
        score_c = score_r = None
    rows = []
    for i, rec in enumerate(raw.to_dict("records")):
        row_id = str(rec.get("prompt_id", rec.get("id", i)))
        chosen_first = bool(rng.random() < 0.5)  # drawn for every row, so a bad row shifts nothing
        try:
            rows.append(_chosen_rejected_row(rec, row_id, chosen_first, score_c, score_r))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            problems.append(Problem(getattr(err, "field", "chosen/rejected"), str(err), row_id, i + 1))
            rows.append({"id": row_id, "model_a": "", "model_b": "", "prompt": "", "response_a": "",
                         "response_b": ""} | dict(zip(LABEL_COLUMNS, ("0", "0", "1"))))
    return pd.DataFrame(rows, columns=list(TRAIN_COLUMNS)), problems


def _chosen_rejected_row(rec: dict[str, Any], row_id: str, chosen_first: bool, score_c: str | None,
                         score_r: str | None) -> dict[str, Any]:
    chosen, rejected = _messages(rec, "chosen"), _messages(rec, "rejected")
    user = [m["content"] for m in chosen if m.get("role") == "user"]
    ans_c = [m["content"] for m in chosen if m.get("role") == "assistant"]
    ans_r = [m["content"] for m in rejected if m.get("role") == "assistant"]
    tie = score_c is not None and _score(rec, score_c) == _score(rec, score_r)
    a, b = (ans_c, ans_r) if chosen_first else (ans_r, ans_c)
    winner = (0, 0, 1) if tie else ((1, 0, 0) if chosen_first else (0, 1, 0))
    return {"id": row_id, "model_a": "", "model_b": "", "prompt": encode_cell(user),
            "response_a": encode_cell(a), "response_b": encode_cell(b)} | dict(zip(LABEL_COLUMNS, map(str, winner)))


def _score(rec: dict[str, Any], column: str | None) -> float:
    try:
        return float(rec[column])
    except (TypeError, ValueError):
        raise _FieldError(column or "score", f"rating {rec.get(column)!r} is not a number") from None


class _FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _first_column(raw: pd.DataFrame, names: Sequence[str]) -> str | None:
    return next((n for n in names if n in raw.columns), None)


def _messages(rec: dict[str, Any], field: str) -> list[dict[str, Any]]:
    """A message list cell → [{"role", "content"}, …]; anything else raises naming the field."""
    cell = rec[field]
    try:
        messages = json.loads(cell) if isinstance(cell, str) else list(cell)
    except (json.JSONDecodeError, TypeError):
        raise _FieldError(field, f"not a JSON list of messages: {str(cell)[:60]!r}") from None
    if not isinstance(messages, list) or not messages:
        raise _FieldError(field, "expected a non-empty list of messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise _FieldError(field, f"message without a role and a string content: {str(m)[:60]!r}")
        out.append(dict(m))
    return out


# ---------------------------------------------------------------------------------------------------
# Submissions
# ---------------------------------------------------------------------------------------------------


def subsample(frame: pd.DataFrame, fraction: float, seed: int = 0) -> pd.DataFrame:
    """A dry run's share of ``frame``: ``fraction`` 1 returns it unchanged; 0 < fraction < 1 a seeded random
    share of at least one row, in the original order. Anything else raises ``ValueError``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"dry-run fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1 or len(frame) == 0:
        return frame
    n = max(1, round(len(frame) * fraction))
    keep = np.sort(np.random.default_rng(seed).choice(len(frame), size=n, replace=False))
    return frame.iloc[keep]


def check_submission(frame: pd.DataFrame, test_ids: Sequence[Any] | None = None,
                     tol: float = 1e-3) -> list[Problem]:
    """Problems of a submission: columns, unique ids, probabilities finite, in [0, 1], summing to 1,
    and (when ``test_ids`` is given) exactly the test ids in the test's order."""
    missing = [c for c in SUBMISSION_COLUMNS if c not in frame.columns]
    if missing:
        return [Problem(c, "missing column") for c in missing]
    ids, problems = parse_ids(frame["id"])
    probs = frame[list(LABEL_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    for i in range(len(frame)):
        row = probs[i]
        if not np.isfinite(row).all():
            msg = f"non-finite or non-numeric probability {tuple(frame.iloc[i][list(LABEL_COLUMNS)])}"
        elif (row < 0).any() or (row > 1).any():
            msg = f"probability outside [0, 1]: {tuple(row)}"
        elif abs(row.sum() - 1.0) > tol:
            msg = f"probabilities sum to {row.sum():.6f}, not 1"
        else:
            continue
        problems.append(Problem("winner_model_a/winner_model_b/winner_tie", msg, ids.iloc[i], i + 1))
    if test_ids is not None and [str(x) for x in ids] != [str(x) for x in test_ids]:
        problems.append(Problem("id", f"ids differ from the test file's ({len(ids)} vs {len(test_ids)} "
                                      "rows, or another order)"))
    return problems


# ---------------------------------------------------------------------------------------------------
# Labels, swap, folds, de-duplication
# ---------------------------------------------------------------------------------------------------


def labels_to_onehot(labels: np.ndarray) -> np.ndarray:
    """Class indices (n,) → one-hot float (n, 3) in the winner column order."""
    labels = np.asarray(labels)
    if ((labels < 0) | (labels > 2)).any():
        raise ValueError("labels must be class indices 0 (A), 1 (B) or 2 (tie)")
    return np.eye(3)[labels]


def swap_labels(labels: np.ndarray) -> np.ndarray:
    """Class indices of the A/B-swapped rows (``-1``, unknown, stays ``-1``)."""
    labels = np.asarray(labels)
    out = np.asarray(AB_SWAP, dtype=labels.dtype)[np.clip(labels, 0, 2)]
    return np.where(labels < 0, labels, out)


def swap_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities (…, 3) of the A/B-swapped rows: columns permuted by ``AB_SWAP``."""
    return np.asarray(probs)[..., list(AB_SWAP)]


_SWAP_PAIRS = (("response_a", "response_b"), ("model_a", "model_b"), ("null_a", "null_b"),
               ("empty_a", "empty_b"))


def swap_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The same conversations with response A and response B exchanged, labels permuted by AB_SWAP."""
    out = frame.copy()
    for left, right in _SWAP_PAIRS:
        if left in out.columns and right in out.columns:
            out[left], out[right] = frame[right].to_numpy(), frame[left].to_numpy()
    if "label" in out.columns:
        out["label"] = swap_labels(frame["label"].to_numpy())
    return out


def normalise_text(text: str) -> str:
    """Canonical form for grouping and de-duplication: NFKC, case-folded, whitespace collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def prompt_key(turns: Sequence[str]) -> str:
    """Normalised prompt of a conversation (all its turns): the grouping key of the folds."""
    return normalise_text("\n".join(turns))


def grouped_folds(frame: pd.DataFrame, k: int = 5, seed: int = 42) -> np.ndarray:
    """Fold index per row such that rows with the same normalised prompt share a fold.

    Deterministic for a given (prompts, k, seed): groups are shuffled with ``seed``, then placed largest
    first into the fold with the fewest rows so far, so folds are balanced to within one group.
    """
    keys = frame["prompt"].map(prompt_key)
    codes, uniques = pd.factorize(keys)
    if k < 2 or len(uniques) < k:
        raise ValueError(f"cannot make {k} grouped folds from {len(uniques)} distinct prompts (k must be >= 2)")
    sizes = np.bincount(codes, minlength=len(uniques))
    order = np.random.default_rng(seed).permutation(len(uniques))
    order = order[np.argsort(-sizes[order], kind="stable")]
    group_fold = np.empty(len(uniques), dtype=np.int16)
    load = np.zeros(k, dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))
        group_fold[g] = f
        load[f] += sizes[g]
    return group_fold[codes]


def write_folds(train_csv: str | Path, out_path: str | Path, k: int = 5, seed: int = 42) -> list[int]:
    """Grouped folds of ``train_csv`` written as parquet (id, fold); returns the fold sizes."""
    frame = read_competition(train_csv).frame
    folds = grouped_folds(frame, k, seed)
    pd.DataFrame({"id": frame["id"], "fold": folds}).to_parquet(out_path)
    return np.bincount(folds, minlength=k).tolist()


def deduplicate(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop repeated conversations (the same prompt and responses, exactly, in either A/B order); keep the first.

    Returns the kept rows and counts: ``dropped``, and ``label_conflicts`` (a dropped copy whose label,
    after un-swapping, differs from the kept row's).
    """
    key, swapped = _pair_key(frame)
    labels = frame["label"].to_numpy() if "label" in frame.columns else np.full(len(frame), -1)
    canonical = np.where(swapped.to_numpy(), swap_labels(labels), labels)
    first = pd.Series(canonical).groupby(key.to_numpy()).transform("first").to_numpy()
    dup = key.duplicated(keep="first").to_numpy()
    conflicts = int((dup & (canonical != first)).sum())
    return frame.loc[~dup].reset_index(drop=True), {"dropped": int(dup.sum()), "label_conflicts": conflicts}


def drop_overlap(extra: pd.DataFrame, train: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """``extra`` without the conversations that are also in ``train`` (exactly, in either A/B order).

    Extra preference data (the 33k set above all) repeats competition rows; trained on before the folds,
    such a row would leak its label into the fold that holds it out. Returns the kept rows and the count.
    """
    seen = set(_pair_key(train)[0])
    hit = _pair_key(extra)[0].isin(seen).to_numpy()
    return extra.loc[~hit].reset_index(drop=True), int(hit.sum())


def _pair_key(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """One exact key per conversation, the same for both A/B orders; and whether the row was swapped to get it."""
    p = frame["prompt"].map(_exact_key)
    a = frame["response_a"].map(_exact_key)
    b = frame["response_b"].map(_exact_key)
    swapped = a > b
    return p + "\x00" + a.where(~swapped, b) + "\x00" + b.where(~swapped, a), swapped


def _exact_key(turns: Sequence[str]) -> str:
    return json.dumps(list(turns), ensure_ascii=False)  # turns kept apart: ["a","b c"] != ["a b","c"]


def summarise(result: ParseResult) -> dict[str, Any]:
    """Counts for reports: rows, label mix, multi-turn share, null/empty/identical/surrogate counts."""
    frame = result.frame
    if frame.empty:
        return {"rows": 0}
    out: dict[str, Any] = {
        "rows": len(frame),
        "multi_turn_share": float((frame["n_rounds"] > 1).mean()),
        "max_rounds": int(frame["n_rounds"].max()),
        "rows_with_null_turn": int((frame["null_a"] | frame["null_b"]
                                    | frame["prompt"].map(lambda t: NULL_TURN in t)).sum()),
        "rows_with_empty_response": int((frame["empty_a"] | frame["empty_b"]).sum()),
        "identical_responses": int(frame["identical"].sum()),
        "surrogates_repaired": int(frame["n_surrogates"].sum()),
    }
    if (frame["label"] >= 0).any():
        share = np.bincount(frame["label"][frame["label"] >= 0], minlength=3) / (frame["label"] >= 0).sum()
        out["label_share"] = dict(zip(CLASSES, np.round(share, 4).tolist()))
    return out


@dataclasses.dataclass
class ValidationReport:
    """What ``lmsys validate`` prints: the kind, counts, and every problem by row and field."""

    path: str
    kind: str
    summary: dict[str, Any]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    def render(self, max_warnings: int = 20) -> str:
        fatal = [p for p in self.problems if p.fatal]
        warn = [p for p in self.problems if not p.fatal]
        lines = [f"{self.path}: {self.kind}, {self.summary.get('rows', 0)} rows — "
                 f"{'OK' if self.ok else 'FAILED'} ({len(fatal)} fatal, {len(warn)} warnings)"]
        lines += [f"  {key}: {value}" for key, value in self.summary.items() if key != "rows"]
        lines += [f"  ERROR {p}" for p in fatal]
        lines += [f"  warning {p}" for p in warn[:max_warnings]]
        if len(warn) > max_warnings:
            lines.append(f"  … {len(warn) - max_warnings} more warnings")
        return "\n".join(lines)


def validate_file(path: str | Path, test_path: str | Path | None = None) -> ValidationReport:
    """Check a train/test/submission/extra file and collect every problem (never raises on bad rows).

    ``test_path``, for a submission: the ids must be exactly the test file's, in order.
    """
    raw = read_table(path)
    kind = detect_kind(raw.columns)
    if kind == "submission":
        test_ids = None if test_path is None else read_table(test_path)["id"].tolist()
        return ValidationReport(str(path), kind, {"rows": len(raw)}, check_submission(raw, test_ids))
    if kind == "ultrafeedback":
        result = _parse_extra(raw, seed=0)
        kind = "ultrafeedback (chosen/rejected)"
    elif kind in ("train", "test"):
        plain = "prompt" in raw.columns and looks_plain(raw)
        result = parse_frame(raw, kind, plain=plain)
        kind += " (plain-string cells)" if plain else ""
    else:
        missing = [c for c in TEST_COLUMNS if c not in raw.columns]
        return ValidationReport(str(path), "unknown", {"rows": len(raw)},
                                [Problem(c, "missing column") for c in missing])
    return ValidationReport(str(path), kind, summarise(result), result.problems)
