"""The offline inference kernel: token-budget batches, anytime swap-TTA, two devices, a length-aware deadline,
resume.

Contract:
- ``predict_proba(models, tokenizer, frame, cfg)`` → (n, 3) probabilities in the input order, whatever
  order the rows come in; every row gets finite probabilities summing to 1. ``score`` is the same with the
  run's report (where each row's numbers came from, steps taken, NaN/OOM events, throughput).
- Rows are packed once per orientation with our own packer (the training format), sorted by length and cut
  into batches of at most ``token_budget`` padded tokens; each batch is padded only to its longest row.
  The batch plan is a pure function of the rows and the config, so a resumed run computes exactly the
  batches an uninterrupted one would.
- Anytime swap-TTA: every row is first scored once, as given (pass 1); the time left is then spent on the
  A/B-swapped pass (the packer swaps the two spans; nothing else moves), most uncertain rows first — ranked by
  pass 1's entropy or margin (``tta_rank``) — for as many rows as the projected finish allows. A row with both
  passes gets the mean of its probabilities (the swapped one un-permuted with ``parsing.AB_SWAP``). With time
  for every row it is exactly full swap-TTA: the swapped batches are pass 1's batches. The rows chosen are
  saved (``predictions/tta_plan.json``) so that a resumed run finishes the same plan.
- Temperature: ``cfg.temperature`` is applied once, to what the passes give (``p ∝ p^(1/T)``, which is
  ``softmax(logits / T)`` for a row with one pass), on the model's rows only (not on rule or prior rows) —
  the way it is fitted on the final model's output (``fit_output_temperature``).
- Two devices: one model per device, each in its own thread, pulling batches from one queue (longest
  first) — both finish together whatever their speed. On a CPU the same code runs with one or two workers.
- Non-finite logits: the batch is recomputed row by row in fp32 (the model is cast up and back, which is
  lossless for fp16/bf16 weights); rows still non-finite get the prior (pass 1) or keep one pass (pass 2),
  and the log names them. A CUDA out-of-memory error splits the batch in halves and retries; one row that
  still does not fit gets the prior.
- Deadline: the budget counts from the kernel's start (``started_at``: the notebook's first cell, the CLI's
  process start). Batch times are modelled as ``a·tokens + b·Σ L² + c`` (matmuls, attention, per-batch
  overhead), fitted online on the measured batches, and the remaining plan is projected with it. When pass 1
  would end past the budget, only as many of the longest remaining rows as it takes are re-packed at
  ``degrade_max_length``; if even that does not fit, the shortest rows go first and what is left at the
  deadline gets the prior. Each step taken is recorded; a complete, valid submission is always written.
- Resume: finished batches of both passes are appended to ``work_dir/predictions/part-*.parquet`` every
  ``checkpoint_every`` rows, with the deadline's decisions (``short_plan.json``, ``tta_plan.json``) and the
  time model's measurements (``guard.json``); a restarted run with the same ``work_dir`` (and the same rows
  and config) scores every row once — never twice — and, when no deadline step was taken, ends with the same
  file as an uninterrupted run. The batch plan of pass 1 is a pure function of the rows and the config.
- Rule priors: rows whose responses are both empty/null, one empty, or identical get the class frequencies
  measured on training rows of the same kind (``measure_priors``), when ``rule_priors`` is on.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .batching import collate, token_budget_batches
from .config import InferenceConfig, to_dict
from .parsing import AB_SWAP, LABEL_COLUMNS, is_empty, normalise_text

RULES = ("both_empty", "a_empty", "b_empty", "identical")


# -- rule priors -----------------------------------------------------------------------------------


def row_rule(prompt: Sequence[str], a: Sequence[str], b: Sequence[str]) -> str | None:
    """Which rule a row falls under (None: the model decides)."""
    ea, eb = is_empty(a), is_empty(b)
    if ea and eb:
        return "both_empty"
    if ea:
        return "a_empty"
    if eb:
        return "b_empty"
    if [normalise_text(t) for t in a] == [normalise_text(t) for t in b]:
        return "identical"
    return None


def rules_of(frame: pd.DataFrame) -> list[str | None]:
    return [row_rule(p, a, b) for p, a, b in zip(frame["prompt"], frame["response_a"], frame["response_b"])]


def measure_priors(train: pd.DataFrame, smoothing: float = 1.0) -> dict[str, Any]:
    """Class frequencies of the labelled ``train`` rows under each rule, Laplace-smoothed towards the
    overall label distribution. A-empty and B-empty rows are pooled through the A/B swap (the B-empty
    prior is the A-empty one with columns permuted), which doubles the evidence for both."""
    labels = train["label"].to_numpy()
    overall = np.bincount(labels, minlength=3) / max(len(labels), 1)
    rules = rules_of(train)
    counts = {rule: np.zeros(3) for rule in RULES}
    for rule, label in zip(rules, labels):
        if rule == "b_empty":
            counts["a_empty"][AB_SWAP[label]] += 1
        elif rule is not None:
            counts[rule][label] += 1
    priors: dict[str, Any] = {"overall": overall.tolist(), "rows": len(labels), "counts": {}}
    for rule in ("both_empty", "a_empty", "identical"):
        c = counts[rule]
        priors[rule] = ((c + smoothing * 3 * overall) / (c.sum() + smoothing * 3)).tolist()
        priors["counts"][rule] = int(c.sum())
    for rule in ("both_empty", "identical"):  # symmetric rows: P(A wins) = P(B wins) by symmetry
        p = np.asarray(priors[rule])
        p[0] = p[1] = (p[0] + p[1]) / 2
        priors[rule] = p.tolist()
    priors["b_empty"] = [priors["a_empty"][i] for i in AB_SWAP]
    priors["counts"]["b_empty"] = priors["counts"]["a_empty"]
    return priors


def uniform_priors() -> dict[str, Any]:
    """No training rows at hand: every rule gets the uniform prior (and the log says so)."""
    third = [1 / 3] * 3
    return {rule: third for rule in (*RULES, "overall")} | {"rows": 0, "counts": {}}


# -- the kernel ------------------------------------------------------------------------------------

TTA_RANKS = ("entropy", "margin")
PLAIN, SWAP = "plain", "swap"  # the two passes of a row, as stored in the checkpoint parts


def uncertainty(probs: np.ndarray, how: str = "entropy") -> np.ndarray:
    """How unsure a first-pass prediction is (larger: less sure) — the order in which anytime TTA spends
    its time. ``entropy``: −Σ p log p; ``margin``: −(p₁ − p₂), the gap between the two likeliest classes."""
    probs = np.asarray(probs, dtype=np.float64)
    if how == "entropy":
        return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)
    if how == "margin":
        top = np.sort(probs, axis=1)
        return -(top[:, -1] - top[:, -2])
    raise ValueError(f"unknown TTA ranking {how!r}: one of {TTA_RANKS}")


@dataclasses.dataclass
class _Pass:
    """One orientation of some rows at one length: packed ids (row position → ids)."""

    ids: dict[int, Any]
    swap: bool
    max_length: int


class _Guard:
    """The deadline: measured batch times, a length-aware model of them, the projected finish.

    A batch of ``n`` rows padded to ``L`` tokens is modelled as ``a·n·L + b·n·L² + c`` seconds — matmuls
    grow with the tokens, attention with the square of the length, ``c`` is the per-batch overhead — fitted
    by least squares with non-negative coefficients on every measured batch (fewer than three batches, or a
    single length so far: ``a`` alone, the plain per-token rate). The clock counts from ``start`` — the
    kernel's start when the caller knows it (Kaggle's 9 hours include installing and loading the model),
    else the first call. Each worker's first batch is left out of the fit (CUDA context, kernel selection
    and compilation make it slow)."""

    def __init__(self, clock: Callable[[], float], log: Callable[[str], None], start: float | None = None):
        self.clock, self.log = clock, log
        self.start = clock() if start is None else float(start)
        self.xtx = np.zeros((3, 3))
        self.xty = np.zeros(3)
        self.yty = 0.0
        self.batches = 0
        self.tokens = 0.0
        self.busy = 0.0
        self.lengths: set[int] = set()
        self.coef: np.ndarray | None = None
        self.steps: list[str] = []

    def record(self, rows: int, length: int, seconds: float) -> None:
        x = np.array([rows * length, rows * float(length) ** 2, 1.0])
        self.xtx += np.outer(x, x)
        self.xty += x * seconds
        self.yty += seconds * seconds
        self.batches += 1
        self.tokens += rows * length
        self.busy += seconds
        self.lengths.add(int(length))
        self.coef = None

    def full(self) -> bool:
        """Whether the three-term model can be fitted: 3+ batches over lengths that differ by 20 % or more."""
        return self.batches >= 3 and bool(self.lengths) and max(self.lengths) >= 1.2 * min(self.lengths)

    def model(self) -> np.ndarray | None:
        """(a, b, c) ≥ 0, or None before any batch was measured."""
        if self.coef is None and self.batches and self.busy > 0:
            if self.full():
                self.coef = _nonnegative_fit(self.xtx, self.xty, self.yty)
            else:
                self.coef = np.array([self.busy / self.tokens, 0.0, 0.0])
        return self.coef


    def state(self) -> dict[str, Any]:
        return {"xtx": self.xtx.tolist(), "xty": self.xty.tolist(), "yty": self.yty, "batches": self.batches,
                "tokens": self.tokens, "busy": self.busy, "lengths": sorted(self.lengths)}

    def restore(self, saved: dict[str, Any]) -> None:
        """The measurements of an earlier session of the same run (same rows, model and settings)."""
        self.xtx, self.xty = np.array(saved["xtx"], dtype=float), np.array(saved["xty"], dtype=float)
        self.yty, self.batches = float(saved["yty"]), int(saved["batches"])
        self.tokens, self.busy = float(saved["tokens"]), float(saved["busy"])
        self.lengths, self.coef = {int(x) for x in saved["lengths"]}, None

    def seconds(self, rows: int, length: int) -> float:
        """Projected seconds of a batch (0 before anything was measured)."""
        coef = self.model()
        return 0.0 if coef is None else float(coef @ [rows * length, rows * float(length) ** 2, 1.0])

    def plan_seconds(self, shapes: Sequence[tuple[int, int]], workers: int) -> float:
        return sum(self.seconds(n, length) for n, length in shapes) / max(1, workers)

    def rate(self) -> float | None:
        return self.tokens / self.busy if self.busy > 0 and self.tokens > 0 else None

    def elapsed(self) -> float:
        return self.clock() - self.start

    def step(self, name: str, detail: str) -> None:
        if name not in self.steps:
            self.steps.append(name)
        self.log(f"deadline guard: {name} — {detail}")


def _nonnegative_fit(xtx: np.ndarray, xty: np.ndarray, yty: float) -> np.ndarray:
    """Least squares with every coefficient ≥ 0 (3 unknowns: each subset of them solved, the feasible one
    with the smallest residual kept), from the normal equations; columns scaled for conditioning."""
    import itertools

    scale = np.sqrt(np.clip(np.diag(xtx), 1e-300, None))
    a, v = xtx / np.outer(scale, scale), xty / scale
    best, best_res = np.zeros(3), yty
    for k in (1, 2, 3):
        for subset in itertools.combinations(range(3), k):
            idx = list(subset)
            try:
                beta = np.linalg.solve(a[np.ix_(idx, idx)], v[idx])
            except np.linalg.LinAlgError:
                continue
            if (beta < 0).any():
                continue
            full = np.zeros(3)
            full[idx] = beta
            res = yty - 2 * full @ v + full @ a @ full
            if res < best_res - 1e-12 * max(1.0, abs(yty)):
                best, best_res = full, res
    return best / scale


def predict_proba(models: Any, tokenizer: Any, frame: pd.DataFrame, cfg: InferenceConfig | None = None,
                  **kwargs: Any) -> np.ndarray:
    """(n, 3) probabilities of ``frame``'s rows in input order (``score`` without the report)."""
    return score(models, tokenizer, frame, cfg, **kwargs)[0]


def score(models: Any, tokenizer: Any, frame: pd.DataFrame, cfg: InferenceConfig | None = None,
          work_dir: str | Path | None = None, priors: dict[str, Any] | None = None,
          log: Callable[[str], None] = print, progress: bool = True,
          clock: Callable[[], float] = time.time, started_at: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Score every row of ``frame`` (a conversation frame from ``parsing``) → ((n, 3) probabilities in
    input order, report).

    Anytime TTA: every row is first scored once, as given (pass 1, longest batches first); the time left is
    then spent on the A/B-swapped pass (pass 2), most uncertain rows first (``cfg.tta_rank`` on the pass-1
    probabilities), for as many rows as the projected finish allows. With time for all of them the result
    is exactly full swap-TTA (the same batches as pass 1, the same numbers).

    Args:
        models: one model, or one per device (a list), each already on its device and in eval mode.
        tokenizer: the models' tokenizer (its pad id is used for padding).
        cfg: packing, batching, TTA, deadline and checkpoint settings.
        work_dir: where checkpoints go (``predictions/``); None: no checkpoints, no resume.
        priors: ``measure_priors`` output. None: the rule rows are scored by the model (a uniform guess
            would be worse than the model there) and fallbacks use the uniform prior.
        clock: the deadline's clock, seconds (tests pass a fake one).
        started_at: when the budget started, on ``clock`` (the kernel's start: the notebook's first cell,
            the CLI's process start); None: now.
    Returns:
        probabilities and a report: rows per source (``model`` = both passes, ``model:no-tta`` = pass 1
        only, ``…:len<L>`` re-packed shorter, ``rule:…``, ``prior:…``), degradation steps, the TTA share,
        NaN/OOM events, errors, the fitted time model, throughput, seconds.
    """
    from .prompting import Packer

    cfg = cfg or InferenceConfig()
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    Packer(tokenizer, dataclasses.replace(cfg.pack, max_length=cfg.degrade_max_length))  # too short: fail now
    if priors is None and cfg.rule_priors:
        log("no measured priors: rule rows (empty / identical responses) are scored by the model")
    use_rules = cfg.rule_priors and priors is not None
    priors = priors or uniform_priors()
    guard = _Guard(clock, log, started_at)
    start = time.perf_counter()
    kernel = _Kernel(models, tokenizer, frame, cfg, guard, priors, log, progress)
    rules = rules_of(frame) if use_rules else [None] * len(frame)
    for i, rule in enumerate(rules):
        if rule is not None:
            kernel.plain[i] = (np.asarray(priors[rule], dtype=np.float64), f"rule:{rule}")
    if work_dir:
        kernel.store = _Store(work_dir, frame, cfg, models[0], priors if use_rules else None, log)
        for rows, block, how, which in kernel.store.load():
            for r, p, s in zip(rows, block, how):
                if which == SWAP:
                    if s == "failed":
                        kernel.swap_failed.add(r)
                    else:
                        kernel.swapped[r] = p
                else:
                    kernel.plain[r] = (p, s)
        if kernel.store.guard_saved:
            guard.restore(kernel.store.guard_saved)
    model_rows = [i for i in range(len(frame)) if rules[i] is None]
    log(f"inference: {len(frame)} rows, {len(frame) - len(model_rows)} by rule, {len(model_rows)} for the model "
        f"on {len(models)} worker(s), TTA {'anytime (' + cfg.tta_rank + ')' if cfg.tta else 'off'}, max_length "
        f"{cfg.pack.max_length}, budget {cfg.time_budget_s / 3600:.2f} h of which {guard.elapsed() / 60:.1f} min "
        "already spent")
    kernel.first_pass(model_rows)
    if cfg.tta:
        kernel.second_pass(model_rows)
    return kernel.finish(start)


class _Kernel:
    """The state of one ``score`` call: what each row has, the queue of batches, the workers."""

    def __init__(self, models, tokenizer, frame, cfg, guard, priors, log, progress):
        self.models, self.tokenizer, self.frame, self.cfg = models, tokenizer, frame, cfg
        self.guard, self.priors, self.log, self.progress = guard, priors, log, progress
        self.plain: dict[int, tuple[np.ndarray, str]] = {}  # pass 1 (or rule / prior): probabilities, source
        self.swapped: dict[int, np.ndarray] = {}  # pass 2, un-permuted probabilities
        self.store: _Store | None = None
        self.events: dict[str, Any] = {"nan_rows": 0, "prior_rows": [], "oom_splits": 0, "errors": [],
                                       "lock": threading.Lock()}
        self.tta_planned = 0
        self.tta_rank = cfg.tta_rank
        self.full_ids: dict[int, Any] = {}  # row → its pass-1 ids at full length
        self.short_rows: set[int] = set()  # rows the deadline re-packed at degrade_max_length (saved: short_plan)
        self.swap_failed: set[int] = set()  # rows whose swapped pass failed: they keep one pass
        self.dead: set[int] = set()  # workers that stopped after failing: not used again

    # -- the two passes ---------------------------------------------------------------------------

    def first_pass(self, model_rows: list[int]) -> None:
        """Every row once, longest batches first. On resume: the rows a previous session re-packed short
        (``short_plan.json``) stay short, every row is scored once — the full-length batches are the ones an
        uninterrupted run has (whole batches are saved), minus the rows already done."""
        full = self._pass(model_rows, self.cfg.pack.max_length, swap=False)
        self.full_ids = full.ids  # the swapped pass's lengths (swapping A and B keeps a row's length)
        saved = self.store.plan("short") if self.store else None
        self.short_rows = set(saved or ())
        items = []
        for b in self._batches(full, [r for r in model_rows if r not in self.short_rows]):
            undone = [r for r in b if r not in self.plain]
            if undone:
                items.append((undone, full))
        short_todo = [r for r in sorted(self.short_rows) if r not in self.plain]
        if short_todo:
            short = self._pass(short_todo, self.cfg.degrade_max_length, swap=False)
            items += [(b, short) for b in self._batches(short, short_todo)]
        self._work(items, PLAIN)
        left = [r for r in model_rows if r not in self.plain]
        if left:  # the deadline ran out, or every worker failed
            how = "prior:error" if self.events["errors"] else "prior:deadline"
            for r in left:
                self.plain[r] = (np.asarray(self.priors["overall"], dtype=np.float64), how)
            self.events["prior_rows"] += [self.frame["id"].iloc[r] for r in left]

    def second_pass(self, model_rows: list[int]) -> None:
        """Swapped pass for the most uncertain rows that fit; the chosen rows are saved (``tta_plan.json``)
        so that a resumed run finishes the same plan."""
        eligible = [r for r in model_rows if self.plain[r][1] == "model:no-tta"]  # pass 1 at full length
        if not eligible:
            return
        if len(self.models) == len(self.dead):
            return
        saved = self.store.plan("tta") if self.store else None
        allowed = set(eligible)
        chosen = [r for r in saved if r in allowed] if saved is not None else None
        if chosen is None:
            probs = np.array([self.plain[r][0] for r in eligible])
            order = np.argsort(-uncertainty(probs, self.tta_rank), kind="stable")
            ranked = [eligible[i] for i in order]
            chosen = self._fit_rows(ranked)
            if self.store and self.guard.model() is not None:  # a plan sized without a time model is not kept
                self.store.save_plan("tta", chosen)
        rank = {r: i for i, r in enumerate(chosen)}
        self.tta_planned = len(chosen)
        if len(chosen) < len(eligible):
            self.guard.step("no-tta", f"time for the swapped pass of {len(chosen)} of {len(eligible)} rows "
                                      f"(the most uncertain by {self.tta_rank}); the others keep one pass")
        swap = self._pass(sorted(chosen), self.cfg.pack.max_length, swap=True)
        batches = self._batches(swap, sorted(chosen))
        batches.sort(key=lambda b: min(rank[r] for r in b))  # most uncertain first: what a late stop keeps
        done = self.swapped.keys() | self.swap_failed
        self._work([(b, swap) for b in batches if not all(r in done for r in b)], SWAP)

    def _fit_rows(self, ranked: list[int]) -> list[int]:
        """The longest prefix of ``ranked`` whose swapped batches fit in the time left (all of it when
        nothing has been measured: the guard stops a late batch anyway)."""
        left = self.cfg.time_budget_s - self.guard.elapsed()
        if self.guard.model() is None:
            return ranked

        def fits(k: int) -> bool:
            rows = sorted(ranked[:k])
            lengths = [len(self.full_ids[r]) for r in rows]
            shapes = [(len(b), max(lengths[i] for i in b)) for b in
                      token_budget_batches(lengths, self.cfg.token_budget, self.cfg.max_batch_rows)]
            return self.guard.plan_seconds(shapes, len(self.models) - len(self.dead)) <= left

        lo, hi = 0, len(ranked)  # fits(lo) holds; find the largest k that fits
        if fits(hi):
            return ranked
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return ranked[:lo]

    # -- plans --------------------------------------------------------------------------------------

    def _pass(self, rows: list[int], max_length: int, swap: bool) -> _Pass:
        from .prompting import Packer

        pack = dataclasses.replace(self.cfg.pack, max_length=max_length)
        part = self.frame.iloc[rows]
        ids: dict[int, Any] = {}
        if rows:
            table = Packer(self.tokenizer, pack).pack_frame_orientations(part, (swap,))[0]
            ids = dict(zip(rows, table["input_ids"]))
        return _Pass(ids, swap, max_length)

    def _batches(self, current: _Pass, rows: list[int]) -> list[list[int]]:
        """Length-sorted batches under the token budget, longest first — a pure function of the rows."""
        lengths = [len(current.ids[r]) for r in rows]
        return [[rows[i] for i in b] for b in
                token_budget_batches(lengths, self.cfg.token_budget, self.cfg.max_batch_rows)]

    def _shape(self, current: _Pass, batch: list[int]) -> tuple[int, int]:
        return len(batch), max(len(current.ids[r]) for r in batch)

    # -- the workers -----------------------------------------------------------------------------------

    def _work(self, items: list[tuple[list[int], _Pass]], which: str) -> None:
        from tqdm.auto import tqdm

        work: queue.Queue = queue.Queue()
        for item in items:
            work.put(item)
        lock = threading.Lock()
        workers = [(i, m) for i, m in enumerate(self.models) if i not in self.dead]
        state = {"stop": False, "alive": len(workers), "racing": False}
        bar = tqdm(total=sum(len(b) for b, _ in items), desc="predict" if which == PLAIN else "swap-TTA",
                   unit="row", disable=not self.progress)
        alive = {i for i, _ in workers}
        failed_by: dict[tuple[int, ...], set[int]] = {}

        def next_batch() -> tuple[list[int], _Pass] | None:
            with lock:
                if state["stop"]:
                    return None
                if which == PLAIN:
                    self._degrade(work, state)
                elif work.queue:
                    batch, current = work.queue[0]
                    if self.guard.elapsed() + self.guard.seconds(*self._shape(current, batch)) > self.cfg.time_budget_s:
                        state["stop"] = True
                        left = sum(len(b) for b, _ in work.queue)
                        self.guard.step("no-tta", f"time budget reached: {left} planned rows keep one pass")
                if state["stop"]:
                    return None
                try:
                    return work.get_nowait()
                except queue.Empty:
                    return None

        def finish(batch: list[int], current: _Pass, block: np.ndarray | None, seconds: float, warm: bool) -> None:
            with lock:
                if block is not None and warm:  # a worker's first batch carries its warm-up: not measured
                    self.guard.record(*self._shape(current, batch), seconds)
                    if self.store:
                        self.store.guard_saved = self.guard.state()
                if which == SWAP:  # a failed swapped row keeps its one pass (saved as failed: not retried)
                    if block is None:
                        block = np.full((len(batch), 3), np.nan)
                    keep = np.isfinite(block).all(axis=1)
                    rows = list(batch)
                    block = block[:, list(AB_SWAP)]
                    labels = ["model" if k else "failed" for k in keep]
                    for r, p, k in zip(rows, block, keep):
                        if k:
                            self.swapped[r] = p
                        else:
                            self.swap_failed.add(r)
                else:
                    rows = batch
                    how = "model:no-tta" + (f":len{current.max_length}"
                                            if current.max_length < self.cfg.pack.max_length else "")
                    if block is None:  # the batch failed twice on every worker that tried it
                        block, labels = np.tile(self.priors["overall"], (len(batch), 1)), ["prior:error"] * len(batch)
                    else:
                        bad = ~np.isfinite(block).all(axis=1)
                        block[bad] = self.priors["overall"]
                        labels = [("prior:non-finite" if b else how) for b in bad]
                    for r, p, s in zip(rows, block, labels):
                        self.plain[r] = (p, s)
                    self.events["prior_rows"] += [self.frame["id"].iloc[r] for r, lab in zip(rows, labels)
                                                  if lab.startswith("prior")]
                if self.store and rows:
                    self.store.add(rows, block, labels, which)
                bar.update(len(batch))
                remaining = [self._shape(c, b) for b, c in work.queue]
                eta = self.guard.elapsed() + self.guard.plan_seconds(remaining, state["alive"])
                if self.guard.model() is not None:
                    bar.set_postfix_str(f"done ≈ {eta / 60:.1f} min of {self.cfg.time_budget_s / 60:.0f}")

        def give_up_or_requeue(batch: list[int], current: _Pass, me: int) -> bool:
            """After a batch failed twice on worker ``me``: True → back to the queue for another worker that
            has not failed it; False → it gets the prior (pass 1) or keeps one pass (pass 2)."""
            with lock:
                tried = failed_by.setdefault(tuple(batch), set())
                tried.add(me)
                if [w for w in alive if w not in tried]:
                    work.put((batch, current))
                    return True
                return False

        def worker(me: int, model: Any) -> None:
            warm, failures_in_a_row = False, 0
            try:
                while (item := next_batch()) is not None:
                    batch, current = item
                    block, seconds, flags = None, 0.0, {}
                    for attempt in (1, 2):  # a failing batch is retried once on this worker
                        t0 = self.guard.clock()
                        try:
                            block = _score_batch(model, self.tokenizer, batch, current, self.events, self.log,
                                                 flags)
                            seconds = self.guard.clock() - t0
                            break
                        except Exception as err:  # noqa: BLE001 — reported; the run goes on
                            with self.events["lock"]:
                                self.events["errors"].append(f"{type(err).__name__}: {str(err)[:200]}")
                            self.log(f"batch of {len(batch)} rows failed on worker {me} ({_device(model)}, "
                                     f"attempt {attempt}): {type(err).__name__}: {err}")
                    if block is None:
                        failures_in_a_row += 1
                        if give_up_or_requeue(batch, current, me):
                            if failures_in_a_row >= 2:
                                self.log(f"worker {me} failed two batches in a row: it stops, the others go on")
                                with lock:
                                    self.dead.add(me)
                                return
                            continue
                    else:
                        failures_in_a_row = 0
                    finish(batch, current, block, seconds, warm and not flags.get("slow"))  # OOM / NaN: not timed
                    warm = warm or block is not None
            except BaseException as err:  # KeyboardInterrupt / SystemExit in a worker: stop the run, re-raise
                with lock:
                    state["stop"], state["fatal"] = True, err
            finally:
                with lock:
                    state["alive"] -= 1
                    alive.discard(me)

        threads = [threading.Thread(target=worker, args=(i, m), daemon=True) for i, m in workers]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
        except KeyboardInterrupt:  # a user stopping the notebook: let the workers end their batch, save, stop
            with lock:
                state["stop"] = True
            for t in threads:
                t.join()
            if self.store:
                self.store.flush()
            raise
        finally:
            bar.close()
        if self.store:
            self.store.flush()
        if state.get("fatal") is not None:
            raise state["fatal"]

    def _degrade(self, work: queue.Queue, state: dict[str, Any]) -> None:
        """Pass 1, under the lock, before each batch: when the projected end of pass 1 is past the budget,
        re-pack only as many of the longest remaining full-length rows at ``degrade_max_length`` as it takes
        to fit (again later if the projection grows; every decision is saved in ``short_plan.json``); when even
        that is not enough, score the shortest rows first until the time is spent (the rest get the prior). A
        batch that would end past the budget is not started — a shorter one may still be. While one length has
        been measured (the rows capped at max_length come first) the per-token rate over-projects the shorter
        rest by up to attention's share of the time, so a few more rows may be cut than needed — the safe side:
        a row cut short is still scored by the model, a row past the deadline gets the prior."""
        cfg, guard = self.cfg, self.guard
        if not work.queue:
            return
        late = lambda: guard.elapsed() + guard.seconds(*self._shape(work.queue[0][1], work.queue[0][0])) \
            > cfg.time_budget_s  # noqa: E731
        if late():
            if not state["racing"]:
                self._race(work, state)
            if late():
                state["stop"] = True
                guard.step("prior", f"time budget reached with {sum(len(b) for b, _ in work.queue)} rows left: "
                                    "they get the prior")
            return
        if guard.model() is None or state["racing"]:
            return
        left = cfg.time_budget_s - guard.elapsed()
        queued = list(work.queue)

        def fits(items: list[tuple[list[int], _Pass]]) -> bool:
            return guard.plan_seconds([self._shape(c, b) for b, c in items], state["alive"]) <= left

        if fits(queued):
            return
        heads = [i for i, (_, c) in enumerate(queued) if c.max_length > cfg.degrade_max_length]  # longest first
        if not heads:
            self._race(work, state)
            return
        head_rows = [r for i in heads for r in queued[i][0]]
        short = self._pass(head_rows, cfg.degrade_max_length, swap=False)

        def plan(j: int) -> list[tuple[list[int], _Pass]]:
            """The first j full-length queued batches' rows re-packed short, the rest as they are."""
            taken = set(heads[:j])
            cut = {r for i in taken for r in queued[i][0]}
            kept = [item for i, item in enumerate(queued) if i not in taken]
            return [(b, short) for b in self._batches(short, [r for r in head_rows if r in cut])] + kept

        lo, hi = 0, len(heads)  # fits(plan(0)) is False; the smallest j that fits, or all
        if fits(plan(hi)):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fits(plan(mid)) else (mid, hi)
        new = sorted(plan(hi), key=lambda item: -self._shape(item[1], item[0])[1])  # longest first still
        with work.mutex:
            work.queue.clear()
            work.queue.extend(new)
        cut = [r for i in heads[:hi] for r in queued[i][0]]
        self.short_rows.update(cut)
        if self.store:
            self.store.save_plan("short", sorted(self.short_rows))
        guard.step("short", f"pass 1 projected past the budget: the {len(cut)} longest of "
                            f"{sum(len(b) for b, _ in queued)} remaining rows re-packed at max_length "
                            f"{cfg.degrade_max_length}")
        if not fits(new):
            self._race(work, state)

    def _race(self, work: queue.Queue, state: dict[str, Any]) -> None:
        """The last stage: as many rows as the time allows, cheapest batches first."""
        with work.mutex:
            ordered = sorted(work.queue, key=lambda item: self._shape(item[1], item[0])[1])
            work.queue.clear()
            work.queue.extend(ordered)
        state["racing"] = True
        self.log("deadline guard: pass 1 projected past the budget with every row that can be re-packed short: "
                 "scoring the shortest remaining rows first; what is left at the deadline gets the prior")

    # -- the result ----------------------------------------------------------------------------------

    def finish(self, start: float) -> tuple[np.ndarray, dict[str, Any]]:
        n = len(self.frame)
        probs = np.zeros((n, 3))
        source = np.array([""] * n, dtype=object)
        for r in range(n):
            p, how = self.plain[r]
            if r in self.swapped and how.startswith("model:no-tta"):
                p, how = (p + self.swapped[r]) / 2, "model" + how[len("model:no-tta"):]
            probs[r], source[r] = p, how
        model_rows = np.array([s.startswith("model") for s in source], dtype=bool)
        if self.cfg.temperature != 1.0 and model_rows.any():  # once, on what the passes give: p ∝ p^(1/T)
            from .metrics import softmax

            probs[model_rows] = softmax(np.log(np.clip(probs[model_rows], 1e-300, None)), self.cfg.temperature)
        probs = _normalised(probs)
        counts = pd.Series(source).value_counts().to_dict()
        guard, model = self.guard, self.guard.model()
        scored = sum(1 for s in source if s.startswith("model"))
        tta = sum(1 for s in source if s == "model")
        report = {"rows": n, "sources": {str(k): int(v) for k, v in counts.items()}, "steps": guard.steps,
                  "tta_rows": tta, "tta_share": round(tta / scored, 4) if scored else 0.0,
                  "tta_planned": self.tta_planned, "tta_rank": self.tta_rank,
                  "nan_rows": self.events["nan_rows"], "prior_rows": self.events["prior_rows"],
                  "oom_splits": self.events["oom_splits"], "errors": self.events["errors"],
                  "tokens_per_s": guard.rate(), "row_sources": [str(x) for x in source],
                  "time_model": None if model is None else dict(zip(("a_per_token", "b_per_token_length", "c_per_batch"),
                                                                    map(float, model))),
                  "budget_s": self.cfg.time_budget_s, "elapsed_s": round(guard.elapsed(), 2),
                  "seconds": round(time.perf_counter() - start, 2), "workers": len(self.models),
                  "config": to_dict(self.cfg)}
        if self.store:
            self.store.finish(report)
        self.log(f"inference done in {report['seconds']:.1f} s: {report['sources']}, swap-TTA on "
                 f"{100 * report['tta_share']:.0f} % of the model's rows"
                 + (f"; steps taken: {guard.steps}" if guard.steps else "")
                 + (f"; WARNING {len(self.events['errors'])} error(s): {self.events['errors'][:3]}"
                    if self.events["errors"] else ""))
        return probs, report


def _normalised(probs: np.ndarray) -> np.ndarray:
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
    return probs / probs.sum(axis=1, keepdims=True)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _score_batch(model: Any, tokenizer: Any, batch: list[int], current: _Pass, events: dict[str, Any],
                 log: Callable[[str], None], flags: dict[str, Any] | None = None) -> np.ndarray:
    """(len(batch), 3) probabilities of one pass over the batch (NaN and OOM handled; non-finite rows stay
    NaN for the caller). The swapped pass's columns are still in the swapped order."""
    from .metrics import softmax

    return softmax(_logits(model, tokenizer, [current.ids[r] for r in batch], events, log, flags))


def _logits(model: Any, tokenizer: Any, rows: list[Any], events: dict[str, Any],
            log: Callable[[str], None], flags: dict[str, Any] | None = None) -> np.ndarray:
    """Logits of ``rows`` (fp32 numpy); OOM → halves; non-finite rows → recomputed alone in fp32. Either sets
    ``flags["slow"]`` (such a batch's time says nothing about the next one's)."""
    import torch

    flags = {} if flags is None else flags
    out_of_memory = False
    try:
        logits = _forward(model, tokenizer, rows)
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled below, outside the except: its traceback would pin the activations
    if out_of_memory:
        flags["slow"] = True
        _free(model)
        if len(rows) == 1:
            log("out of memory on a single row: it gets the prior")
            return np.full((1, 3), np.nan, dtype=np.float32)
        with events["lock"]:
            events["oom_splits"] += 1
        half = len(rows) // 2
        return np.concatenate([_logits(model, tokenizer, rows[:half], events, log, flags),
                               _logits(model, tokenizer, rows[half:], events, log, flags)])
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if len(bad):
        flags["slow"] = True
        with events["lock"]:
            events["nan_rows"] += len(bad)
        log(f"non-finite logits in {len(bad)} of {len(rows)} rows: recomputing them alone in fp32")
        for i, value in zip(bad, _recompute_fp32(model, tokenizer, [rows[i] for i in bad])):
            logits[i] = value
    return logits


def _forward(model: Any, tokenizer: Any, rows: list[Any]) -> np.ndarray:
    import torch

    device = _device(model)
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits.float().cpu().numpy()


def _recompute_fp32(model: Any, tokenizer: Any, rows: list[Any]) -> list[np.ndarray]:
    """Each row alone (no padding) with the weights in fp32: floating parameters are swapped for fp32
    copies and the original tensors put back afterwards (exactly — nothing is cast back); buffers are
    untouched. A quantised model keeps its weights (its GPU kernels take no fp32): the rows are only re-run
    alone. A row that still fails comes back as NaN."""
    import torch

    quantised = bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None))
    originals = {}
    out = []
    try:
        if not quantised:
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != torch.float32:
                    originals[p] = p.data
                    p.data = p.data.float()
        for row in rows:
            try:
                out.append(_forward(model, tokenizer, [row])[0])
            except Exception:  # noqa: BLE001 — no room for fp32, or a kernel without it: the prior
                out.append(np.full(3, np.nan, dtype=np.float32))
    except Exception:  # noqa: BLE001 — the fp32 copies did not fit
        out += [np.full(3, np.nan, dtype=np.float32)] * (len(rows) - len(out))
    finally:
        for p, data in originals.items():
            p.data = data
        _free(model)
    return out


def _free(model: Any) -> None:
    import torch

    if _device(model).type == "cuda":
        torch.cuda.empty_cache()


# -- models -----------------------------------------------------------------------------------------


def devices_for(spec: str = "auto") -> list[Any]:
    """'auto' → every CUDA device (else one CPU worker); 'cpu' / 'cpu:2' → one / two CPU workers;
    'cuda:0,cuda:1' → those devices."""
    import torch

    if spec == "auto":
        count = torch.cuda.device_count()
        return [torch.device(f"cuda:{i}") for i in range(count)] or [torch.device("cpu")]
    if spec.startswith("cpu"):
        workers = int(spec.split(":")[1]) if ":" in spec else 1
        return [torch.device("cpu")] * workers
    return [torch.device(d.strip()) for d in spec.split(",")]


def model_temperature(cfg: InferenceConfig, model_dir: str | Path, log: Callable[[str], None] = print,
                      ) -> InferenceConfig:
    """``cfg`` with the model folder's temperature (its ``lmsys_contract.json``, else a ``temperature.json``:
    fitted on the OOF logits) when ``cfg`` leaves it at 1.0; an explicit temperature in ``cfg`` wins (warned
    when it differs from the folder's)."""
    from .contract import temperature_of

    found = temperature_of(model_dir)
    if found is None:
        return cfg
    value, source = found
    if cfg.temperature != 1.0:
        if abs(cfg.temperature - value) > 1e-9:
            log(f"WARNING: temperature {cfg.temperature:g} given; the model's is {value:.3f} ({source})")
        return cfg
    log(f"temperature {value:.3f} from {source}")
    return dataclasses.replace(cfg, temperature=value)


def fit_output_temperature(models: Any, tokenizer: Any, frame: pd.DataFrame, cfg: InferenceConfig,
                           priors: dict[str, Any] | None = None, source: str = "holdout",
                           log: Callable[[str], None] = print) -> dict[str, Any]:
    """T fitted on the kernel's own output for labelled rows: ``score`` at T = 1 with the time to give every
    row both passes (what a submission gets when it finishes in time), then the T minimising the log loss of
    ``p ∝ p^(1/T)`` on the model's rows (rule rows keep their priors) — the way ``score`` applies it. Returns
    the contract's ``temperature`` entry (value, log loss before / after, rows, source, what it was fitted on)."""
    from .evaluate import fit_temperature, temperature_report

    if "label" not in frame.columns:
        raise ValueError(f"fitting a temperature needs labelled rows ({source} has no label column)")
    plain = dataclasses.replace(cfg, temperature=1.0, time_budget_s=1e9)
    probs, report = score(models, tokenizer, frame, plain, priors=priors, log=log, progress=False)
    mask = np.array([s.startswith("model") for s in report["row_sources"]], dtype=bool)
    if not mask.any():
        raise ValueError(f"{source}: no row was scored by the model (all rule / prior rows): no temperature to fit")
    labels = frame["label"].to_numpy()[mask]
    log_p = np.log(np.clip(probs[mask], 1e-300, None))
    value = fit_temperature(log_p, labels)
    fit = temperature_report(log_p, labels, value, source)
    what = (f"the kernel's output ({'swap-TTA averaged, ' if cfg.tta else 'one pass, '}T applied once after the "
            f"passes), {int(mask.sum())} model rows of {len(frame)}")
    log(f"temperature {value:.3f} fitted on {what}: log loss {fit['log_loss_before']:.4f} → {fit['log_loss_after']:.4f}")
    return {"value": value, **fit, "fitted_on": what, "tta_share": report["tta_share"], "max_length": cfg.pack.max_length}


def contract_temperature(model_dir: str | Path) -> tuple[float, str] | None:
    """(T, its source) saved with the model (``contract.temperature_of``), or None."""
    from .contract import temperature_of

    return temperature_of(model_dir)


def model_pack(cfg: InferenceConfig, model_dir: str | Path, explicit: bool = False,
               log: Callable[[str], None] = print) -> InferenceConfig:
    """``cfg`` with the prompt format of the model's contract (``contract.pack_for``) at ``cfg``'s length —
    unless ``explicit`` (the caller gave a format: it wins, warned when it differs)."""
    from .contract import pack_for

    pack = pack_for(model_dir, cfg.pack if explicit else None, max_length=cfg.pack.max_length, log=log)
    return dataclasses.replace(cfg, pack=pack, degrade_max_length=min(cfg.degrade_max_length, pack.max_length))


def load_models(model_dir: str | Path, devices: Sequence[Any], log: Callable[[str], None] = print) -> tuple[
        list[Any], Any, dict[str, Any]]:
    """One model per device (eval mode) + the tokenizer: a GPTQ folder through ``quantize.load_quantized``
    (the kernel recorded for the device), a plain checkpoint in fp16 on pre-Ampere GPUs (a T4 has no bf16),
    bf16 on newer ones, and on a CPU in its compute dtype (``modeling.cpu_dtype``: fp32 unless the CPU has
    native bf16). Prints the device map of each model and warns if any part is off its device."""
    from .modeling import attention_for, cpu_dtype, dtype_for, load_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json — not a model folder (on Kaggle attach the student "
                                "dataset, arena-distill-student-gptq, and pass its /kaggle/input/… folder)")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    sidecar = model_dir / "quantize.json"  # a GPTQ checkpoint remembers the dtype of the model it came from
    trained = (json.loads(sidecar.read_text(encoding="utf-8")).get("source_dtype") if sidecar.exists() else None) \
        or config.get("dtype") or config.get("torch_dtype")
    models, info = [], {}
    for device in devices:
        if config.get("quantization_config"):
            from .quantize import load_quantized

            model, _, info = load_quantized(model_dir, device, log=log)
        else:
            from transformers import AutoConfig, AutoModelForSequenceClassification

            dtype = cpu_dtype(log) if device.type == "cpu" else dtype_for(device)
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, dtype=dtype, attn_implementation=attention_for(AutoConfig.from_pretrained(model_dir)))
            model = model.to(device).eval()
            info = {"kernel": "dense", "dtype": str(dtype).split(".")[-1], "device": str(device)}
        match_embed_scale(model, trained, log)
        apply_attention_choice(model, model_dir, log)
        placed = {str(p.device) for p in model.parameters()}
        if placed != {str(device) if device.type == "cpu" else f"{device.type}:{device.index or 0}"}:
            log(f"WARNING: model for {device} has parameters on {sorted(placed)} — offloaded parts run far slower")
        log(f"model on {device}: {info.get('kernel')} kernel, {info.get('dtype')}")
        models.append(model)
    return models, load_tokenizer(model_dir), info


SDPA_NO_SOFTCAP = "sdpa-no-softcap"


def apply_attention_choice(model: Any, model_dir: str | Path, log: Callable[[str], None] = print) -> str:
    """The attention the model folder's contract chose (``attention_gate``): eager stays unless the gate
    passed ``sdpa-no-softcap``, which is then switched on (``modeling.sdpa_without_softcap``). Returns it."""
    from .contract import read
    from .modeling import sdpa_without_softcap

    found = read(model_dir) or {}
    choice = (found.get("attention") or {}).get("choice", "as loaded")
    if choice == SDPA_NO_SOFTCAP:
        sdpa_without_softcap(model)
        log(f"attention: sdpa with soft-capping off (passed the attention gate: {model_dir})")
    return choice


def attention_gate(model_dir: str | Path, frame: pd.DataFrame, cfg: InferenceConfig, device: Any = "cpu",
                   max_mean_kl: float = 1e-3, max_delta_log_loss: float = 2e-3,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Eager (soft-capping exact) or sdpa with soft-capping off, for a model that soft-caps its attention
    logits (Gemma-2), decided like the GPTQ gate: both score the labelled ``frame`` through the kernel (same
    rows, same batches); sdpa is chosen only when its mean KL to eager is ≤ ``max_mean_kl`` and its log loss
    is at most ``max_delta_log_loss`` above eager's. The decision, the measures and each side's seconds go
    into the folder's contract (``attention``); ``load_models`` follows it. A model without soft-capping is
    left alone (sdpa is exact for it)."""
    import torch

    from . import contract
    from .metrics import log_loss
    from .modeling import sdpa_without_softcap

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if not config.get("attn_logit_softcapping"):
        return {"choice": "as loaded", "reason": "no attention soft-capping: nothing to gate"}
    if "label" not in frame.columns:
        raise ValueError("the attention gate needs labelled rows (a label column)")
    found = contract.read(model_dir) or {}
    if (found.get("attention") or {}).get("choice") == SDPA_NO_SOFTCAP:
        raise ValueError(f"{model_dir}: the attention gate already chose sdpa; remove 'attention' from its contract "
                         "to measure again")
    models, tokenizer, _ = load_models(model_dir, [torch.device(device)] if not isinstance(device, torch.device)
                                       else [device], log=lambda _: None)
    model = models[0]
    plain = dataclasses.replace(cfg, time_budget_s=1e9)
    timings = {}

    def run(name: str) -> np.ndarray:
        score(model, tokenizer, frame.iloc[:2], plain, log=lambda _: None, progress=False)  # warm-up: not timed
        start = time.perf_counter()
        probs, _ = score(model, tokenizer, frame, plain, log=lambda _: None, progress=False)
        timings[name] = round(time.perf_counter() - start, 3)
        return probs

    eager = run("eager")
    sdpa_without_softcap(model)
    fast = run(SDPA_NO_SOFTCAP)
    labels = frame["label"].to_numpy()
    p, q = np.clip(eager, 1e-15, 1), np.clip(fast, 1e-15, 1)
    kl = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
    delta = log_loss(labels, fast) - log_loss(labels, eager)
    passed = kl <= max_mean_kl and delta <= max_delta_log_loss
    result = {"choice": SDPA_NO_SOFTCAP if passed else "eager", "kl_mean": kl, "delta_log_loss": delta,
              "log_loss_eager": log_loss(labels, eager), "rows": len(frame), "seconds": timings,
              "speedup": timings["eager"] / max(timings[SDPA_NO_SOFTCAP], 1e-9),
              "thresholds": {"max_mean_kl": max_mean_kl, "max_delta_log_loss": max_delta_log_loss},
              "device": str(device), "max_length": cfg.pack.max_length}
    if (model_dir / contract.CONTRACT_FILE).is_file():
        contract.set_entry(model_dir, "attention", result)
    else:
        log(f"WARNING: {model_dir} has no {contract.CONTRACT_FILE}: the attention gate's choice is not recorded and "
            "the model runs eager")
    log(f"attention gate: {result['choice']} — sdpa without soft-cap: mean KL {kl:.2e} (≤ {max_mean_kl:g}), "
        f"Δ log loss {delta:+.4f} (≤ {max_delta_log_loss:g}), {result['speedup']:.2f}× eager's speed on {len(frame)} rows")
    return result


def match_embed_scale(model: Any, trained_dtype: str | None, log: Callable[[str], None] = print) -> None:
    """Gemma multiplies embeddings by √hidden cast to the weights' dtype: √3584 is 60.0 in bf16 (what a
    bf16-trained model saw) but 59.875 in fp16. Running such a model in fp16 (a T4), set the scale to the
    bf16-rounded value, which fp16 holds exactly."""
    import torch

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    scale = getattr(embed, "embed_scale", None)
    if scale is None or trained_dtype not in ("bfloat16", "bf16") or embed.weight.dtype != torch.float16:
        return
    wanted = float(torch.tensor(float(getattr(embed, "scalar_embed_scale", scale))).to(torch.bfloat16))
    if float(scale.to(torch.float16)) != wanted:
        embed.embed_scale = torch.tensor(wanted, device=scale.device)
        log(f"embedding scale set to {wanted} (bf16-rounded, as trained) for fp16 inference")


# -- checkpoints -----------------------------------------------------------------------------------


class _Store:
    """Finished batches → ``predictions/part-*.parquet`` (position, id, probabilities, source).

    ``run.json`` identifies what the parts belong to — the model (its config and where it was loaded from),
    every row id, the priors and the settings that change the numbers (not the time budget or the checkpoint
    interval) — and a run that differs is refused instead of silently reusing another run's predictions.
    A part that cannot be written (disk full) turns checkpointing off with a warning; scoring goes on."""

    def __init__(self, work_dir: str | Path, frame: pd.DataFrame, cfg: InferenceConfig, model: Any,
                 priors: dict[str, Any] | None, log: Callable[[str], None]):
        import hashlib
        import uuid

        self.dir = Path(work_dir) / "predictions"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.every, self.log = cfg.checkpoint_every, log
        self.ids = frame["id"].astype(str).tolist()
        self.pending: list[pd.DataFrame] = []
        self.pending_rows = 0
        self.session = uuid.uuid4().hex[:8]
        self.enabled = True
        settings = {k: v for k, v in to_dict(cfg).items() if k not in ("time_budget_s", "checkpoint_every")}
        config = getattr(model, "config", None)
        model_key = (config.to_json_string(use_diff=False) if config is not None else repr(type(model))) + \
            str(getattr(config, "_name_or_path", ""))
        key = {"settings": settings, "rows": len(self.ids),
               "ids_sha1": hashlib.sha1("\n".join(self.ids).encode()).hexdigest(),
               "model_sha1": hashlib.sha1(model_key.encode()).hexdigest(),
               "priors": None if priors is None else {k: priors[k] for k in RULES}}
        meta = self.dir / "run.json"
        if meta.exists() and json.loads(meta.read_text(encoding="utf-8")) != json.loads(json.dumps(key)):
            raise ValueError(f"{meta} belongs to a run with another model, other rows or other settings; use "
                             "another work dir (or delete it to start over)")
        meta.write_text(json.dumps(key, indent=2), encoding="utf-8")
        guard = self.dir / "guard.json"  # the time model's measurements so far (a resumed run starts from them)
        self.guard_saved: dict[str, Any] | None = json.loads(guard.read_text(encoding="utf-8")) if guard.exists() else None

    def load(self) -> list[tuple[list[int], np.ndarray, list[str], str]]:
        """Every saved batch: (rows, probabilities, sources, pass) — pass 1 (``plain``) or the swapped pass."""
        out = []
        for part in sorted(self.dir.glob("part-*.parquet")):
            table = pd.read_parquet(part)
            if "pass" not in table:
                raise ValueError(f"{part}: a checkpoint part without its pass column (an older version's run); "
                                 "use another work dir")
            if [self.ids[r] for r in table["position"]] != table["id"].astype(str).tolist():
                raise ValueError(f"{part}: ids do not match the rows at their positions (another test file?)")
            for which, group in table.groupby("pass", sort=False):
                out.append((group["position"].tolist(), group[list(LABEL_COLUMNS)].to_numpy(),
                            group["source"].tolist(), str(which)))
        return out

    def plan(self, name: str) -> list[int] | None:
        """Rows an earlier session decided on (``tta``: chosen for the swapped pass, most uncertain first;
        ``short``: re-packed at degrade_max_length), or None when it decided nothing."""
        path = self.dir / f"{name}_plan.json"
        return json.loads(path.read_text(encoding="utf-8"))["rows"] if path.exists() else None

    def save_plan(self, name: str, rows: list[int]) -> None:
        self.flush()  # what the decision rests on is on disk before it
        self._write_json(f"{name}_plan.json", {"rows": [int(r) for r in rows]})

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        try:
            tmp = self.dir / (name + ".tmp")
            tmp.write_text(json.dumps(data), encoding="utf-8")
            tmp.rename(self.dir / name)
        except OSError as err:
            self.log(f"WARNING: {name} not written ({err}); a resumed run would decide again")

    def add(self, rows: list[int], probs: np.ndarray, source: Sequence[str], which: str) -> None:
        if not self.enabled:
            return
        self.pending.append(pd.DataFrame({"position": rows, "id": [self.ids[r] for r in rows],
                                          **{c: probs[:, i] for i, c in enumerate(LABEL_COLUMNS)},
                                          "source": list(source), "pass": which}))
        self.pending_rows += len(rows)
        if self.pending_rows >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending or not self.enabled:
            return
        name = f"part-{time.time_ns()}-{self.session}.parquet"  # unique: two runs never overwrite a part
        tmp = self.dir / (name + ".tmp")
        try:
            pd.concat(self.pending, ignore_index=True).to_parquet(tmp)
            tmp.rename(self.dir / name)  # atomic: a part is whole or absent
        except OSError as err:
            self.enabled = False
            self.log(f"WARNING: checkpoint not written ({err}); checkpointing is off, scoring goes on")
        self.pending, self.pending_rows = [], 0
        if self.enabled and self.guard_saved is not None:
            self._write_json("guard.json", self.guard_saved)

    def finish(self, report: dict[str, Any]) -> None:
        try:
            (self.dir / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        except OSError as err:
            self.log(f"WARNING: report not written ({err})")


# -- submission ------------------------------------------------------------------------------------


def write_submission(ids: Sequence[Any], probs: np.ndarray, path: str | Path) -> Path:
    """``id, winner_model_a, winner_model_b, winner_tie`` in the given order, checked before writing."""
    from .parsing import check_submission

    frame = pd.DataFrame({"id": list(ids), **{c: probs[:, i] for i, c in enumerate(LABEL_COLUMNS)}})
    problems = check_submission(frame, list(ids))
    if problems:
        raise ValueError(f"refusing to write an invalid submission: {problems[:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def parse_duration(text: str | float) -> float:
    """'9h', '8h30m', '45m', '90s' or seconds → seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    import re

    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not parts or not any(parts.groups()):
        raise ValueError(f"cannot read a duration from {text!r} (e.g. 9h, 8h30m, 45m, 600)")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s



def parse_time(text: str | float) -> float:
    """Unix seconds, or an ISO 8601 time (a time without a zone is UTC) → Unix seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(text)
    except ValueError:
        pass
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read a time from {text!r} (Unix seconds, or e.g. 2026-12-01T09:00:00+00:00)") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
