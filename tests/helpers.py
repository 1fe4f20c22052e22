"""Builders of small random checkpoints for unit tests (the zoo is for end-to-end tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Saves tensors like transformers does: one file, or several plus an index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k].contiguous() for k in part}, str(folder / fname))
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    return folder


def random_family(root: Path, n_finetunes: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0,
                  layers: int = 2, scale: list[float] | None = None,
                  shared: float = 0.0, hidden: int = 12) -> tuple[Path, list[Path], dict, list[dict]]:
    """A base and fine-tunes with Llama-like names, odd shapes and an integer buffer.

    `hidden` sets the width (12: about 3 KB per tensor; 600: q_proj alone is 1.4 MB, for 1 MB shards).

    `shared` > 0 adds one common direction (that multiple of each fine-tune's own noise scale)
    to every task vector, so their cosines are far from 0 (and differ from pair to pair).
    """
    gen = torch.Generator().manual_seed(seed)
    h = hidden
    base = {"model.embed_tokens.weight": torch.randn(37, h, generator=gen)}
    for layer in range(layers):
        base[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(h, h, generator=gen)
        base[f"model.layers.{layer}.mlp.up_proj.weight"] = torch.randn(19, h, generator=gen)
        base[f"model.layers.{layer}.input_layernorm.weight"] = torch.randn(h, generator=gen)
    base["model.norm.weight"] = torch.randn(h, generator=gen)
    base["lm_head.weight"] = torch.randn(37, h, generator=gen)
    base["model.position_ids"] = torch.arange(7, dtype=torch.int64)
    base = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in base.items()}
    base_dir = write_checkpoint(root / "base", base)
    common = ({k: torch.randn(v.shape, generator=gen) for k, v in base.items() if v.is_floating_point()}
              if shared else {})
    fts, ft_dirs = [], []
    for t in range(n_finetunes):
        s = (scale or [0.1 * (t + 1)] * n_finetunes)[t]
        ft = {}
        for k, v in base.items():
            if v.is_floating_point():
                # per-layer magnitudes differ so granularity variants give different λ
                layer_boost = 1.0 + (t + 1) * (k.count("layers.1") * 2.0)
                delta = torch.randn(v.shape, generator=gen)
                if shared:
                    delta = delta + shared * (t + 1) * common[k]
                ft[k] = (v.float() + s * layer_boost * delta).to(dtype)
            else:
                ft[k] = v.clone()
        fts.append(ft)
        ft_dirs.append(write_checkpoint(root / f"ft{t}", ft, shards=2 if t == 0 else 1))
    return base_dir, ft_dirs, base, fts


TIES_LABELS = ["ft0", "ft1", "ft2"]


def ties_family(root: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """Two q_proj tensors of 300×300 (above SELECT_MIN: the blocked TIES path), the rest small;
    the base folder and (label, folder) of three fine-tunes."""
    base_dir, ft_dirs, _, _ = random_family(root, n_finetunes=3, hidden=300)
    return base_dir, list(zip(TIES_LABELS, ft_dirs, strict=True))


def ties_plan():
    """TIES at density 0.2 with the disjoint mean, as the TIES tests merge."""
    from metamerge.methods.plan import MergePlan

    return MergePlan(sparsify="magnitude", density=0.2, consensus="ties", weighting="constant", normalize=True)


def safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}
