"""Exploratory analysis of a conversation frame: the tables and plots of notebook 00 and the demo report.

Contract: every function takes a conversation frame from ``parsing`` (and, for token counts, any HF
tokenizer) and returns a DataFrame or a matplotlib ``Figure``; nothing here reads globals or writes
outside the folder it is given. Figures are built without pyplot, so they render headless.

This module never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .parsing import CLASSES, NULL_TURN, summarise

PARTS = ("prompt", "response_a", "response_b")


def label_balance(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows and share per class (A / B / tie)."""
    counts = np.bincount(frame["label"][frame["label"] >= 0], minlength=3)
    return pd.DataFrame({"class": CLASSES, "rows": counts, "share": counts / max(1, counts.sum())})


def token_lengths(frame: pd.DataFrame, tokenizer: Any, chunk: int = 4000) -> pd.DataFrame:
    """Untruncated token counts per part (all turns, no special tokens) and their total, per row."""
    from tqdm.auto import tqdm

    out = {}
    for part in PARTS:
        counts = np.zeros(len(frame), dtype=np.int64)
        flat = [(i, t) for i, turns in enumerate(frame[part]) for t in turns]
        for start in tqdm(range(0, len(flat), chunk), desc=f"tokenise {part}", unit="chunk", leave=False):
            block = flat[start: start + chunk]
            ids = tokenizer([t for _, t in block], add_special_tokens=False)["input_ids"]
            np.add.at(counts, [i for i, _ in block], [len(x) for x in ids])
        out[f"{part}_tokens"] = counts
    lengths = pd.DataFrame(out, index=frame.index)
    lengths["total_tokens"] = lengths.sum(axis=1)
    return lengths


def length_stats(lengths: pd.DataFrame) -> pd.DataFrame:
    """Mean, median, p90, p99 and max of each token-count column."""
    q = lengths.quantile([0.5, 0.9, 0.99]).T
    return pd.DataFrame({"mean": lengths.mean(), "median": q[0.5], "p90": q[0.9], "p99": q[0.99],
                         "max": lengths.max()}).round(1)


def truncation_table(lengths: pd.DataFrame, max_lengths: tuple[int, ...] = (512, 1024, 2048, 4096),
                     overhead: int = 0) -> pd.DataFrame:
    """For each max length: share of rows that must be cut and mean tokens kept per row."""
    total = lengths["total_tokens"].to_numpy() + overhead
    rows = [{"max_length": m, "rows_cut_share": float((total > m).mean()),
             "mean_tokens_kept": float(np.minimum(total, m).mean())} for m in max_lengths]
    return pd.DataFrame(rows)


def win_rate_by_length(frame: pd.DataFrame, lengths: pd.DataFrame,
                       edges: tuple[float, ...] = (-np.inf, -1.0, -0.3, 0.3, 1.0, np.inf)) -> pd.DataFrame:
    """Outcome shares per bucket of log(tokens A / tokens B): does the longer answer win?"""
    diff = np.log((lengths["response_a_tokens"] + 1) / (lengths["response_b_tokens"] + 1))
    bucket = pd.cut(diff, edges)
    labelled = frame["label"].to_numpy() >= 0
    table = pd.crosstab(bucket[labelled], frame["label"].to_numpy()[labelled], normalize="index")
    table = table.reindex(columns=range(3), fill_value=0.0)
    table.columns = [f"{c}_share" for c in CLASSES]
    table["rows"] = bucket[labelled].value_counts().reindex(table.index).to_numpy()
    table.index = table.index.astype(str)
    table.index.name = "log(len A / len B)"
    return table


def model_win_rates(frame: pd.DataFrame, min_games: int = 1) -> pd.DataFrame:
    """Per model (both sides counted): games, wins, losses, ties, win rate; best first."""
    if "model_a" not in frame.columns:
        return pd.DataFrame(columns=["games", "wins", "losses", "ties", "win_rate"])
    label = frame["label"].to_numpy()
    side_a = pd.DataFrame({"model": frame["model_a"], "win": label == 0, "loss": label == 1, "tie": label == 2})
    side_b = pd.DataFrame({"model": frame["model_b"], "win": label == 1, "loss": label == 0, "tie": label == 2})
    games = pd.concat([side_a, side_b]).groupby("model")
    table = pd.DataFrame({"games": games.size(), "wins": games["win"].sum(), "losses": games["loss"].sum(),
                          "ties": games["tie"].sum()})
    table["win_rate"] = (table["wins"] / table["games"]).round(4)
    return table[table["games"] >= min_games].sort_values("win_rate", ascending=False)


def special_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with a null turn, an empty response or identical responses, and how often each is a tie."""
    tie = frame["label"].to_numpy() == 2
    groups = {
        "null turn (any part)": (frame["null_a"] | frame["null_b"]
                                 | frame["prompt"].map(lambda t: NULL_TURN in t)).to_numpy(),
        "both responses empty/null": (frame["empty_a"] & frame["empty_b"]).to_numpy(),
        "one response empty/null": (frame["empty_a"] ^ frame["empty_b"]).to_numpy(),
        "identical responses": frame["identical"].to_numpy(),
        "multi-turn": (frame["n_rounds"] > 1).to_numpy(),
        "all rows": np.ones(len(frame), dtype=bool),
    }
    rows = [{"segment": name, "rows": int(m.sum()),
             "tie_share": float(tie[m].mean()) if m.any() else float("nan")} for name, m in groups.items()]
    return pd.DataFrame(rows)


# -- plots -------------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.subplots()


def plot_label_balance(frame: pd.DataFrame) -> Any:
    fig, ax = _figure(5, 3.5)
    table = label_balance(frame)
    ax.bar(table["class"], table["share"], color=["#4c72b0", "#dd8452", "#8c8c8c"])
    ax.set_ylabel("share of rows")
    ax.set_title("Labels")
    fig.tight_layout()
    return fig


def plot_token_lengths(lengths: pd.DataFrame) -> Any:
    fig, ax = _figure()
    top = max(2, int(lengths["total_tokens"].max()))
    bins = np.logspace(0, np.log10(top + 1), 40)
    for col in lengths.columns:
        ax.hist(lengths[col] + 1, bins=bins, histtype="step", label=col.replace("_tokens", ""))
    ax.set_xscale("log")
    ax.set_xlabel("tokens + 1 (log scale)")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths per part")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_win_rate_by_length(table: pd.DataFrame) -> Any:
    fig, ax = _figure()
    x = np.arange(len(table))
    for i, c in enumerate(CLASSES):
        ax.bar(x + (i - 1) * 0.27, table[f"{c}_share"], width=0.27, label=c)
    ax.set_xticks(x, table.index, rotation=20)
    ax.set_xlabel(table.index.name)
    ax.set_ylabel("share")
    ax.set_title("Outcome vs response length difference")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_model_win_rates(table: pd.DataFrame, top: int = 30) -> Any:
    shown = table.head(top)
    fig, ax = _figure(7, max(3.0, 0.22 * len(shown) + 1))
    ax.barh(shown.index[::-1], shown["win_rate"][::-1])
    ax.set_xlabel("win rate (ties count as not won)")
    ax.set_title("Per-model win rate")
    fig.tight_layout()
    return fig


# -- report ------------------------------------------------------------------------------------------


def markdown_table(table: pd.DataFrame, index: bool = True, digits: int = 4) -> str:
    """A DataFrame as a GitHub markdown table (no extra dependency)."""
    frame = table.reset_index() if index else table
    def cell(v: Any) -> str:
        return f"{v:.{digits}g}" if isinstance(v, (float, np.floating)) else str(v)
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_report(frame: pd.DataFrame, tokenizer: Any, out_dir: str | Path, title: str = "EDA",
                 lengths: pd.DataFrame | None = None) -> Path:
    """Compute every table, save every plot as PNG under ``out_dir/plots``, write ``out_dir/eda.md``.

    ``lengths``: ``token_lengths(frame, tokenizer)`` when already computed (it is the slow part).
    """
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    lengths = token_lengths(frame, tokenizer) if lengths is None else lengths
    by_length = win_rate_by_length(frame, lengths)
    models = model_win_rates(frame)
    figures = {"labels": plot_label_balance(frame), "token_lengths": plot_token_lengths(lengths),
               "win_rate_by_length": plot_win_rate_by_length(by_length),
               "model_win_rates": plot_model_win_rates(models)}
    for name, fig in figures.items():
        fig.savefig(out_dir / "plots" / f"{name}.png")
    summary = pd.DataFrame(list(summarise_frame(frame).items()), columns=["what", "value"])
    sections = [
        f"# {title}\n", markdown_table(summary, index=False),
        "\n## Labels\n", markdown_table(label_balance(frame), index=False), "\n![labels](plots/labels.png)",
        "\n## Token lengths (untruncated)\n", markdown_table(length_stats(lengths)),
        "\n" + markdown_table(truncation_table(lengths), index=False),
        "\n![token lengths](plots/token_lengths.png)",
        "\n## Outcome vs length difference\n", markdown_table(by_length),
        "\n![win rate by length](plots/win_rate_by_length.png)",
        "\n## Special rows\n", markdown_table(special_rows(frame), index=False),
        "\n## Per-model win rates\n", markdown_table(models.head(30)),
        "\n![model win rates](plots/model_win_rates.png)\n",
    ]
    path = out_dir / "eda.md"
    path.write_text("\n".join(sections), encoding="utf-8")
    return path


def summarise_frame(frame: pd.DataFrame) -> dict[str, Any]:
    """``parsing.summarise`` for a bare frame (flattened for a table)."""
    from .parsing import ParseResult

    summary = summarise(ParseResult(frame, "train", []))
    shares = summary.pop("label_share", {})
    return summary | {f"share_{k}": v for k, v in shares.items()}
