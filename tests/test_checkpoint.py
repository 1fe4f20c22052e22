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
