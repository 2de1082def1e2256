"""`minillm quantize`: a run's linear layers in int8 or int4 (round to nearest, or GPTQ), written as
a quantized run directory (minillm.torch.quant_format) that sample, chat and eval load directly."""

from __future__ import annotations

import argparse
from pathlib import Path

from minillm.checkpoint import CONFIG_FILE
from minillm.files import read_json

METHODS = ("int8", "int4", "gptq-int4")  # as minillm.torch.quantize.METHODS (no torch import here)


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="weight-only int8 / int4 quantization of a run (faster CPU decoding)",
        description="Quantize the blocks' linear layers of a run: int8 per output channel, int4 in groups "
                    "of --group-size inputs (round to nearest), or gptq-int4 (GPTQ, calibrated on "
                    "sequences of the training data). Embeddings and the output head stay float unless "
                    "--head (int8). The output is a run directory that sample, chat and eval read.",
        epilog="example: minillm quantize --run runs/shakespeare-bpe-base --method gptq-int4 "
               "--out runs/shakespeare-bpe-gptq")
    p.add_argument("--run", required=True, metavar="DIR", help="the run to quantize (full weights or LoRA)")
    p.add_argument("--method", required=True, choices=METHODS, help="quantization scheme")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128),
                   help="int4: inputs per scale and zero point (default 64)")
    p.add_argument("--head", action="store_true", help="quantize the output head too (int8)")
    p.add_argument("--calibration", metavar="DATA_DIR",
                   help="gptq-int4: prepared data whose train.bin calibrates (default: the run's data_dir)")
    p.add_argument("--calibration-sequences", type=int, default=256, metavar="N",
                   help="gptq-int4: random training windows to calibrate on (default 256)")
    p.add_argument("--calibration-length", type=int, metavar="T",
                   help="gptq-int4: tokens per window (default: min(256, the model's max_seq_len))")
    p.add_argument("--out", required=True, metavar="DIR", help="the quantized run directory (must not exist)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run)


def calibration_dir(args: argparse.Namespace) -> str:
    """--calibration, or the data directory the run (or its base) was trained on."""
    if args.calibration:
        return args.calibration
    saved = read_json(Path(args.run) / CONFIG_FILE).get("train", {}).get("data_dir")
    if not saved or not (Path(saved) / "train.bin").is_file():
        raise ValueError(f"gptq-int4 needs calibration data: give --calibration DATA_DIR (the run's "
                         f"data_dir {saved!r} has no train.bin)")
    return saved


def run(args: argparse.Namespace) -> int:
    import torch

    from minillm.torch import gptq, quantize
    from minillm.torch.quant_format import quantization_record, save_quantized
    from minillm.torch.sft import load_for_inference

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out} already exists; quantize writes a new run directory")
    if quantization_record(args.run) is not None:
        raise ValueError(f"{args.run} is a quantized run already; quantize its source run instead")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_inference(args.run)  # a LoRA run: its adapter merged in first
    if args.method == "gptq-int4":
        length = args.calibration_length or min(256, model.config.max_seq_len)
        batches = gptq.calibration_batches(calibration_dir(args), args.calibration_sequences, length)
        gptq.quantize_model(model, batches, args.group_size)
        if args.head:
            model.lm_head = quantize.Int8Linear.from_float(model.lm_head)
    else:
        quantize.quantize_rtn(model, 8 if args.method == "int8" else 4, args.group_size, args.head)
    record = {"method": args.method, "group_size": None if args.method == "int8" else args.group_size,
              "head": args.head, "source": str(args.run)}
    save_quantized(out, model, tokenizer, record)
    print(f"{args.method} run written to {out} ({quantize.quantized_bytes(model) / 2**20:.1f} MiB)")
    return 0
