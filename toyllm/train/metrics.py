"""Training logs: one JSON record per line (the source of truth), the same as CSV, TensorBoard when installed,
and a loss-curve PNG redrawn after every evaluation.

Records are of two kinds: `{"kind": "train", "step", "loss", "lr", ...}` after every optimizer step and
`{"kind": "eval", "step", "val_loss", "val_ppl", "sample"}` after every evaluation.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

CSV_COLUMNS = (
    "kind",
    "step",
    "tokens",
    "loss",
    "val_loss",
    "val_ppl",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "elapsed_s",
)


class MetricsLogger:
    """Appends records to `metrics.jsonl` and `metrics.csv` in the run directory (on rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.png = run_dir / "loss_curve.png"
        self.tb: Any = None
        if enabled and tensorboard:
            try:  # optional: only when the `tensorboard` package is installed
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """On resume: forget what an interrupted run logged after the checkpoint, so the logs read as one run."""
        if not self.enabled or not self.jsonl.exists():
            return
        kept = [r for r in read_records(self.jsonl) if r["step"] <= step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        with open(self.csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        new = not self.csv.exists()
        with open(self.csv, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            if "sample" in record:
                self.tb.add_text("sample", record["sample"], record["step"])

    def plot(self, title: str = "") -> None:
        if self.enabled and self.jsonl.exists():
            plot_loss_curve(read_records(self.jsonl), self.png, title)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The log's records; a line that is not one (cut short by a kill, or damaged) is skipped, so that a bad log
    never stops `--resume`: the checkpoints, not the log, hold the run."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("kind"), str):
            records.append(record)
    return records


def plot_loss_curve(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss (raw and smoothed) and validation loss against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval" and _finite(r.get("val_loss"))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax.plot(steps, _ema(list(losses), 0.9), color="tab:blue", label="train (smoothed)")
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "loss curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _ema(values: list[float], beta: float) -> list[float]:
    """Exponential moving average, bias-corrected (as in Adam) so the first points are not pulled towards 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out
