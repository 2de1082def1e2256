"""The data pipeline, numpy only: `sources` (text sources) -> `prepare` (train.bin / val.bin /
meta.json) -> `loader` (training and evaluation batches; the one reader of meta.json).

Import from the submodules (`from minillm.data.prepare import prepare`); nothing is re-exported
here, so that the name `minillm.data.prepare` always means the module.
"""
