"""BatchLoader / eval_batches / read_meta: windows, seeding, exact resume, rank sharding, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minillm.data.loader import BatchLoader, eval_batches, read_meta, read_tokens


@pytest.fixture
def data_dir(tmp_path):
    # Token i has value i % 5000, so a window's content tells where it came from.
    np.arange(10_000, dtype=np.uint16).__mod__(5000).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.arange(1_001, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 5000}))
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
    val = read_tokens(data_dir / "val.bin")
    batches = list(eval_batches(val, block_size=100, batch_size=4))
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.shape == (10, 100) and np.array_equal(x.ravel(), np.arange(1000))
    assert np.array_equal(y.ravel(), np.arange(1000) + 1)
    assert np.array_equal(y[:, -1], np.arange(1, 11) * 100)
    shards = [np.concatenate([b[0] for b in eval_batches(val, 100, 4, rank=r, world_size=3)])
              for r in range(3)]
    assert sorted(row[0] for s in shards for row in s) == list(range(0, 1000, 100))
    assert len(list(eval_batches(val, 100, 4, max_batches=2))) == 2


def test_eval_batches_tail_predicts_every_token_once() -> None:
    tokens = np.arange(150, dtype=np.uint32)  # 149 targets: 4 windows of 32, then a tail of 21
    batches = list(eval_batches(tokens, block_size=32, batch_size=3, tail=True))
    assert [b[0].shape for b in batches] == [(3, 32), (1, 32), (1, 21)]
    assert np.array_equal(np.concatenate([b[1].ravel() for b in batches]), np.arange(1, 150))
    assert np.array_equal(np.concatenate([b[0].ravel() for b in batches]), np.arange(149))
    assert len(list(eval_batches(tokens, 32, 3))) == 2  # without tail: whole windows only
    assert len(list(eval_batches(np.arange(129), 32, 3, tail=True))) == 2  # 128 targets: no tail
    shards = [list(eval_batches(tokens, 32, 3, rank=r, world_size=2, tail=True)) for r in range(2)]
    targets = [t for shard in shards for _, y in shard for t in y.ravel()]
    assert sorted(targets) == list(range(1, 150))


def test_missing_meta_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="run prepare"):
        BatchLoader(tmp_path, 16, 8)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"dtype": "uint16", "vocab_', "not valid JSON"),
        ('{"dtype": "float32", "vocab_size": 65}', "dtype must be one of"),
        ('{"dtype": "uint16"}', "vocab_size must be a positive integer"),
        ('{"dtype": "uint16", "vocab_size": "65"}', "vocab_size must be a positive integer"),
        ("[1]", "JSON object"),
    ],
)
def test_bad_meta_is_a_one_line_error_naming_the_file(tmp_path, content, message) -> None:
    (tmp_path / "meta.json").write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        read_meta(tmp_path)
    assert "meta.json" in str(info.value) and "\n" not in str(info.value)


def test_read_meta_returns_the_checked_fields(data_dir) -> None:
    assert read_meta(data_dir) == {"dtype": "uint16", "vocab_size": 5000}
    val = read_tokens(data_dir / "val.bin")
    assert val.dtype == np.uint16 and np.array_equal(val, np.arange(1_001))


def test_data_and_tokenizer_import_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, minillm.tokenizer, minillm.data.sources, minillm.data.prepare, minillm.data.loader; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'jax')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
