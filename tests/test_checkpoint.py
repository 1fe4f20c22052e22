import json

import pytest
import torch
from safetensors.torch import load_file

from metamerge.engine.checkpoint import CheckpointReader, TensorInfo
from metamerge.engine.writer import ShardedWriter
from metamerge.errors import CheckpointError
from tests.helpers import write_checkpoint


def test_writer_streams_shards_that_safetensors_reads_back(tmp_path):
    tensors = {f"t{i}": torch.randn(5 + i, 3).to(dt) for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16])}
    tensors["ids"] = torch.arange(5)
    infos = [TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, infos, max_shard_bytes=80)
    for k, v in tensors.items():
        writer.write(k, v)
    files = writer.finish()
    # 60 + 36 bytes > 80 → t0 alone; t1 + t2 = 78 bytes; + ids (40) > 80 → ids alone: worked out by hand
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"t0": files[0], "t1": files[1], "t2": files[1], "ids": files[2]}
    for f, names in zip(files, [{"t0"}, {"t1", "t2"}, {"ids"}], strict=True):
        assert set(load_file(str(tmp_path / f))) == names
    back = {}
    for f in files:
        back.update(load_file(str(tmp_path / f)))
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in infos)


def test_writer_rejects_out_of_order_tensor(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorInfo("a", torch.float32, (2,))], 1 << 20)
    with pytest.raises(CheckpointError, match="expected a"):
        writer.write("b", torch.zeros(2))


def test_reader_reads_sharded_and_single(tmp_path):
    tensors = {"a": torch.randn(3, 2), "b": torch.randn(4), "c": torch.arange(3)}
    for shards in (1, 2):
        reader = CheckpointReader(write_checkpoint(tmp_path / f"s{shards}", tensors, shards=shards))
        assert set(reader.names) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(reader.read(k), v)
            assert reader.info(k).shape == tuple(v.shape)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_fail_with_the_file_name(tmp_path, damage):
    folder = write_checkpoint(tmp_path / "m", {"a": torch.randn(64, 64)})
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 8 + b"not json", "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        CheckpointReader(folder, label="m")


def test_missing_shard_named_in_index(tmp_path):
    folder = write_checkpoint(tmp_path / "m", {"a": torch.randn(2), "b": torch.randn(2)}, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002"):
        CheckpointReader(folder)


def _rss_file_mb() -> float:
    """Mapped file pages in RSS (RssShmem too: on a tmpfs the file's pages are counted there)."""
    return sum(int(line.split()[1]) for line in open("/proc/self/status")
               if line.startswith(("RssFile", "RssShmem"))) / 1024


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_mapped_piece_is_the_read_one_and_its_pages_count_only_while_it_lives(tmp_path):
    """The merge's memory bound rests on this: a mapped piece's pages leave RSS with its last reference."""
    import gc

    from metamerge.engine.pieces import populate

    gen = torch.Generator().manual_seed(5)
    tensors = {"a": torch.randn(7, 3, generator=gen), "big": torch.randn(6000, 4096, generator=gen),
               "half": torch.randn(5, 5, generator=gen).to(torch.bfloat16)}
    write_checkpoint(tmp_path / "m", tensors)
    reader = CheckpointReader(tmp_path / "m")
    assert torch.equal(reader.mapped_f32("a"), tensors["a"].reshape(-1))
    assert torch.equal(reader.mapped_f32("big", rows=(10, 20)), tensors["big"][10:20].reshape(-1))
    assert reader.mapped_f32("half") is None  # stored bf16: the engine reads and converts it
    before = _rss_file_mb()
    piece = reader.mapped_f32("big")  # 94 MB
    assert _rss_file_mb() - before < 10  # mapped, not yet touched
    populate(piece)
    assert _rss_file_mb() - before > 80  # every page mapped at once
    piece.add_(1.0)  # copy-on-write: a write never reaches the file
    assert torch.equal(reader.read("big"), tensors["big"])
    del piece
    gc.collect()
    assert _rss_file_mb() - before < 10
    reader.close()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_piece_reader_maps_pages_ahead_for_chunks_but_not_for_whole_big_tensors(tmp_path, monkeypatch):
    """The loading thread maps a chunk's pages while the merge computes the piece before; a piece
    above a chunk (a whole tensor, for TIES) would then be resident twice over, so it faults in as used."""
    import gc

    from metamerge.engine import pieces
    from metamerge.engine.compat import align

    gen = torch.Generator().manual_seed(6)
    big = torch.randn(6000, 4096, generator=gen)
    write_checkpoint(tmp_path / "base", {"w": big})
    write_checkpoint(tmp_path / "ft", {"w": big + 0.01})
    base, ft = CheckpointReader(tmp_path / "base"), CheckpointReader(tmp_path / "ft", label="ft")
    reader = pieces.PieceReader(base, [(ft, align(base, ft))], torch.device("cpu"), lambda n: True)
    workspace = pieces.Workspace(2, 16, pin=False)
    monkeypatch.setattr(pieces, "CHUNK_ELEMENTS", 1000 * 4096)
    before = _rss_file_mb()
    chunk = reader.load("w", (0, 1000), workspace)  # 2 × 16 MB, at the chunk size
    assert _rss_file_mb() - before > 28  # mapped ahead, before anything touched it
    assert isinstance(chunk, list) and torch.equal(chunk[1], (big[:1000] + 0.01).reshape(-1))
    del chunk
    gc.collect()
    before = _rss_file_mb()
    whole = reader.load("w", None, workspace)  # 2 × 94 MB, above the chunk size
    assert _rss_file_mb() - before < 10
    assert torch.equal(whole[0], big.reshape(-1))  # touched: now resident
    del whole
    gc.collect()
    base.close()
    ft.close()


@pytest.mark.parametrize("n", [1, 31, 32])
def test_staging_to_the_device_copies_every_row_through_the_packed_buffer(n):
    """The CUDA path's copy from mapped rows to the GPU through the pinned workspace (here the CPU
    as the device, so it runs anywhere): every entry arrives in its row, and the rows sit packed
    at the buffer's start (a strided view would be copied once more on the host)."""
    from metamerge.engine.pieces import stage_to_device

    rows = [torch.arange(n, dtype=torch.float32) + 10_000 * t for t in range(3)]
    staging = torch.full((3, 32), float("nan"))
    staged = stage_to_device(rows, staging, torch.device("cpu"))
    assert staged.shape == (3, n) and staged.is_contiguous()
    for t in range(3):
        assert torch.equal(staged[t], rows[t])
    assert torch.equal(staging.view(-1)[: 3 * n], torch.cat(rows))
