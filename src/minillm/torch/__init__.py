"""The model, its training and its decoding in PyTorch. The JAX twin (minillm.jax) has files of
the same names where the concept is the same, so `diff torch/X.py jax/X.py` reads well:

    layers.py         functional norms, RoPE, MLPs, attention, and the nn.Modules built on them
    model.py          Transformer(config): tokens (B, T) -> logits (B, T, V); loss; run directory I/O
    optim.py          AdamW set-up: which parameters decay, the fused kernel
    train.py          the Trainer that minillm.train_loop drives (device, precision, DDP, compile)
    run_data.py       the trainer's batches as tensors, rank by rank
    trainer_state.py  the resume point: weights, AdamW moments, RNG states
    kv_cache.py       KVCache (one layer) and BatchCache (a batch's cache state: slots, positions, masks)
    packed.py         the packed fast copy of a model decoding runs on, and its compiled decode step
    sampling.py       logits filters (repetition penalty, temperature, top-k, top-p, min-p) and the draw
    generate.py       prefill, then one decode step per token; batching, seeds, stops, sliding window
    beam.py           beam search's model side (the search itself: minillm.beam)
    evaluate.py       perplexity of a token array

Never imports jax.
"""
