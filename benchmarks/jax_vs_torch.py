"""Training and decoding speed: minillm's JAX side vs its PyTorch side, same config, same weights.

For each model (gpt-char, llama-tiny) two worker processes are started, one per framework, so
neither framework's thread pool competes with the other's. The PyTorch worker draws the weights
(seed 0) and writes model.safetensors; the JAX worker loads that file, so both decode with the
same weights. (Their greedy tokens are compared and the number agreeing is printed: with
untrained weights the logits are nearly flat, so a 1e-7 difference can flip an argmax; the
tests check exact agreement on trained and perturbed models.) Every round asks each worker
once, in turn, so a busy machine slows both alike; the table reports medians after a warm-up.

- training tokens/s: fp32, one optimizer step = forward + backward + global-norm clipping +
  AdamW (matrix-only decay), loss read back every step, as the trainers do (PyTorch eager with
  the trainer's foreach AdamW; JAX: the jitted minillm.jax.step step). Random token batches.
- decode tokens/s: batch 1, greedy, a 16-token prompt and N new tokens (no early stop);
  new tokens / wall time of the whole generate call (prefill included). PyTorch: the default
  minillm.torch.generate (no torch.compile); JAX: minillm.jax.generate (jitted prefill and
  decode step, fixed-shape KV cache). Compilation happens in the warm-up, not in the timings.

    .venv/bin/python benchmarks/jax_vs_torch.py                      # both models, 7 rounds
    .venv/bin/python benchmarks/jax_vs_torch.py --models gpt-char --runs 3 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# model -> (train batch, block, steps timed per round, decode new tokens)
SETTINGS = {"gpt-char": (12, 64, 10, 48), "llama-tiny": (4, 256, 3, 128)}
PROMPT_LEN = 16


# --- workers (one framework each, driven line by line over stdin/stdout) ------------------------
def torch_worker(model_name: str, ckpt: str) -> None:
    import numpy as np
    import torch

    from minillm import checkpoint
    from minillm.config import ModelConfig, TrainConfig
    from minillm.torch.generate import generate
    from minillm.torch.model import Transformer, model_params, next_token_loss
    from minillm.torch.optim import make_optimizer

    batch, block, steps, new = SETTINGS[model_name]
    config = ModelConfig.preset(model_name)
    torch.manual_seed(0)
    model = Transformer(config)
    checkpoint.save_model(ckpt, config, model_params(model))
    decoder = copy.deepcopy(model).eval()  # decoding keeps the saved weights; training moves `model`
    adamw = TrainConfig(model=config, lr=1e-4, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    opt, _ = make_optimizer(adamw, model)
    data = np.random.default_rng(0).integers(0, config.vocab_size, (steps, batch, block + 1))

    def train() -> float:
        t0 = time.perf_counter()
        for x in torch.from_numpy(data).long():
            loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
        return steps * batch * block / (time.perf_counter() - t0)

    def decode() -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        out = generate(decoder, list(range(1, PROMPT_LEN + 1)), new, temperature=0)
        return new / (time.perf_counter() - t0), out

    _serve(train, decode, f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def jax_worker(model_name: str, ckpt: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from minillm.config import TrainConfig
    from minillm.jax import generate as jg
    from minillm.jax import model as jm
    from minillm.jax import optim as jo
    from minillm.jax import step as js

    batch, block, steps, new = SETTINGS[model_name]
    config, params, _ = jm.load_params(ckpt)
    cfg = TrainConfig(model=config, batch_size=batch, block_size=block, lr=1e-4, warmup_steps=0,
                      max_steps=10**6)
    optimizer = jo.make_optimizer(cfg, params)
    step = js.make_train_step(config, cfg, optimizer)
    state = js.init_train_state(jax.tree.map(jnp.copy, params), optimizer)
    data = np.random.default_rng(0).integers(0, config.vocab_size, (steps, 1, batch, block + 1))
    data = data.astype(np.int32)
    key = jax.random.PRNGKey(0)

    def train() -> float:
        nonlocal state
        t0 = time.perf_counter()
        for x in data:
            state, metrics = step(state, jnp.asarray(x[..., :-1]), jnp.asarray(x[..., 1:]), key)
            float(metrics["loss"])
        return steps * batch * block / (time.perf_counter() - t0)

    def decode() -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        out = jg.generate(params, config, list(range(1, PROMPT_LEN + 1)), new, temperature=0)
        return new / (time.perf_counter() - t0), out

    _serve(train, decode, f"jax {jax.__version__} ({jax.devices()[0].platform})")


def _serve(train, decode, version: str) -> None:
    """Warm up (compiles), say ready, then answer 'train' / 'decode' with a JSON line each."""
    train()
    decode()
    print(json.dumps({"ready": version}), flush=True)
    for line in sys.stdin:
        if line.strip() == "train":
            print(json.dumps({"tok_s": train()}), flush=True)
        elif line.strip() == "decode":
            tok_s, out = decode()
            print(json.dumps({"tok_s": tok_s, "tokens": out}), flush=True)
        else:
            return


# --- driver --------------------------------------------------------------------------------------
class Worker:
    def __init__(self, framework: str, model_name: str, ckpt: str, threads: int | None):
        cmd = [sys.executable, __file__, "--worker", framework, "--models", model_name, "--ckpt", ckpt]
        env = dict(os.environ)
        if threads:
            cmd += ["--threads", str(threads)]
        if threads == 1 and framework == "jax":  # XLA reads its flags once, at import
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.version = self.ask(None)["ready"]

    def ask(self, what: str | None) -> dict:
        if what:
            self.proc.stdin.write(what + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[3]} died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


def bench_model(model_name: str, runs: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as ckpt:
        torch_w = Worker("torch", model_name, ckpt, threads)  # writes the weights the JAX worker loads
        jax_w = Worker("jax", model_name, ckpt, threads)
        results = {"torch": {"train": [], "decode": []}, "jax": {"train": [], "decode": []}}
        for _ in range(runs):
            for name, w in (("torch", torch_w), ("jax", jax_w)):
                results[name]["train"].append(w.ask("train")["tok_s"])
            outs = {}
            for name, w in (("torch", torch_w), ("jax", jax_w)):
                answer = w.ask("decode")
                results[name]["decode"].append(answer["tok_s"])
                outs[name] = answer["tokens"]
            pairs = enumerate(zip(outs["torch"], outs["jax"]))
            agree = next((i for i, (a, b) in pairs if a != b), len(outs["jax"]))
        versions = {"torch": torch_w.version, "jax": jax_w.version}
        torch_w.close()
        jax_w.close()
    med = {f: {k: statistics.median(v) for k, v in r.items()} for f, r in results.items()}
    return {"median": med, "all": results, "greedy_tokens_agreeing": agree, "versions": versions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--runs", type=int, default=7, help="timed rounds per model (after one warm-up)")
    ap.add_argument("--threads", type=int, help="1 = one thread each (torch.set_num_threads(1), XLA without "
                    "its Eigen thread pool); default: each framework's own choice")
    ap.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker == "torch" and args.threads:
            import torch

            torch.set_num_threads(args.threads)
        (torch_worker if args.worker == "torch" else jax_worker)(args.models[0], args.ckpt)
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'unknown'}, "
          f"Python {platform.python_version()}; {args.runs} rounds, medians; "
          f"threads: {args.threads or 'default'}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    rows = []
    for name in args.models:
        r = bench_model(name, args.runs, args.threads)
        m = r["median"]
        batch, block, _, new = SETTINGS[name]
        rows.append(f"| {name} | {batch}x{block} | {m['torch']['train']:,.0f} | {m['jax']['train']:,.0f} | "
                    f"{m['jax']['train'] / m['torch']['train']:.2f}x | {new} | {m['torch']['decode']:,.1f} | "
                    f"{m['jax']['decode']:,.1f} | {m['jax']['decode'] / m['torch']['decode']:.2f}x |")
        print(json.dumps({name: r}), flush=True)
    print(f"\n{r['versions']['torch']}; {r['versions']['jax']}\n")
    print("| model | train batch x block | train tok/s torch | train tok/s jax | jax/torch | new tokens "
          "| decode tok/s torch | decode tok/s jax | jax/torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
