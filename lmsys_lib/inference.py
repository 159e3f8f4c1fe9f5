"""The offline inference kernel: token-budget batches, swap-TTA, two devices, deadline guard, resume.

Contract:
- ``predict_proba(models, tokenizer, frame, cfg)`` → (n, 3) probabilities in the input order, whatever
  order the rows come in; every row gets finite probabilities summing to 1. ``score`` is the same with the
  run's report (where each row's numbers came from, steps taken, NaN/OOM events, throughput).
- Rows are packed once per orientation with our own packer (the training format), sorted by length and cut
  into batches of at most ``token_budget`` padded tokens; each batch is padded only to its longest row.
  The batch plan is a pure function of the rows and the config, so a resumed run computes exactly the
  batches an uninterrupted one would.
- Swap-TTA: each row is also scored with A and B exchanged (the packer swaps the two spans; nothing else
  moves); the swapped pass's probabilities are un-permuted with ``parsing.AB_SWAP`` and averaged.
- Two devices: one model per device, each in its own thread, pulling batches from one queue (longest
  first) — both finish together whatever their speed. On a CPU the same code runs with one or two workers.
- Non-finite logits: the batch is recomputed row by row in fp32 (the model is cast up and back, which is
  lossless for fp16/bf16 weights); rows still non-finite get the prior, and the log names them. A CUDA
  out-of-memory error splits the batch in halves and retries; one row that still does not fit gets the prior.
- Deadline guard: before each batch the finish is projected from the measured padded-token throughput.
  When it would pass ``time_budget_s`` it degrades in declared steps — (1) drop TTA for the remaining rows,
  (2) re-pack the remaining rows at ``degrade_max_length``, (3) the prior for every row left — and records
  each step taken. A complete, valid submission is always written.
- Resume: finished batches are appended to ``work_dir/predictions/part-*.parquet`` every
  ``checkpoint_every`` rows; a restarted run with the same ``work_dir`` (and the same rows and config)
  skips them and ends with the same file as an uninterrupted run.
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


@dataclasses.dataclass
class _Plan:
    """What remains to run: batches of row positions, the ids per orientation, the passes per batch."""

    batches: list[list[int]]
    ids: dict[bool, list[Any]]  # swap → packed ids (row position → ids)
    tta: bool
    max_length: int
    temperature: float = 1.0


class _Guard:
    """Projected finish from measured throughput; declares each degradation step once.

    Each worker's first batch is left out of the rate (CUDA context, kernel selection and compilation make
    it slow), and no projection is made before ``min_batches`` batches have been measured."""

    def __init__(self, clock: Callable[[], float], log: Callable[[str], None], min_batches: int = 1):
        self.clock, self.log = clock, log
        self.start = clock()
        self.tokens = 0.0
        self.busy = 0.0
        self.batches = 0
        self.min_batches = min_batches
        self.steps: list[str] = []

    def record(self, tokens: float, seconds: float) -> None:
        self.tokens += tokens
        self.busy += seconds
        self.batches += 1

    def rate(self) -> float | None:
        ok = self.busy > 0 and self.tokens > 0 and self.batches >= self.min_batches
        return self.tokens / self.busy if ok else None

    def projected(self, remaining_tokens: float, workers: int) -> float | None:
        rate = self.rate()
        if rate is None or workers < 1:
            return None
        return self.clock() - self.start + remaining_tokens / (rate * workers)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def step(self, name: str, detail: str) -> None:
        self.steps.append(name)
        self.log(f"deadline guard: {name} — {detail}")


def predict_proba(models: Any, tokenizer: Any, frame: pd.DataFrame, cfg: InferenceConfig | None = None,
                  **kwargs: Any) -> np.ndarray:
    """(n, 3) probabilities of ``frame``'s rows in input order (``score`` without the report)."""
    return score(models, tokenizer, frame, cfg, **kwargs)[0]


def score(models: Any, tokenizer: Any, frame: pd.DataFrame, cfg: InferenceConfig | None = None,
          work_dir: str | Path | None = None, priors: dict[str, Any] | None = None,
          log: Callable[[str], None] = print, progress: bool = True,
          clock: Callable[[], float] = time.perf_counter) -> tuple[np.ndarray, dict[str, Any]]:
    """Score every row of ``frame`` (a conversation frame from ``parsing``) → ((n, 3) probabilities in
    input order, report).

    Args:
        models: one model, or one per device (a list), each already on its device and in eval mode.
        tokenizer: the models' tokenizer (its pad id is used for padding).
        cfg: packing, batching, TTA, deadline and checkpoint settings.
        work_dir: where checkpoints go (``predictions/``); None: no checkpoints, no resume.
        priors: ``measure_priors`` output. None: the rule rows are scored by the model (a uniform guess
            would be worse than the model there) and fallbacks use the uniform prior.
        clock: the deadline guard's clock (tests pass a fake one).
    Returns:
        probabilities and a report: rows per source (model, model without TTA, short, rule, prior),
        degradation steps, NaN/OOM events, errors, throughput, seconds.
    """
    from .prompting import Packer

    cfg = cfg or InferenceConfig()
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    Packer(tokenizer, dataclasses.replace(cfg.pack, max_length=cfg.degrade_max_length))  # too short: fail now
    if priors is None and cfg.rule_priors:
        log("no measured priors: rule rows (empty / identical responses) are scored by the model")
    use_rules = cfg.rule_priors and priors is not None
    priors = priors or uniform_priors()
    start = time.perf_counter()
    n = len(frame)
    probs = np.full((n, 3), np.nan)
    source = np.array([""] * n, dtype=object)
    rules = rules_of(frame) if use_rules else [None] * n
    for i, rule in enumerate(rules):
        if rule is not None:
            probs[i], source[i] = priors[rule], f"rule:{rule}"
    store = _Store(work_dir, frame, cfg, models[0], priors if use_rules else None, log) if work_dir else None
    if store:
        for rows, block, how in store.load():
            probs[rows], source[rows] = block, how
    todo = [i for i in range(n) if not source[i]]
    events: dict[str, Any] = {"nan_rows": 0, "prior_rows": [], "oom_splits": 0, "errors": [],
                              "lock": threading.Lock()}
    guard = _Guard(clock, log)
    plan = _plan(frame, todo, tokenizer, cfg, cfg.pack.max_length, cfg.tta)
    if store:
        plan.batches = [b for b in plan.batches if not store.done.issuperset(b)]
    log(f"inference: {n} rows, {n - len(todo)} by rule or resumed, {sum(map(len, plan.batches))} to score in "
        f"{len(plan.batches)} batches on {len(models)} worker(s), TTA {'on' if cfg.tta else 'off'}, "
        f"max_length {cfg.pack.max_length}, budget {cfg.time_budget_s / 3600:.2f} h")
    _run(models, tokenizer, frame, plan, cfg, guard, probs, source, events, store, priors, log, progress)
    left = np.flatnonzero(source == "")
    if len(left):  # nothing may stay empty: the deadline ran out, or every worker failed
        probs[left], source[left] = priors["overall"], "prior:error" if events["errors"] else "prior:deadline"
        events["prior_rows"] += [frame["id"].iloc[i] for i in left]
    probs = _normalised(probs)
    counts = pd.Series(source).value_counts().to_dict()
    report = {"rows": n, "sources": {str(k): int(v) for k, v in counts.items()}, "steps": guard.steps,
              "nan_rows": events["nan_rows"], "prior_rows": events["prior_rows"], "oom_splits": events["oom_splits"],
              "errors": events["errors"], "tokens_per_s": guard.rate(),
              "seconds": round(time.perf_counter() - start, 2), "workers": len(models), "config": to_dict(cfg)}
    if store:
        store.finish(report)
    log(f"inference done in {report['seconds']:.1f} s: {report['sources']}"
        + (f"; steps taken: {guard.steps}" if guard.steps else "")
        + (f"; WARNING {len(events['errors'])} error(s): {events['errors'][:3]}" if events["errors"] else ""))
    return probs, report


def _normalised(probs: np.ndarray) -> np.ndarray:
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
    return probs / probs.sum(axis=1, keepdims=True)


def _plan(frame: pd.DataFrame, rows: list[int], tokenizer: Any, cfg: InferenceConfig, max_length: int,
          tta: bool) -> _Plan:
    from .prompting import Packer

    pack = dataclasses.replace(cfg.pack, max_length=max_length)
    part = frame.iloc[rows]
    swaps = (False, True) if tta else (False,)
    packed = Packer(tokenizer, pack).pack_frame_orientations(part, swaps) if rows else [pd.DataFrame()] * len(swaps)
    ids: dict[bool, list[Any]] = {}
    for swap, table in zip(swaps, packed):
        full: list[Any] = [None] * len(frame)
        for pos, x in zip(rows, table["input_ids"] if rows else []):
            full[pos] = x
        ids[swap] = full
    lengths = [len(ids[False][r]) for r in rows]
    local = token_budget_batches(lengths, cfg.token_budget, cfg.max_batch_rows)
    return _Plan([[rows[i] for i in b] for b in local], ids, tta, max_length, cfg.temperature)


def _padded_tokens(plan: _Plan, batches: list[list[int]]) -> float:
    passes = 2 if plan.tta else 1
    return float(sum(len(b) * max(len(plan.ids[False][r]) for r in b) for b in batches) * passes)


def _run(models, tokenizer, frame, plan, cfg, guard, probs, source, events, store, priors, log, progress) -> None:
    from tqdm.auto import tqdm

    work: queue.Queue = queue.Queue()
    for batch in plan.batches:
        work.put(batch)
    lock = threading.Lock()
    state = {"plan": plan, "stop": False, "remaining": _padded_tokens(plan, plan.batches), "alive": len(models),
             "racing": False}
    bar = tqdm(total=sum(map(len, plan.batches)), desc="predict", unit="row", disable=not progress)

    def next_batch() -> tuple[list[int], _Plan] | None:
        with lock:
            if state["stop"]:
                return None
            _degrade(frame, tokenizer, cfg, guard, state, work, log)
            if state["stop"]:
                return None
            try:
                batch = work.get_nowait()
            except queue.Empty:
                return None
            state["remaining"] -= _padded_tokens(state["plan"], [batch])
            return batch, state["plan"]

    def finish(batch: list[int], current: _Plan, block: np.ndarray | None, seconds: float, first: bool) -> None:
        how = "model" if current.tta else "model:no-tta"
        if current.max_length < cfg.pack.max_length:
            how += f":len{current.max_length}"
        with lock:
            if block is None:  # the batch failed twice on this worker
                block, labels = np.tile(priors["overall"], (len(batch), 1)), ["prior:error"] * len(batch)
            else:
                if not first:  # a worker's first batch carries its warm-up: left out of the rate
                    guard.record(_padded_tokens(current, [batch]), seconds)
                bad = ~np.isfinite(block).all(axis=1)
                block[bad] = priors["overall"]
                labels = [("prior:non-finite" if b else how) for b in bad]
            probs[batch] = block
            source[batch] = labels
            events["prior_rows"] += [frame["id"].iloc[r] for r, lab in zip(batch, labels) if lab.startswith("prior")]
            if store:
                store.add(batch, probs[batch], source[batch])
            bar.update(len(batch))
            eta = guard.projected(state["remaining"], state["alive"])
            if eta is not None:
                bar.set_postfix_str(f"finish ≈ {eta / 60:.1f} min of {cfg.time_budget_s / 60:.0f}")

    failed_by: dict[tuple[int, ...], set[int]] = {}

    def give_up_or_requeue(batch: list[int], current: _Plan, me: int) -> bool:
        """After a batch failed twice on worker ``me``: True → it goes back to the queue for another worker
        that has not failed it; False → it gets the prior."""
        with lock:
            tried = failed_by.setdefault(tuple(batch), set())
            tried.add(me)
            others = [w for w in alive if w not in tried]
            if others and current is state["plan"]:
                work.put(batch)
                state["remaining"] += _padded_tokens(current, [batch])
                return True
            return False

    alive = set(range(len(models)))

    def worker(me: int, model: Any) -> None:
        first, failures_in_a_row = True, 0
        try:
            while (item := next_batch()) is not None:
                batch, current = item
                block, seconds = None, 0.0
                for attempt in (1, 2):  # a failing batch is retried once on this worker
                    t0 = guard.clock()
                    try:
                        block = _score_batch(model, tokenizer, batch, current, events, log)
                        seconds = guard.clock() - t0
                        break
                    except Exception as err:  # noqa: BLE001 — reported; the run goes on
                        with events["lock"]:
                            events["errors"].append(f"{type(err).__name__}: {str(err)[:200]}")
                        log(f"batch of {len(batch)} rows failed on worker {me} ({_device(model)}, attempt "
                            f"{attempt}): {type(err).__name__}: {err}")
                if block is None:
                    failures_in_a_row += 1
                    if give_up_or_requeue(batch, current, me):
                        if failures_in_a_row >= 2:
                            log(f"worker {me} failed two batches in a row: it stops, the others go on")
                            return
                        continue
                else:
                    failures_in_a_row = 0
                finish(batch, current, block, seconds, first)
                first = False
        except BaseException as err:  # KeyboardInterrupt / SystemExit in a worker: stop the run, re-raise
            with lock:
                state["stop"], state["fatal"] = True, err
        finally:
            with lock:
                state["alive"] -= 1
                alive.discard(me)

    threads = [threading.Thread(target=worker, args=(i, m), daemon=True) for i, m in enumerate(models)]
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
        if store:
            store.flush()
        raise
    finally:
        bar.close()
    if store:
        store.flush()
    if state.get("fatal") is not None:
        raise state["fatal"]


def _degrade(frame, tokenizer, cfg, guard, state, work, log) -> None:
    """Called (under the lock) before each batch: take the next declared step while the projection
    exceeds the budget; in the last stage keep scoring — shortest rows first — until the time is spent."""
    plan: _Plan = state["plan"]
    rate = guard.rate()
    nxt = _padded_tokens(plan, [work.queue[0]]) / rate if rate and work.queue else 0.0
    if guard.elapsed() + nxt > cfg.time_budget_s:
        state["stop"] = True
        guard.step("prior", f"time budget reached with {sum(map(len, work.queue))} rows left: they get the prior")
        return
    projected = guard.projected(state["remaining"], state["alive"])
    if projected is None or projected <= cfg.time_budget_s or state["racing"]:
        return
    remaining = list(work.queue)
    if plan.tta:
        state["plan"] = dataclasses.replace(plan, tta=False)
        state["remaining"] = _padded_tokens(state["plan"], remaining)
        guard.step("no-tta", f"projected {projected / 60:.1f} min > budget {cfg.time_budget_s / 60:.1f} min: "
                             f"TTA dropped for the remaining {sum(map(len, remaining))} rows")
        return
    if plan.max_length > cfg.degrade_max_length:
        rows = sorted(r for b in remaining for r in b)
        short = _plan(frame, rows, tokenizer, cfg, cfg.degrade_max_length, False)
        with work.mutex:
            work.queue.clear()
        for batch in short.batches:
            work.put(batch)
        state["plan"] = short
        state["remaining"] = _padded_tokens(short, short.batches)
        guard.step("short", f"projected {projected / 60:.1f} min: the remaining {len(rows)} rows re-packed at "
                            f"max_length {cfg.degrade_max_length}")
        return
    with work.mutex:  # the last stage: as many rows as the time allows, cheapest first
        work.queue.reverse()
    state["racing"] = True
    log(f"deadline guard: projected {projected / 60:.1f} min even without TTA at max_length {plan.max_length}: "
        "scoring the shortest remaining rows first; what is left at the deadline gets the prior")


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _score_batch(model: Any, tokenizer: Any, batch: list[int], plan: _Plan, events: dict[str, Any],
                 log: Callable[[str], None]) -> np.ndarray:
    """(len(batch), 3) probabilities: plain pass (+ un-permuted swapped pass), NaN and OOM handled."""
    from .metrics import softmax

    t = plan.temperature
    out = softmax(_logits(model, tokenizer, [plan.ids[False][r] for r in batch], events, log), temperature=t)
    if plan.tta:
        swapped = softmax(_logits(model, tokenizer, [plan.ids[True][r] for r in batch], events, log), temperature=t)
        out = (out + swapped[:, list(AB_SWAP)]) / 2
    return out


def _logits(model: Any, tokenizer: Any, rows: list[Any], events: dict[str, Any],
            log: Callable[[str], None]) -> np.ndarray:
    """Logits of ``rows`` (fp32 numpy); OOM → halves; non-finite rows → recomputed alone in fp32."""
    import torch

    out_of_memory = False
    try:
        logits = _forward(model, tokenizer, rows)
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled below, outside the except: its traceback would pin the activations
    if out_of_memory:
        _free(model)
        if len(rows) == 1:
            log("out of memory on a single row: it gets the prior")
            return np.full((1, 3), np.nan, dtype=np.float32)
        with events["lock"]:
            events["oom_splits"] += 1
        half = len(rows) // 2
        return np.concatenate([_logits(model, tokenizer, rows[:half], events, log),
                               _logits(model, tokenizer, rows[half:], events, log)])
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if len(bad):
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
        placed = {str(p.device) for p in model.parameters()}
        if placed != {str(device) if device.type == "cpu" else f"{device.type}:{device.index or 0}"}:
            log(f"WARNING: model for {device} has parameters on {sorted(placed)} — offloaded parts run far slower")
        log(f"model on {device}: {info.get('kernel')} kernel, {info.get('dtype')}")
        models.append(model)
    return models, load_tokenizer(model_dir), info


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
        self.done: set[int] = set()
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

    def load(self) -> list[tuple[list[int], np.ndarray, list[str]]]:
        out = []
        for part in sorted(self.dir.glob("part-*.parquet")):
            table = pd.read_parquet(part)
            rows = table["position"].tolist()
            if [self.ids[r] for r in rows] != table["id"].astype(str).tolist():
                raise ValueError(f"{part}: ids do not match the rows at their positions (another test file?)")
            out.append((rows, table[list(LABEL_COLUMNS)].to_numpy(), table["source"].tolist()))
            self.done.update(rows)
        return out

    def add(self, rows: list[int], probs: np.ndarray, source: Sequence[str]) -> None:
        if not self.enabled:
            return
        self.pending.append(pd.DataFrame({"position": rows, "id": [self.ids[r] for r in rows],
                                          **{c: probs[:, i] for i, c in enumerate(LABEL_COLUMNS)},
                                          "source": list(source)}))
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

