"""BatchLoader / eval_batches: windows, seeding, exact resume, rank sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minillm.data.loader import BatchLoader, eval_batches


@pytest.fixture
def data_dir(tmp_path):
    # Token i has value i % 5000, so a window's content tells where it came from.
    np.arange(10_000, dtype=np.uint16).__mod__(5000).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.arange(1_001, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    return tmp_path


def test_windows_are_shifted_by_one(data_dir) -> None:
    loader = BatchLoader(data_dir, block_size=16, batch_size=8)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == np.int64
    assert np.array_equal(y[:, :-1], x[:, 1:])
    tokens = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    for row, start in zip(x, loader.offsets(0)):
        assert np.array_equal(row, tokens[start : start + 16])


def test_seeded(data_dir) -> None:
    a, b, c = (BatchLoader(data_dir, 16, 8, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.next_batch()[0], b.next_batch()[0])
    assert not np.array_equal(a.next_batch()[0], c.next_batch()[0])


def test_resume_from_json_state_replays_exactly(data_dir) -> None:
    loader = BatchLoader(data_dir, 16, 8, seed=3)
    for _ in range(5):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch()[0] for _ in range(3)]
    resumed = BatchLoader(data_dir, 16, 8, seed=0)
    resumed.load_state_dict(state)
    assert all(np.array_equal(e, resumed.next_batch()[0]) for e in expected)


def test_ranks_split_the_global_batch(data_dir) -> None:
    single = BatchLoader(data_dir, 16, 8, seed=4).next_batch()[0]
    ranks = [BatchLoader(data_dir, 16, 8, seed=4, rank=r, world_size=2).next_batch()[0] for r in range(2)]
    assert ranks[0].shape == (4, 16) and not np.array_equal(ranks[0], ranks[1])
    assert np.array_equal(np.concatenate(ranks), single)
    with pytest.raises(ValueError, match="divisible"):
        BatchLoader(data_dir, 16, 6, world_size=4)


def test_windows_cover_the_whole_file(data_dir) -> None:
    loader = BatchLoader(data_dir, 16, 64)
    starts = np.concatenate([loader.offsets(s) for s in range(200)])
    assert starts.min() < 50 and starts.max() > 10_000 - 16 - 50 and starts.max() <= 10_000 - 17


def test_eval_batches_are_sequential_and_sharded(data_dir) -> None:
    batches = list(eval_batches(data_dir, block_size=100, batch_size=4))
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.shape == (10, 100) and np.array_equal(x.ravel(), np.arange(1000))
    assert np.array_equal(y.ravel(), np.arange(1000) + 1)
    assert np.array_equal(y[:, -1], np.arange(1, 11) * 100)
    shards = [np.concatenate([b[0] for b in eval_batches(data_dir, 100, 4, rank=r, world_size=3)]) for r in range(3)]
    assert sorted(row[0] for s in shards for row in s) == list(range(0, 1000, 100))
    assert len(list(eval_batches(data_dir, 100, 4, max_batches=2))) == 2


def test_missing_meta_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="run prepare"):
        BatchLoader(tmp_path, 16, 8)


def test_data_and_tokenizer_import_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, minillm.tokenizer, minillm.data.sources, minillm.data.prepare, minillm.data.loader; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'jax')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
