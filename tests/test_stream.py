"""data.stream: training batches read from Lance a bounded buffer at a time, on real ml-100k ctr rows."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from rex.config.errors import DataError
from rex.config.recipe import load_recipe
from rex.data.datamodule import RexDataModule
from rex.data.prepare import data_root
from rex.data.stream import PIECES_PER_BUFFER, StreamLoader
from rex.engine.train import train
from tests.conftest import REPO

MAX_LEN = 50
BATCH = 512


def _datamodule(recipe: str, *overrides: str) -> RexDataModule:
    loaded = load_recipe(REPO / "recipes" / recipe, [f"train.batch_size={BATCH}", *overrides]).recipe
    return RexDataModule(loaded, data_root() / loaded.data.name, seed=5)


@pytest.fixture(scope="module")
def ctr(data_home: Path) -> RexDataModule:
    """deepfm's ml-100k ctr view: 80,000 train rows of ids, a float label and a history list."""
    return _datamodule("deepfm.yaml")


@pytest.fixture(scope="module")
def names(ctr: RexDataModule) -> list[str]:
    stream = ctr.task.stream_columns(ctr)
    assert stream is not None and "history" in stream
    return stream


@pytest.fixture(scope="module")
def fragmented(ctr: RexDataModule, names: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same train table written as 8 fragments of 10,000 rows, with each row's number."""
    path = tmp_path_factory.mktemp("stream") / "ctr_train.lance"
    table = lance.dataset(str(ctr.table("train"))).to_table(columns=names)
    table = table.append_column("row", pa.array(np.arange(table.num_rows)))
    lance.write_dataset(table, str(path), max_rows_per_file=10_000)
    assert len(lance.dataset(str(path)).get_fragments()) == 8
    return path


def _stream(
    uri: str | Path, names: list[str], buffer_rows: int = 8192, storage_options: dict[str, str] | None = None
) -> StreamLoader:
    return StreamLoader(
        uri, names, BATCH, buffer_rows=buffer_rows, max_len=MAX_LEN, seed=5, storage_options=storage_options
    )


def _rows(batches: Iterable[dict[str, torch.Tensor]]) -> np.ndarray:
    """Every served row as one line of numbers (history left-padded to max_len), lines sorted:
    equal results mean the same rows, each as often."""
    lines = []
    for batch in batches:
        parts = []
        for name in sorted(batch):
            value = batch[name].double()
            parts.append(F.pad(value, (MAX_LEN - value.shape[1], 0)) if value.dim() == 2 else value[:, None])
        lines.append(torch.cat(parts, dim=1))
    matrix = torch.cat(lines).numpy()
    return matrix[np.lexsort(matrix.T[::-1])]


def _same(first: list[dict[str, torch.Tensor]], second: list[dict[str, torch.Tensor]]) -> bool:
    return len(first) == len(second) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(first, second, strict=True)
    )


def test_a_streamed_epoch_serves_exactly_the_in_memory_rows_once_in_the_same_form(ctr, names, fragmented):
    memory = list(ctr.loader("train"))
    streamed_dm = _datamodule("deepfm.yaml", "data.stream=true", "data.stream_buffer_rows=8192")
    stream = streamed_dm.loader("train")
    assert isinstance(stream, StreamLoader) and stream.batch_sampler is None
    assert isinstance(streamed_dm.loader("valid"), type(ctr.loader("valid")))  # evaluation stays in memory
    for loader in (stream, _stream(fragmented, names)):
        batches = list(loader)
        assert len(batches) == len(loader) == len(memory) == math.ceil(80_000 / BATCH)
        assert [len(b["user"]) for b in batches] == [len(b["user"]) for b in memory]
        # Same columns, dtypes and padding rule: a list column is as wide as the batch's longest row.
        assert all(b.keys() == memory[0].keys() for b in batches)
        assert {k: v.dtype for k, v in batches[0].items()} == {k: v.dtype for k, v in memory[0].items()}
        assert all(bool((b["history"][:, 0] != 0).any()) for b in batches)
        np.testing.assert_array_equal(_rows(batches), _rows(memory))


def test_the_order_depends_on_seed_and_epoch_alone(names, fragmented):
    first, second = _stream(fragmented, names), _stream(fragmented, names)
    epoch0 = list(first)
    assert _same(epoch0, list(second)) and _same(epoch0, list(first))  # same seed, same epoch
    first.sampler.set_epoch(1)
    second.sampler.set_epoch(1)
    epoch1 = list(first)
    assert _same(epoch1, list(second)) and not _same(epoch0, epoch1)
    other = StreamLoader(fragmented, names, BATCH, buffer_rows=8192, max_len=MAX_LEN, seed=6)
    assert not _same(epoch0, list(other))
    # A batch mixes rows from pieces all over the table, not a run of neighbouring rows.
    rows = next(iter(_stream(fragmented, ["row"])))["row"]
    fragments, pieces = rows // 10_000, rows % 10_000 // (8192 // PIECES_PER_BUFFER)
    mixed = set(zip(fragments.tolist(), pieces.tolist(), strict=True))
    assert len(set(fragments.tolist())) >= 3 and len(mixed) >= PIECES_PER_BUFFER


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_run_equal_batch_counts_and_cover_each_row_once(names, fragmented, world_size):
    whole = _rows(_stream(fragmented, names))
    shares = []
    for rank in range(world_size):
        loader = _stream(fragmented, names)
        loader.shard(rank, world_size)
        loader.sampler.set_epoch(2)
        batches = list(loader)
        assert len(batches) == len(loader) == math.ceil(80_000 / BATCH) // world_size
        shares.append(batches)
    np.testing.assert_array_equal(_rows(b for share in shares for b in share), whole)


def test_skip_batches_resumes_at_that_batch_of_that_epoch_only(names, fragmented):
    loader = _stream(fragmented, names)
    loader.sampler.set_epoch(3)
    epoch = list(loader)
    loader.skip_batches(3, 40)
    assert _same(list(loader), epoch[40:])
    assert _same(list(loader), epoch)  # the skip applies to one pass
    loader.skip_batches(2, 40)  # a checkpoint of another epoch: nothing to skip in this one
    assert _same(list(loader), epoch)


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_loader_never_holds_more_rows_than_two_buffers(names, fragmented, monkeypatch, world_size):
    # One buffer is served while the next is read.
    buffer_rows = 3 * BATCH + 100
    read = 0
    original = StreamLoader._read

    def counting(self: StreamLoader, fragment: int, start: int, rows: int):  # type: ignore[no-untyped-def]
        nonlocal read
        read += rows
        return original(self, fragment, start, rows)

    monkeypatch.setattr(StreamLoader, "_read", counting)
    loader = _stream(fragmented, names, buffer_rows=buffer_rows)
    loader.shard(0, world_size)
    served = 0
    for batch in loader:
        assert read - served <= 2 * buffer_rows  # rows read and not yet served before this batch
        served += len(batch["user"])
    assert read == served == 80_000 // world_size


def test_a_buffer_smaller_than_a_batch_and_a_task_that_cannot_stream_are_refused(
    data_home, names, fragmented
):
    with pytest.raises(DataError) as caught:
        _stream(fragmented, names, buffer_rows=BATCH - 1)
    assert caught.value.key == "data.stream_buffer_rows"
    loader = _stream(fragmented, names, buffer_rows=BATCH)
    with pytest.raises(DataError, match="cannot hold a batch"):  # two processes' last batches are larger
        loader.shard(0, 2)
    sequences = _datamodule("sasrec.yaml", "data.stream=true")
    with pytest.raises(DataError) as caught:
        sequences.loader("train")
    assert caught.value.key == "data.stream" and "next_item" in str(caught.value)


def test_a_ctr_recipe_trains_with_data_stream(data_home, tmp_path):
    run_dir = train(
        REPO / "recipes" / "deepfm.yaml",
        [
            "data.stream=true",
            "data.stream_buffer_rows=4096",
            "train.max_epochs=1",
            "train.limit_train_batches=5",
            "train.limit_eval_batches=2",
            "logging.progress_bar=false",
            f"logging.run_root={tmp_path}",
        ],
    )
    assert "stream: true" in (run_dir / "recipe.yaml").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"] and all(math.isfinite(v) for v in metrics["test"].values())


@contextlib.contextmanager
def _s3_server() -> Iterator[str]:
    """A local S3-compatible server (moto) on a free port: its endpoint URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(
    (importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None)
    and not os.environ.get("CI"),  # CI installs the s3 extra: there, a missing server fails
    reason="no local S3 server: pip install -e '.[s3]'",
)
def test_an_s3_uri_passes_to_lance_unchanged(names, fragmented):
    with _s3_server() as endpoint:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/rex", method="PUT"))
        options = {
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
            "aws_region": "us-east-1",
            "aws_endpoint": endpoint,
            "allow_http": "true",
        }
        uri = "s3://rex/ml-100k/ctr_train.lance"
        table = lance.dataset(str(fragmented)).to_table()
        lance.write_dataset(table, uri, storage_options=options, max_rows_per_file=10_000)
        remote = _stream(uri, names, storage_options=options)
        assert remote.uri == uri
        assert _same(list(remote), list(_stream(fragmented, names)))
