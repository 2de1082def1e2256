"""Every figure of the docs, drawn by the project's own code: `python -m minillm.viz.figures`.

Each figure module (minillm.viz.fig_*) exposes FIGURES, a dict {file name: function(ctx)}; a
function draws one matplotlib figure and hands it to ctx.save. Figures that need a trained model
call ctx.run(), which trains a small character-level model on the built-in corpus once and reuses
it (the work directory survives between invocations). `make docs` runs this before building the
site, so every PNG on a page was drawn by the current code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from minillm.config import load_train_config
from minillm.data.prepare import prepare
from minillm.train_loop import train
from minillm.trainers import make_trainer

# The figure modules, in the order of the docs' pages.
MODULES = ("fig_basics", "fig_training", "fig_model", "fig_quantize", "fig_interop", "fig_inspect")
OUT = Path("docs/images/figures")
WORK = Path("runs/figures")


@dataclass
class FigureContext:
    """Where figures go, and the shared inputs they draw from."""
    out: Path = OUT                # the PNGs (docs/images/figures)
    work: Path = WORK              # scratch: prepared data and the trained model, reused
    quick: bool = False            # tests: smaller everything
    train_seconds: float = 90.0    # the trained model's time budget
    written: list[Path] = field(default_factory=list)

    def run(self) -> Path:
        """A run directory of a small char-level LLaMA-style model trained on the built-in corpus
        (work/model): trained on first use, then reused. Tests place a tiny run there first."""
        run = self.work / "model"
        if (run / "model.safetensors").is_file():
            return run
        data = self.work / "data"
        prepare("shakespeare", data, tokenizer="char")  # does nothing when already prepared
        sets = [f'data_dir="{data}"', f'out_dir="{run}"', "max_steps=100000",
                f"max_time={self.train_seconds}", "eval_interval=200", 'dtype="float32"']
        train(make_trainer(load_train_config("configs/shakespeare-char-cpu.toml", sets), quiet=True))
        return run

    def save(self, fig, name: str) -> Path:
        """Write the figure to out/name atomically (temp file + rename) and close it."""
        import matplotlib.pyplot as plt

        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / name
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        self.written.append(path)
        return path


def registry() -> dict:
    """{file name: drawing function} over every figure module."""
    figures = {}
    for name in MODULES:
        module = importlib.import_module(f"minillm.viz.{name}")
        for file, draw in module.FIGURES.items():
            assert file not in figures, f"two figures named {file}"
            figures[file] = draw
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm.viz.figures", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="figure files to draw (default: all)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    figures = registry()
    unknown = [n for n in args.names if n not in figures]
    if unknown:
        print(f"error: unknown figure(s) {', '.join(unknown)}; known: {', '.join(figures)}", file=sys.stderr)
        return 2
    ctx = FigureContext(out=args.out, work=args.work)
    for name in args.names or list(figures):
        start = time.perf_counter()
        figures[name](ctx)
        print(f"{ctx.out / name}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
