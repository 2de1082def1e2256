"""minillm: a small language model built from scratch, readable end to end.

Where each concept lives (framework-free modules here; tensor maths in torch/ and its twin jax/):

    config.py, config_io.py   ModelConfig / TrainConfig, presets; TOML files and --set overrides
    tokenizer/                character and byte-level BPE tokenizers, HF export, stop strings
    data/                     text sources -> token files (prepare) -> batches (loader)
    schedule.py               the learning rate as a function of the step
    train_loop.py             THE training loop both trainers run (budget, eval, checkpoints, Ctrl-C)
    checkpoint.py             run directories: safetensors + JSON, the resume point, resume checks
    files.py                  atomic writes, the one JSON reader
    beam.py                   beam search over log-probabilities (both frameworks' models plug in)
    torch/, jax/              the model, its optimizer, trainer, KV cache, sampling and generation
    interop/                  to and from Hugging Face transformers
    viz/                      loss curves
    cli.py, commands/         the `minillm` command, one module per subcommand

Importing the package imports no framework: `minillm.torch` and `minillm.jax` are separate.
"""

__version__ = "0.1.0"
