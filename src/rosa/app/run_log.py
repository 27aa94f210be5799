"""What a run leaves beside its adapter to be read: ``log.jsonl``, TensorBoard scalars and ``loss.png``.

Every training step's loss, rate and phase, every validation loss and the schedule's events go to
``log.jsonl`` (one JSON object per line, ``{"step": ...}``) and, when tensorboard is installed, to
``tensorboard/``; at the end ``loss.png`` draws the training and validation loss with the step the mask was
fixed marked. Only rank 0 writes. A resumed run first drops the lines written after its checkpoint, so no step
appears twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOG_FILE, PLOT_FILE, TENSORBOARD_DIR = "log.jsonl", "loss.png", "tensorboard"


class RunLog:
    """Rank 0's writer of a run's log; every method is a no-op elsewhere (``enabled=False``)."""

    def __init__(self, out: Path, enabled: bool, resumed_at: int | None = None) -> None:
        self.path = out / LOG_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resumed_at is not None:
            keep_until(self.path, resumed_at)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: log.jsonl holds the same numbers
            return
        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=resumed_at)

    def step(
        self, step: int, loss: float, lr: float, tokens_per_s: float, phase: str, grad_norm: float
    ) -> None:
        self._write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "phase": phase})
        self._scalars(
            step,
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_per_s": tokens_per_s,
            },
        )

    def validation(self, step: int, loss: float) -> None:
        self._write({"step": step, "val_loss": loss})
        self._scalars(step, {"val/loss": loss})

    def events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._write({"step": event["optimizer_step"], **event})

    def close(self, mask_step: int | None) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.enabled:
            plot_losses(self.path, self.path.with_name(PLOT_FILE), mask_step)

    def _write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_until(path: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (written after the checkpoint a run resumes from)."""
    records = read_log(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(log: Path, out: Path, mask_step: int | None) -> Path | None:
    """``loss.png``: training and validation loss per step, the mask's step marked (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no %s", out.name)
        return None
    records = read_log(log)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="training loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    if mask_step is not None:
        ax.axvline(mask_step, color="k", ls="--", lw=1, label=f"mask fixed (step {mask_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
