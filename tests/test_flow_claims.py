"""README claims, checked through the real merge_flow on small random checkpoints (seconds each, no zoo).

Real Prefect API (the session's test harness), real S3 server on 127.0.0.1, real files. The only
stand-ins are faults: a missing bucket, a corrupt fine-tune, "no CUDA here".
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metamerge.io.manifests import latest_manifest
from metamerge.io.s3 import s3_client
from tests.faultproxy import FaultProxy
from tests.flowtools import bucket_keys, expected_task_names, task_runs, together_name
from tests.helpers import random_family, write_checkpoint

pytestmark = pytest.mark.usefixtures("prefect_api")


SMALL = [0.05, 0.1, 0.15]  # task vectors well under merge.max_relative_norm, like real fine-tunes


def _recipe(tmp_path, base: str, finetunes: list[tuple[str, str]], **overrides) -> dict:
    recipe = {"name": "small", "base": base, "method": {"name": "metagpt"},
              "finetunes": [{"ref": ref, "name": name} for name, ref in finetunes],
              "merge": {"device": "cpu", "shard_size_mb": 1}, "workdir": str(tmp_path / "work")}
    recipe.update(overrides)
    return recipe


def _family_recipe(tmp_path, **overrides) -> tuple[dict, tuple]:
    family = random_family(tmp_path / "models", scale=SMALL)
    base_dir, ft_dirs, _, _ = family
    return _recipe(tmp_path, str(base_dir), [(f"ft{i}", str(d)) for i, d in enumerate(ft_dirs)], **overrides), family


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in Path(folder).glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


# --- deterministic errors: one attempt, one line, nothing published ---------------------------------


@pytest.mark.parametrize("fault", ["shape", "nan", "bucket-deleted"])
def test_deterministic_errors_are_never_retried(tmp_path, s3_endpoint, bucket, fault, monkeypatch):
    """README: shape mismatch, NaN and a missing bucket fail at once with one line, never retried."""
    from metamerge_prefect.flows.merge_flow import merge_flow
    from metamerge_prefect.tasks import publish as publish_task_module

    recipe, (base_dir, ft_dirs, base, fts) = _family_recipe(tmp_path)
    name = "model.layers.1.self_attn.q_proj.weight"
    # the three fine-tunes are extracted in one pass over the base: that task fails, naming ft1
    target, failing = f"s3://{bucket}/merges", together_name(["ft0", "ft1", "ft2"])
    if fault == "shape":
        bad = {**fts[1], name: torch.zeros(7, 7)}
        message = rf"fine-tune 'ft1': tensor '{name}' has shape \[7, 7\], base has \[12, 12\]"
    elif fault == "nan":
        poisoned = fts[1][name].clone()
        poisoned[2, 3] = float("nan")
        bad = {**fts[1], name: poisoned}
        message = rf"'{name}' contains NaN or Inf"
    else:  # the bucket passes the preflight, then is gone when the publish task runs
        gone = f"{bucket}-gone"
        s3_client(s3_endpoint).create_bucket(Bucket=gone)
        real = publish_task_module.publish

        def publish_after_the_bucket_went(*args, **kwargs):  # the fault, injected between preflight and publish
            if gone in {b["Name"] for b in s3_client(s3_endpoint).list_buckets()["Buckets"]}:
                s3_client(s3_endpoint).delete_bucket(Bucket=gone)
            return real(*args, **kwargs)

        monkeypatch.setattr(publish_task_module, "publish", publish_after_the_bucket_went)
        bad, target, failing = None, f"s3://{gone}/merges", "publish"
        message = f"S3 publish at .*: NoSuchBucket '{gone}'"
    if bad is not None:
        recipe["finetunes"][1]["ref"] = str(write_checkpoint(tmp_path / "bad", bad))
    with FaultProxy(s3_endpoint) as proxy:
        recipe["publish"] = {"target": target, "endpoint_url": proxy.endpoint}
        state = merge_flow(recipe, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=message) as info:
        state.result()
    assert "\n" not in str(info.value)
    runs = {run.name: run for run in task_runs(state.state_details.flow_run_id, expect={failing})}
    assert runs[failing].state.is_failed()
    assert runs[failing].run_count == 1, f"{failing} ran {runs[failing].run_count} times"
    assert not [request for request in proxy.log if request[0] == "PUT"]
    if fault == "bucket-deleted":
        heads = [request for request in proxy.log if request[0] == "HEAD"]
        assert heads == [("HEAD", f"/{gone}")]  # one publish attempt, one HeadBucket
    else:
        assert "publish" not in runs
    assert bucket_keys(s3_endpoint, bucket) == set()


def test_a_missing_bucket_fails_the_preflight_with_one_request(tmp_path, s3_endpoint):
    """A publish target whose bucket does not exist stops the run before any task, after one request."""
    from metamerge_prefect.flows.merge_flow import merge_flow

    recipe, _ = _family_recipe(tmp_path)
    with FaultProxy(s3_endpoint) as proxy:
        recipe["publish"] = {"target": "s3://no-such-bucket-x/merges", "endpoint_url": proxy.endpoint}
        state = merge_flow(recipe, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="NoSuchBucket 'no-such-bucket-x'") as info:
        state.result()
    assert "\n" not in str(info.value)
    assert len(proxy.log) == 1 and proxy.log[0][1].startswith("/no-such-bucket-x/"), proxy.log
    assert task_runs(state.state_details.flow_run_id, timeout=3) == []


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    """README/recipes: `merge.device: cuda` on a machine without CUDA fails, it does not fall back to CPU."""
    from metamerge_prefect.flows.merge_flow import merge_flow

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the fault: "no CUDA here", on any machine
    recipe, _ = _family_recipe(tmp_path, merge={"device": "cuda"}, publish={"target": str(tmp_path / "published")})
    state = merge_flow(recipe, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as info:
        state.result()
    assert str(info.value) == "merge.device is 'cuda' but no CUDA device is available"
    runs = {run.name: run for run in task_runs(state.state_details.flow_run_id, expect={"merge"})}
    assert runs["merge"].state.is_failed() and runs["merge"].run_count == 1
    merged = tmp_path / "work" / "merged"
    assert not merged.exists() or not list(merged.iterdir())
    assert not (tmp_path / "published").exists()


# --- what a run shows and where it publishes -----------------------------------------------------------


def test_merge_progress_artifact_climbs_to_100(tmp_path, monkeypatch):
    """README: the Prefect UI shows a progress bar while merging (the `merge-progress` artifact)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    from metamerge_prefect.flows.merge_flow import merge_flow
    from metamerge_prefect.tasks import merge as merge_task_module

    seen: list[float] = []
    real = merge_task_module.update_progress_artifact

    def recording(artifact_id, progress, **kwargs):  # passes every update through to the real API
        seen.append(progress)
        return real(artifact_id, progress=progress, **kwargs)

    monkeypatch.setattr(merge_task_module, "update_progress_artifact", recording)
    base_dir, ft_dirs, _, _ = random_family(tmp_path / "models", layers=8)
    recipe = _recipe(tmp_path, str(base_dir), [(f"ft{i}", str(d)) for i, d in enumerate(ft_dirs)])
    state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                          artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["merge-progress"])))
    assert len(artifacts) == 1 and artifacts[0].type == "progress"
    assert float(artifacts[0].data) == 100.0
    # it moved while the merge ran: several increasing steps of at least 5 %, ending at 100
    assert len(seen) >= 5 and seen[-1] == 100.0, seen
    steps = [b - a for a, b in zip([0.0, *seen], seen, strict=False)]
    assert all(step > 0 for step in steps) and all(step >= 5 for step in steps[:-1]), seen


def _fingerprint(folder: Path) -> str:
    """The merged model's content fingerprint, written out here: sha256 over (name, size, sha256) per file
    (hidden bookkeeping files excluded)."""
    outer = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = file.relative_to(folder).as_posix()
        outer.update(f"{rel}\0{file.stat().st_size}\0{hashlib.sha256(file.read_bytes()).hexdigest()}\n".encode())
    return outer.hexdigest()


def test_run_id_is_the_utc_date_and_the_merged_fingerprint(tmp_path, monkeypatch, request):
    """README: run ids are `<UTC date>-<merged fingerprint>`, so a same-day re-run resumes the same prefix."""
    from metamerge_prefect.flows.merge_flow import merge_flow

    # a local time zone whose date is never the UTC date right now, so a local date would show
    zone = "Etc/GMT+12" if datetime.now(UTC).hour < 12 else "Etc/GMT-14"
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    request.addfinalizer(time.tzset)  # runs after monkeypatch has put TZ back
    assert time.strftime("%Y%m%d") != datetime.now(UTC).strftime("%Y%m%d")

    target = tmp_path / "published"
    recipe, _ = _family_recipe(tmp_path, publish={"target": str(target)})
    days = {datetime.now(UTC).strftime("%Y%m%d")}
    first = merge_flow(recipe, return_state=True)
    days.add(datetime.now(UTC).strftime("%Y%m%d"))
    assert first.is_completed(), first.message
    result = first.result()
    run_id = result["run_id"]
    assert re.fullmatch(r"\d{8}-[0-9a-f]{12}", run_id), run_id
    assert run_id in {f"{day}-{_fingerprint(Path(result['merged_path']))[:12]}" for day in days}
    assert json.loads((target / "small" / run_id / "manifest.json").read_text())["run_id"] == run_id
    assert json.loads((target / "small" / "latest.json").read_text())["run_id"] == run_id

    again = merge_flow(recipe, return_state=True).result()
    assert again["run_id"] == run_id or run_id[:8] not in days  # unless midnight (UTC) fell in between
    assert sorted(p.name for p in (target / "small").iterdir() if p.is_dir()) == [run_id]


# --- remote refs through the flow ------------------------------------------------------------------------


def _hf_repo(cache: Path, repo_id: str, snapshots: dict[str, Path], main: str) -> None:
    """huggingface_hub's cache layout, as a download leaves it: refs/main -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)
    for commit, source in snapshots.items():
        shutil.copytree(source, repo / "snapshots" / commit)


def test_hf_refs_pinned_to_a_commit_go_through_the_flow(tmp_path, monkeypatch):
    """README: `hf://org/name@revision` through huggingface_hub's cache (offline here); a commit sha pins the weights."""
    import huggingface_hub.constants as constants

    from metamerge_prefect.flows.merge_flow import merge_flow

    base_dir, ft_dirs, base, fts = random_family(tmp_path / "v1", n_finetunes=2)
    _, newer_dirs, _, newer = random_family(tmp_path / "v2", n_finetunes=2, seed=5)
    pinned, head = "a1" * 20, "b2" * 20
    cache = tmp_path / "hf-cache"
    _hf_repo(cache, "acme/tiny-base", {head: base_dir}, main=head)
    # main moved on to a newer fine-tune; the recipe pins the older commit
    _hf_repo(cache, "acme/tiny-ft", {pinned: ft_dirs[0], head: newer_dirs[0]}, main=head)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    ref = f"hf://acme/tiny-ft@{pinned}"
    recipe = _recipe(tmp_path, "hf://acme/tiny-base", [("pinned", ref), ("local", str(ft_dirs[1]))],
                     method={"name": "average"}, publish={"target": str(tmp_path / "published")})
    state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    merged = _tensors(result["merged_path"])
    for name, value in base.items():
        if value.is_floating_point():  # θ₀ + ½(τ_pinned + τ_local): the pinned commit's weights, not main's
            want = value + 0.5 * ((fts[0][name] - value) + (fts[1][name] - value))
            torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fts[0]["lm_head.weight"], newer[0]["lm_head.weight"])
    runs = {run.name: run for run in task_runs(state.state_details.flow_run_id, expect=expected_task_names(recipe))}
    assert runs[f"resolve {ref}"].state.is_completed() and runs["resolve hf://acme/tiny-base"].state.is_completed()
    manifest = json.loads(Path(result["published"]["manifest_uri"]).read_text())
    assert manifest["inputs"] == {"base": "hf://acme/tiny-base", "finetunes": [ref, str(ft_dirs[1])]}
    assert f"| fine-tune pinned | `{ref}` |" in (Path(result["published"]["run_uri"]) / "report.md").read_text()


def test_s3_refs_and_publishing_use_aws_endpoint_url_when_the_recipe_names_none(tmp_path, s3_endpoint, bucket,
                                                                                 monkeypatch):
    """README: the endpoint comes from `endpoint_url` in the recipe, else from AWS_ENDPOINT_URL."""
    from metamerge_prefect.flows.merge_flow import merge_flow

    base_dir, ft_dirs, base, fts = random_family(tmp_path / "models", n_finetunes=2)
    client = s3_client(s3_endpoint)
    for f in ft_dirs[1].iterdir():
        client.upload_file(str(f), bucket, f"registry/ft1/{f.name}")
    ref = f"s3://{bucket}/registry/ft1"
    with FaultProxy(s3_endpoint) as proxy:  # counts what reached S3 through the variable's endpoint
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        recipe = _recipe(tmp_path, str(base_dir), [("ft0", str(ft_dirs[0])), ("ft1", ref)],
                         publish={"target": f"s3://{bucket}/merges"})
        assert "endpoint_url" not in recipe
        state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert any(method == "GET" and path.startswith(f"/{bucket}/registry/ft1/") for method, path in proxy.log)
    assert any(method == "PUT" and path.endswith("/manifest.json") for method, path in proxy.log)
    downloaded = Path(recipe["workdir"]) / "remote"
    assert [p.name for p in downloaded.iterdir() if not p.name.startswith(".")], "the s3:// ref was downloaded"
    manifest = latest_manifest(f"s3://{bucket}/merges", "small", s3_endpoint)
    assert manifest["run_id"] == result["run_id"] and manifest["inputs"]["finetunes"] == [str(ft_dirs[0]), ref]
