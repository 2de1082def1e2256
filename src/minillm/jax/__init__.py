"""The JAX twin of minillm.torch, as pure functions over the canonical params dict (the names and
PyTorch shapes of DESIGN.md, so one model.safetensors serves both frameworks). Files share the
torch side's names where the concept is the same, so `diff torch/X.py jax/X.py` reads well:

    layers.py         norms, positions (learned / sinusoidal / RoPE), attention (MHA/GQA/MQA), MLPs, block
    model.py          forward(params, config, tokens) -> logits (any float dtype); init, loss, checkpoint I/O
    kv_cache.py       the fixed-shape KV cache: make_cache, slot writes, beam reorder, how long to allocate
    sampling.py       logits filters (repetition penalty, temperature, top-k, top-p, min-p) and the draw
    generate.py       jitted prefill and decode step, sliding window, stop strings, sample_texts
    beam.py           beam search's model side (the search itself: minillm.beam)
    optim.py          AdamW set-up: decay mask, LR schedule, clipping
    step.py           the pure, jitted training step (grad accumulation, bf16 mixed precision)
    train.py          the Trainer that minillm.train_loop drives
    trainer_state.py  resume files in the PyTorch trainer's format
    parallel.py       data parallelism with jax.sharding

Needs the `jax` extra (jax + optax); never imports torch.
"""
