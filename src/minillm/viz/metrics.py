"""metrics.jsonl (one JSON object per logged step) and the loss.png drawn from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from minillm.files import atomic_write_text


class MetricsLog:
    """Append-only metrics file. On resume, rows after the checkpoint's step are dropped: the
    resumed run writes them again (identically, since resume is exact)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                break
        return rows

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.rows() if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, png: str | Path) -> None:
        """Train and val loss against tokens seen; written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        train = [(r["tokens"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        png = Path(png)
        tmp = png.with_name(f".{png.name}.tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, png)
