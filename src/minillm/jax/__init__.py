"""The JAX twin of minillm.torch, as pure functions over the canonical params dict (the names and
PyTorch shapes of DESIGN.md, so one model.safetensors serves both frameworks):

    layers.py         norms, positions (learned / sinusoidal / RoPE), attention (MHA/GQA/MQA), MLPs, block
    model.py          forward(params, config, tokens) -> logits; init, loss, checkpoint I/O
    generate.py       fixed-shape KV cache, jitted prefill and decode step, greedy/temperature/top-k/top-p
    train.py          the jitted AdamW step (torch's decay mask, schedule, clipping, accumulation), Trainer
    train_loop.py     budget, evaluation, checkpoints, Ctrl-C, NaN guard
    trainer_state.py  resume files in the PyTorch trainer's format
    parallel.py       data parallelism with jax.sharding

Needs the `jax` extra (jax + optax); never imports torch.
"""
