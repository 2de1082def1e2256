"""Quantization, side by side: perplexity and batch-1 decode speed of fp32, int8, int4 (RTN) and
int4 (GPTQ) on a model trained here, and decode speed on the gpt2-small shape; with torchao's int8
weight-only layers and transformers as anchors. (Pruning and distillation: compress_prune.py.)

- trained model: runs/shakespeare-bpe-base (its data, data/shakespeare-bpe): perplexity on the
  held-out split (val.bin) of each variant, GPTQ calibrated on 256 windows of train.bin;
- gpt2-small: random weights (speed does not depend on what the weights are; GPTQ's int4 layers
  are the RTN ones with other codes, so int4 stands for both);
- decode: greedy, batch 1, a 16-token prompt and N new tokens, tokens/s of the whole generate call,
  eager and compiled (torch.compile of the decode step), median of rounds that run every variant
  once in turn (a busy machine slows them alike); "+head" variants quantize the output head too
  (int8; the embedding table stays fp32);
- anchors: transformers' generate on the same fp32 weights, and the same with torchao's
  Int8WeightOnlyConfig (when torchao imports), eager.

    .venv/bin/python benchmarks/compress.py --quick     # a smoke run: small sizes, 1 round
    .venv/bin/python benchmarks/compress.py             # the full run (a quiet machine: ~30 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import _common
import torch

from minillm.config import ModelConfig
from minillm.data.loader import read_tokens
from minillm.interop.hf import to_transformers
from minillm.torch import gptq, quantize
from minillm.torch.evaluate import perplexity
from minillm.torch.generate import generate
from minillm.torch.model import Transformer, load_model

RUN, DATA = "runs/shakespeare-bpe-base", "data/shakespeare-bpe"
VARIANTS = ("fp32", "int8", "int8+head", "int4", "int4+head", "gptq-int4")


def make_variant(model, name: str, group_size: int, calibration) -> torch.nn.Module:
    """A quantized copy of `model` (fp32: the model itself)."""
    if name == "fp32":
        return model
    q = copy.deepcopy(model)
    head = name.endswith("+head")
    if name.startswith("gptq"):
        return gptq.quantize_model(q, calibration, group_size, log=lambda _: None)
    return quantize.quantize_rtn(q, 8 if name.startswith("int8") else 4, group_size, head)


def hf_runners(model, prompt: list[int], new_tokens: int) -> dict:
    """transformers generate (fp32), and with torchao int8 weight-only layers when torchao imports."""
    import transformers

    config = transformers.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False, pad_token_id=0, eos_token_id=None,
                                           bos_token_id=None, use_cache=True)
    ids = torch.tensor([prompt])
    models = {"transformers fp32": to_transformers(model).eval()}
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        models["transformers + torchao int8"] = to_transformers(model).eval()
        quantize_(models["transformers + torchao int8"], Int8WeightOnlyConfig())
    except ImportError as e:
        print(f"torchao not available ({e}): its row is left out")

    def runner(hf):
        def run():
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return run

    return {name: runner(hf) for name, hf in models.items()}


def decode_speeds(variants: dict, prompt: list[int], args, hf: dict) -> dict[str, dict]:
    """{variant: {"eager": tok/s, "compiled": tok/s, "compile_s": s}}, medians over args.rounds."""
    runs, compile_s = {}, {}
    for name, model in variants.items():
        runs[f"{name} eager"] = lambda m=model: generate(m, prompt, args.new_tokens, temperature=0)
        if not args.no_compile:
            runs[f"{name} compiled"] = lambda m=model: generate(m, prompt, args.new_tokens, temperature=0,
                                                                compile=True)
            t0 = time.perf_counter()
            runs[f"{name} compiled"]()
            compile_s[name] = time.perf_counter() - t0
    runs.update(hf)
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    return {k: {"tokens_per_s": args.new_tokens / statistics.median(v), "compile_s": compile_s.get(
        k.rsplit(" ", 1)[0]) if k.endswith("compiled") else None} for k, v in times.items()}


def trained_model(args) -> dict:
    model, tokenizer = load_model(RUN)
    val = read_tokens(f"{DATA}/val.bin")[: args.ppl_tokens]
    calibration = gptq.calibration_batches(DATA, args.calibration, min(256, model.config.max_seq_len))
    variants, rows = {}, {}
    for name in args.variants:
        t0 = time.perf_counter()
        variants[name] = make_variant(model, name, args.group_size, calibration)
        quantize_s = time.perf_counter() - t0
        with torch.inference_mode():
            ppl = perplexity(variants[name], val, model.config.max_seq_len)["perplexity"]
        rows[name] = {"perplexity": ppl, "bytes": quantize.quantized_bytes(variants[name]),
                      "quantize_s": quantize_s}
    prompt = tokenizer.encode("ROMEO:\nWhat light")[:16]
    hf = {} if args.no_hf else hf_runners(model, prompt, args.new_tokens)
    speeds = decode_speeds(variants, prompt, args, hf)
    return {"model": RUN, "params": model.num_parameters(), "variants": rows, "speeds": speeds}


def gpt2_small(args) -> dict:
    torch.manual_seed(0)
    shape = dict(n_layers=args.layers) if args.layers else {}
    model = Transformer(ModelConfig.preset("gpt2-small", **shape)).eval()
    names = [n for n in args.variants if not n.startswith("gptq")]
    variants = {n: make_variant(model, n, args.group_size, None) for n in names}
    rows = {n: {"bytes": quantize.quantized_bytes(v)} for n, v in variants.items()}
    prompt = torch.randint(0, model.config.vocab_size, (16,)).tolist()
    speeds = decode_speeds(variants, prompt, args, {} if args.no_hf else hf_runners(model, prompt,
                                                                                    args.new_tokens))
    return {"model": "gpt2-small" + (f" ({args.layers} layers)" if args.layers else ""),
            "params": model.num_parameters(),
            "variants": rows, "speeds": speeds}


def report(results: list[dict], args) -> None:
    print(f"\nmachine: {_common.machine(('torch',))}")
    print(f"greedy, batch 1, 16-token prompt, {args.new_tokens} new tokens, median of {args.rounds} rounds; "
          f"int4 group size {args.group_size}\n")
    for r in results:
        s = r["speeds"]
        base_e, base_c = s["fp32 eager"]["tokens_per_s"], s.get("fp32 compiled", {}).get("tokens_per_s")
        print(f"### {r['model']} ({r['params'] / 1e6:.1f}M parameters)\n")
        print("| variant | MiB | perplexity (vs fp32) | eager tok/s (x fp32) "
              "| compiled tok/s (x fp32 compiled) |")
        print("|---|---|---|---|---|")
        ppl0 = r["variants"]["fp32"].get("perplexity")
        for name, v in r["variants"].items():
            ppl = (f"{v['perplexity']:.3f} ({100 * (v['perplexity'] / ppl0 - 1):+.2f}%)"
                   if "perplexity" in v else "-")
            e = s[f"{name} eager"]["tokens_per_s"]
            c = s.get(f"{name} compiled", {}).get("tokens_per_s")
            cell = f"{c:,.1f} ({c / base_c:.2f}x)" if c else "-"
            print(f"| {name} | {v['bytes'] / 2**20:.1f} | {ppl} | {e:,.1f} ({e / base_e:.2f}x) | {cell} |")
        for name in ("transformers fp32", "transformers + torchao int8"):
            if name in s:
                t = s[name]["tokens_per_s"]
                print(f"| {name} (eager) | - | - | {t:,.1f} ({t / base_e:.2f}x) | - |")
        print()
    print(json.dumps({"results": results}, default=float))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer gpt2-small, few tokens, 1 round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calibration", type=int, default=256, help="GPTQ calibration windows")
    p.add_argument("--ppl-tokens", type=int, default=None, help="val tokens for perplexity (default all)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--models", nargs="+", default=["trained", "gpt2-small"],
                   choices=["trained", "gpt2-small"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="fp32 is always measured (the reference)")
    p.add_argument("--layers", type=int, help="gpt2-small with fewer layers (--quick: 2)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers / torchao rows")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.new_tokens, args.calibration = 1, 8, 32
        args.ppl_tokens, args.layers = args.ppl_tokens or 8192, args.layers or 2
    args.variants = ["fp32"] + [v for v in args.variants if v != "fp32"]
    if args.threads:
        torch.set_num_threads(args.threads)
    # one compiled decode step per variant and model (11 here), each a recompile of PackedModel.forward
    torch._dynamo.config.recompile_limit = 64
    report([{"trained": trained_model, "gpt2-small": gpt2_small}[m](args) for m in args.models], args)


if __name__ == "__main__":
    main()
