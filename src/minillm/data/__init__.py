"""The data pipeline: text sources -> token files -> batches (numpy only, no framework).

- `minillm.data.sources`: the built-in Shakespeare corpus, local .txt/.jsonl files, HF datasets
- `minillm.data.prepare`: `prepare(source, out_dir, tokenizer=...)` -> train.bin / val.bin / meta.json
- `minillm.data.loader`:  `BatchLoader` (random training windows, resumable), `eval_batches`
  (consecutive windows, as `minillm eval` and `minillm.torch.evaluate.perplexity` read them),
  `read_meta` (the one reader of meta.json, checked) and `read_tokens` (a split as a memmap)

Import from the submodules (`from minillm.data.prepare import prepare`); nothing is re-exported
here, so that the name `minillm.data.prepare` always means the module.
"""
