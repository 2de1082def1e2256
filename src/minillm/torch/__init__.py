"""The model, its training and its decoding in PyTorch; never imports jax. The JAX twin
(minillm.jax) has files of the same names where the concept is the same, so
`diff torch/X.py jax/X.py` reads well.

    layers, model                            Transformer(config): tokens (B, T) -> logits (B, T, V)
    optim, run_data, trainer_state, train    the Trainer that minillm.train_loop drives
    kv_cache, packed, sampling, generate     decoding: cache state, fast weight copy, filters, loop
    beam, evaluate                           beam search's model side; perplexity
"""
