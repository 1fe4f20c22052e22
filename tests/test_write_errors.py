"""Issue 13 #4: a full disk, a read-only file system, a refused permission are deterministic: one line
naming the path and the cause, no retry, nothing partial left. Real tmpfs mounts where the machine
allows them (root here); otherwise those tests skip with the reason, and the fault-injected writer
tests below cover the same code paths."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from metamerge.engine.coefficients import solve_constant
from metamerge.engine.merge import merge_checkpoints
from metamerge.errors import WriteError, is_retryable
from metamerge.io.publish import publish_run
from metamerge.methods.plan import MergePlan
from tests.helpers import random_family, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
_count = itertools.count()


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Path] = []

    def mount(size: str = "5m", read_only: bool = False) -> Path:
        folder = tmp_path / f"tmpfs-{next(_count)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the fault-injected "
                        "tests in this file cover the same code path")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _big_family(root: Path, rows: int = 1024, cols: int = 1536) -> tuple[Path, list[tuple[str, Path]]]:
    """6 MB of float32 per model: more than a 5 MB tmpfs holds."""
    gen = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(rows, cols, generator=gen)}
    base_dir = write_checkpoint(root / "base", base)
    fts = []
    for i in range(2):
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        fts.append((f"ft{i}", write_checkpoint(root / f"ft{i}", ft)))
    return base_dir, fts


def _merge_into(base_dir, fts, out):
    labels = [label for label, _ in fts]
    return merge_checkpoints(base_dir, fts, solve_constant(labels, 0.5, "average"), MergePlan(weighting="uniform"),
                             out, device="cpu")


def test_enospc_during_a_merge_is_one_line_and_leaves_nothing(tmp_path, tmpfs):
    base_dir, fts = _big_family(tmp_path / "models")
    small = tmpfs("5m")
    started = time.monotonic()
    with pytest.raises(WriteError) as info:
        _merge_into(base_dir, fts, small / "out")  # the disk filled up after any preflight
    elapsed = time.monotonic() - started
    assert str(info.value) == f"cannot write {small / 'out'}: No space left on device (ENOSPC)"
    assert not is_retryable(info.value)
    assert os.listdir(small) == []  # the temporary is gone, no `out`
    print(f"ENOSPC mid-merge: {info.value} ({elapsed:.2f}s)")


def test_cli_merge_onto_a_too_small_disk_fails_in_seconds(tmp_path, tmpfs):
    base_dir, fts = _big_family(tmp_path / "models")
    small = tmpfs("5m")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "m", "base": str(base_dir), "finetunes": [str(p) for _, p in fts],
                                      "method": "average", "merge": {"device": "cpu"},
                                      "workdir": str(tmp_path / "work")}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "from metamerge_prefect.cli import main; main()", "merge", str(recipe),
                           "--out", str(small / "out")], capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not enough free disk for --out"), done.stderr
    assert "MB needed" in lines[0] and "MB free" in lines[0]
    assert os.listdir(small) == []
    assert elapsed < 20, elapsed
    print(f"{lines[0]} ({elapsed:.1f}s)")


def test_local_publish_onto_a_full_disk_leaves_nothing(tmp_path, tmpfs):
    small = tmpfs("5m")
    (tmp_path / "model.safetensors").write_bytes(os.urandom(6 * 1024 * 1024))
    (tmp_path / "config.json").write_text("{}")
    files = {"config.json": tmp_path / "config.json", "model.safetensors": tmp_path / "model.safetensors"}
    with pytest.raises(WriteError, match=r"No space left on device \(ENOSPC\)") as info:
        publish_run(files, str(small / "pub"), "m", "r1")
    assert str(small / "pub" / "m" / "r1") in str(info.value)
    assert os.listdir(small) == []  # no run folder, no claim, no partial file, no latest.json


def test_read_only_publish_target_is_not_retried(tmp_path, tmpfs):
    read_only = tmpfs("5m", read_only=True)
    (tmp_path / "a.bin").write_bytes(b"a")
    started = time.monotonic()
    with pytest.raises(WriteError, match=r"Read-only file system \(EROFS\)") as info:
        publish_run({"a.bin": tmp_path / "a.bin"}, str(read_only / "pub"), "m", "r1")
    assert str(read_only / "pub") in str(info.value) and not is_retryable(info.value)
    assert time.monotonic() - started < 2


@pytest.mark.slow
def test_flow_with_a_read_only_target_fails_once_in_seconds(tmp_path, tmpfs, prefect_api, monkeypatch):
    """The target turns read-only between preflight and publish: the publish task runs once, fails with one line."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from metamerge_prefect.flows.merge_flow import merge_flow
    from metamerge_prefect.tasks import publish as publish_task_module

    base, fts, *_ = random_family(tmp_path / "models", n_finetunes=2)
    target = tmpfs("5m")
    recipe = {"name": "m", "base": str(base), "finetunes": [str(f) for f in fts], "merge": {"device": "cpu"},
              "publish": {"target": str(target / "pub")}, "workdir": str(tmp_path / "work")}
    real_publish = publish_task_module.publish

    def publish_after_remount(*args, **kwargs):
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(publish_task_module, "publish", publish_after_remount)
    started = time.monotonic()
    state = merge_flow(recipe, return_state=True)
    assert state.is_failed()
    with pytest.raises(WriteError, match=rf"cannot write {target / 'pub'}.*Read-only file system \(EROFS\)"):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    publish = [r for r in runs if r.name == "publish"]
    assert publish and publish[0].run_count == 1, [(r.name, r.run_count) for r in runs]
    assert os.listdir(target) == []
    print(f"read-only target at publish: failed once after {time.monotonic() - started:.1f}s")


@pytest.mark.slow
def test_flow_preflight_refuses_a_read_only_target_before_merging(tmp_path, tmpfs, prefect_api):
    from metamerge_prefect.flows.merge_flow import merge_flow

    base, fts, *_ = random_family(tmp_path / "models", n_finetunes=2)
    read_only = tmpfs("5m", read_only=True)
    recipe = {"name": "m", "base": str(base), "finetunes": [str(f) for f in fts], "merge": {"device": "cpu"},
              "publish": {"target": str(read_only / "pub")}, "workdir": str(tmp_path / "work")}
    state = merge_flow(recipe, return_state=True)
    assert state.is_failed()
    with pytest.raises(WriteError, match=rf"publish target {read_only / 'pub'} is not writable: Read-only file system"):
        state.result()
    assert not (tmp_path / "work" / "merged").exists() and not (tmp_path / "work" / "stats").exists()


# --- the same code paths with a fault-injected writer (any machine, any user) ------------------------


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "No space left on device (ENOSPC)"),
                                             (errno.EROFS, "Read-only file system (EROFS)"),
                                             (errno.EACCES, "Permission denied (EACCES)")])
def test_injected_write_failure_in_the_merge(tmp_path, monkeypatch, code, words):
    from metamerge.engine import writer

    base_dir, ft_dirs, *_ = random_family(tmp_path / "models", n_finetunes=2)

    def failing_write(self, name, tensor):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(writer.ShardedWriter, "write", failing_write)
    out = tmp_path / "out" / "merged"
    with pytest.raises(WriteError) as info:
        _merge_into(base_dir, [("ft0", ft_dirs[0]), ("ft1", ft_dirs[1])], out)
    assert str(info.value) == f"cannot write {out}: {words}" and not is_retryable(info.value)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_injected_write_failure_in_a_local_publish(tmp_path, monkeypatch, code):
    from metamerge.io import publish

    def failing_copy(source, dest, meta):
        raise OSError(code, os.strerror(code), str(dest))

    monkeypatch.setattr(publish, "_copy_verified", failing_copy)
    (tmp_path / "a.bin").write_bytes(b"a")
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'pub' / 'm' / 'r1'}: ") as info:
        publish_run({"a.bin": tmp_path / "a.bin"}, str(tmp_path / "pub"), "m", "r1")
    assert errno.errorcode[code] in str(info.value)
    assert not (tmp_path / "pub").exists()  # what this attempt created is gone again


def test_raw_deterministic_os_errors_are_not_retried():
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        assert not is_retryable(OSError(code, os.strerror(code)))
    assert is_retryable(OSError(errno.ECONNRESET, "reset"))
