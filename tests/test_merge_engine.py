"""The streaming engine against an independent dense computation of θ₀ + Σ λ_t τ_t."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from metamerge.engine.checkpoint import CheckpointReader
from metamerge.engine.coefficients import solve_constant, solve_metagpt
from metamerge.engine.merge import merge_checkpoints
from metamerge.engine.taskvectors import extract_stats
from metamerge.errors import CheckpointError, OutputError
from metamerge.methods.plan import MergePlan
from tests.helpers import random_family, write_checkpoint

LABELS = ["ft0", "ft1", "ft2"]


def _read_all(folder):
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def _metagpt_reference(base, fts):
    """numpy, float64: λ from whole-model norms, then θ₀ + Σ λ τ."""
    floats = [k for k, v in base.items() if v.is_floating_point()]
    taus = [{k: ft[k].double().numpy() - base[k].double().numpy() for k in floats} for ft in fts]
    norms = np.array([sum(float(np.sum(t[k] ** 2)) for k in floats) for t in taus])
    lam = norms / norms.sum()
    merged = {k: base[k].double().numpy() + sum(lam[i] * taus[i][k] for i in range(len(fts))) for k in floats}
    return lam, merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_metagpt_merge_files_equal_dense_reference(tmp_path, dtype):
    # a shared direction makes the task vectors' cosines 0.3-0.6, different for every pair
    base_dir, ft_dirs, base, fts = random_family(tmp_path, dtype=dtype, shared=0.5)
    stats = [extract_stats(base_dir, d, label) for d, label in zip(ft_dirs, LABELS, strict=True)]
    coefficients = solve_metagpt(LABELS, {s.label: s.sq_norms for s in stats}, "model")
    out = tmp_path / "merged"
    report = merge_checkpoints(base_dir, list(zip(LABELS, ft_dirs, strict=True)), coefficients, MergePlan(), out,
                               device="cpu", shard_size_mb=1)
    lam, want = _metagpt_reference(base, fts)
    np.testing.assert_allclose(list(coefficients.model_level().values()), lam, rtol=1e-6)
    got = _read_all(out)
    assert set(got) == set(base)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    for k, v in want.items():
        assert got[k].dtype == dtype
        np.testing.assert_allclose(got[k].double().numpy(), v, **tol, err_msg=k)
    assert torch.equal(got["model.position_ids"], base["model.position_ids"])
    assert (out / "config.json").exists()
    assert report.copied_tensors == 1 and report.merged_tensors == len(base) - 1
    # the whole gram ⟨τ_i, τ_j⟩ and every cosine τ_i·τ_j / (‖τ_i‖ ‖τ_j‖), computed independently here
    floats = [k for k in base if base[k].is_floating_point()]
    taus = [np.concatenate([(ft[k].double() - base[k].double()).numpy().ravel() for k in floats]) for ft in fts]
    gram = np.array([[float(a @ b) for b in taus] for a in taus])
    want_cos = gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    np.testing.assert_allclose(np.array(report.gram), gram, rtol=1e-4)
    np.testing.assert_allclose(np.array(report.cosine()), want_cos, atol=1e-4)
    off_diagonal = want_cos[~np.eye(3, dtype=bool)]
    assert off_diagonal.min() > 0.2 and np.ptp(off_diagonal) > 0.1  # the check can tell the pairs apart


def test_task_arithmetic_and_output_dtype(tmp_path):
    base_dir, ft_dirs, base, fts = random_family(tmp_path)
    out = tmp_path / "m"
    merge_checkpoints(base_dir, list(zip(LABELS, ft_dirs, strict=True)), solve_constant(LABELS, 0.3, "task_arithmetic"),
                      MergePlan(weighting="constant", weight=0.3), out, device="cpu", dtype="bfloat16")
    got = _read_all(out)
    for k, v in base.items():
        if v.is_floating_point():
            want = v.double() + 0.3 * sum(ft[k].double() - v.double() for ft in fts)
            assert got[k].dtype == torch.bfloat16
            torch.testing.assert_close(got[k].double(), want, rtol=1e-2, atol=2e-2)
    assert '"bfloat16"' in (out / "config.json").read_text()


def test_shape_mismatch_fails_clearly_and_leaves_nothing(tmp_path):
    base_dir, ft_dirs, base, fts = random_family(tmp_path)
    bad = dict(fts[1])
    bad["model.layers.0.mlp.up_proj.weight"] = torch.randn(20, 12)
    write_checkpoint(tmp_path / "bad", bad)
    out = tmp_path / "merged"
    with pytest.raises(CheckpointError) as info:
        merge_checkpoints(base_dir, [("ft0", ft_dirs[0]), ("bad", tmp_path / "bad")],
                          solve_constant(["ft0", "bad"], 0.5, "average"), MergePlan(weighting="uniform"), out, device="cpu")
    assert str(info.value) == ("fine-tune 'bad': tensor 'model.layers.0.mlp.up_proj.weight' has shape [20, 12], "
                               "base has [19, 12]")
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_missing_tensor_is_named(tmp_path):
    base_dir, ft_dirs, base, fts = random_family(tmp_path)
    bad = {k: v for k, v in fts[0].items() if k != "model.norm.weight"}
    write_checkpoint(tmp_path / "bad", bad)
    with pytest.raises(CheckpointError, match="fine-tune 'bad' is missing tensor 'model.norm.weight'"):
        extract_stats(base_dir, tmp_path / "bad", "bad")


def _write_with_nan(folder, tensors: dict, name: str, index: tuple[int, int]) -> None:
    """A copy of `tensors` with one NaN in `name`, written as a checkpoint at `folder`."""
    bad = dict(tensors)
    bad[name] = bad[name].clone()
    bad[name][index] = float("nan")
    write_checkpoint(folder, bad)


def test_nan_in_finetune_fails_in_extraction_and_merge(tmp_path):
    base_dir, ft_dirs, base, fts = random_family(tmp_path)
    _write_with_nan(tmp_path / "bad", fts[0], "model.layers.1.self_attn.q_proj.weight", (3, 4))
    with pytest.raises(CheckpointError, match="'model.layers.1.self_attn.q_proj.weight' contains NaN or Inf"):
        extract_stats(base_dir, tmp_path / "bad", "bad")
    out = tmp_path / "merged"
    with pytest.raises(CheckpointError, match="contains NaN or Inf"):
        merge_checkpoints(base_dir, [("bad", tmp_path / "bad"), ("ft1", ft_dirs[1])],
                          solve_constant(["bad", "ft1"], 0.5, "average"), MergePlan(weighting="uniform"), out, device="cpu")
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_extra_vocab_rows_are_dropped_with_vocab_base(tmp_path):
    base_dir, ft_dirs, base, fts = random_family(tmp_path, n_finetunes=2)
    grown = dict(fts[1])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[name] = torch.cat([fts[1][name], torch.randn(5, 12)])
    write_checkpoint(tmp_path / "grown", grown)
    out = tmp_path / "merged"
    merge_checkpoints(base_dir, [("ft0", ft_dirs[0]), ("grown", tmp_path / "grown")],
                      solve_constant(["ft0", "grown"], 0.5, "average"), MergePlan(weighting="uniform"), out, device="cpu")
    got = CheckpointReader(out)
    assert got.info("lm_head.weight").shape == (37, 12)
    want = base["lm_head.weight"] + 0.5 * ((fts[0]["lm_head.weight"] - base["lm_head.weight"])
                                           + (fts[1]["lm_head.weight"] - base["lm_head.weight"]))
    torch.testing.assert_close(got.read("lm_head.weight"), want)


def _folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_existing_output_is_replaced_atomically(tmp_path):
    base_dir, ft_dirs, base, fts = random_family(tmp_path, n_finetunes=2)
    out = tmp_path / "merged"
    average = solve_constant(["ft0", "ft1"], 0.5, "average")
    merge_checkpoints(base_dir, [("ft0", ft_dirs[0]), ("ft1", ft_dirs[1])], average,
                      MergePlan(weighting="uniform"), out, device="cpu")
    assert (out / "model.safetensors.index.json").exists()
    good = _folder_bytes(out)

    # a merge that fails half-way (NaN in a late tensor) over that output leaves it as it was
    _write_with_nan(tmp_path / "bad", fts[1], "lm_head.weight", (5, 5))
    with pytest.raises(CheckpointError, match="'lm_head.weight' contains NaN or Inf"):
        merge_checkpoints(base_dir, [("ft0", ft_dirs[0]), ("ft1", tmp_path / "bad")], average,
                          MergePlan(weighting="uniform"), out, device="cpu", existing="replace")
    assert _folder_bytes(out) == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == []


def test_only_an_earlier_metamerge_output_is_ever_replaced(tmp_path):
    """Issue 13 #1: a folder metamerge did not write is never touched; its own output only when asked."""
    from metamerge.io.outputs import OUTPUT_MARKER

    base_dir, ft_dirs, *_ = random_family(tmp_path, n_finetunes=2)
    args = ([("ft0", ft_dirs[0]), ("ft1", ft_dirs[1])], solve_constant(["ft0", "ft1"], 0.5, "average"),
            MergePlan(weighting="uniform"))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    for existing in ("refuse", "replace", "keep"):
        with pytest.raises(OutputError, match="was not written by metamerge"):
            merge_checkpoints(base_dir, *args, out, device="cpu", existing=existing)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "a user's file"
    assert not list(tmp_path.glob(".merged*"))

    (out / "mine.txt").unlink()  # an empty folder may receive the merge
    merge_checkpoints(base_dir, *args, out, device="cpu")
    assert (out / "model.safetensors.index.json").exists() and (out / OUTPUT_MARKER).exists()
    with pytest.raises(OutputError, match="holds an earlier metamerge output; pass --replace"):
        merge_checkpoints(base_dir, *args, out, device="cpu")
    merge_checkpoints(base_dir, *args, out, device="cpu", existing="replace")  # its own output, when asked
    assert (out / "model.safetensors.index.json").exists()
    (out / "notes.txt").write_text("added by a user")  # a user's file inside an old output: refused again
    with pytest.raises(OutputError, match="was not written by metamerge"):
        merge_checkpoints(base_dir, *args, out, device="cpu", existing="replace")
    assert (out / "notes.txt").exists()

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        merge_checkpoints(base_dir, *args, a_file, device="cpu", existing="replace")
    assert a_file.read_text() == "x" and not list(tmp_path.glob(".a-file*"))


def test_smaller_vocab_in_a_finetune_is_a_clear_error(tmp_path):
    base_dir, ft_dirs, base, fts = random_family(tmp_path, n_finetunes=2)
    shrunk = dict(fts[1])
    shrunk["model.embed_tokens.weight"] = fts[1]["model.embed_tokens.weight"][:30]
    write_checkpoint(tmp_path / "shrunk", shrunk)
    out = tmp_path / "merged"
    with pytest.raises(CheckpointError, match=r"tensor 'model.embed_tokens.weight' has shape \[30, 12\], base has \[37, 12\]"):
        merge_checkpoints(base_dir, [("ft0", ft_dirs[0]), ("shrunk", tmp_path / "shrunk")],
                          solve_constant(["ft0", "shrunk"], 0.5, "average"), MergePlan(weighting="uniform"), out,
                          device="cpu")
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


@pytest.mark.parametrize("plan", [
    MergePlan(weighting="constant", weight=0.3),
    MergePlan(sparsify="magnitude", density=0.2, consensus="ties", weighting="constant", normalize=True),
    MergePlan(sparsify="random", density=0.5, seed=3, weighting="constant", weight=0.3),
])
def test_unchanged_and_tied_tensors(tmp_path, plan):
    """A tensor equal in all inputs comes out bit-identical; tied embeddings stay tied."""
    gen = torch.Generator().manual_seed(1)
    base = {"model.embed_tokens.weight": torch.randn(9, 4, generator=gen).to(torch.bfloat16),
            "model.norm.weight": torch.randn(4, generator=gen).to(torch.bfloat16),
            "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=gen).to(torch.bfloat16)}
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    write_checkpoint(tmp_path / "base", base)
    fts = []
    for t in range(2):
        ft = {k: v.clone() for k, v in base.items()}
        emb = (base["model.embed_tokens.weight"].float() + 0.1 * torch.randn(9, 4, generator=gen)).to(torch.bfloat16)
        ft["model.embed_tokens.weight"], ft["lm_head.weight"] = emb, emb.clone()
        ft["model.layers.0.mlp.up_proj.weight"] = (base["model.layers.0.mlp.up_proj.weight"].float()
                                                   + 0.1 * torch.randn(6, 4, generator=gen)).to(torch.bfloat16)
        write_checkpoint(tmp_path / f"ft{t}", ft)
        fts.append(ft)
    out = tmp_path / "merged"
    merge_checkpoints(tmp_path / "base", [("ft0", tmp_path / "ft0"), ("ft1", tmp_path / "ft1")],
                      solve_constant(["ft0", "ft1"], plan.weight, "m"), plan, out, device="cpu")
    got = _read_all(out)
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], got["lm_head.weight"])
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
