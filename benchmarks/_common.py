"""Helpers shared by the benchmark scripts (`import _common`: running `python benchmarks/x.py`
puts benchmarks/ on sys.path).

- train_steps: the benchmarks' one PyTorch training loop (forward, loss, backward, clipping,
  AdamW), so every script times the same step;
- alternate: runs variants in turn, round after round, so a busy machine slows them alike;
- machine: the line a report records about the machine, the packages and the load;
- run_measured: one child process (a `minillm` command as users run it), its wall time and peak RSS.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent  # the repository


def train_steps(model, forward, opt, x, y, steps: int) -> float:
    """tokens/s of `steps` optimizer steps: cross-entropy of forward(model, x) against y (B, T),
    backward, clip_grad_norm_(1.0), opt.step()."""
    import torch

    t = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(forward(model, x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * x.numel() / (time.perf_counter() - t)


def alternate(runs: dict[str, Callable[[int], float]], rounds: int, steps: int,
              warmup: int | None = None) -> dict[str, list[float]]:
    """{name: [run(steps) of each round]} after one warm-up call per run (default: `steps` steps)."""
    for run in runs.values():
        run(warmup or steps)
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run(steps))
    return results


def machine(packages: tuple[str, ...] = ("torch",)) -> str:
    """CPU model, vCPUs, memory, Python and package versions, the UTC time and the load average."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or platform.machine())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in packages)
    return (f"{cpu}, {os.cpu_count()} vCPUs, {memory:.0f} GiB; Python {platform.python_version()}, "
            f"{versions}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
            + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, stdout) of one child; its stderr, then its stdout, go to `log`."""
    start = time.perf_counter()
    with open(log, "w") as err:
        with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
            stdout = proc.stdout.read()  # to its end, when the child exits
            _, status, usage = os.wait4(proc.pid, 0)  # its own rusage (RUSAGE_CHILDREN: max of all)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err.write(stdout)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n  log: {log}")
    return wall, usage.ru_maxrss / 1024, stdout  # ru_maxrss is in KiB on Linux
