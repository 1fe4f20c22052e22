"""Checks that a fine-tune really is a fine-tune of the base, tensor by tensor, before any math.

A task vector θ_t − θ₀ only means something when both checkpoints have the same tensors with
the same shapes. The one tolerated difference is extra vocabulary rows (added tokens) in
embedding / lm_head tensors, which `vocab: base` drops, as common merge tools do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from metamerge.engine.checkpoint import CheckpointReader
from metamerge.errors import CheckpointError

VOCAB_NAME_HINTS = ("embed", "lm_head", "wte", "output.weight")


@dataclass(frozen=True)
class Alignment:
    """How to read a fine-tune so that its tensors line up with the base's."""

    label: str
    keep_rows: dict[str, int] = field(default_factory=dict)
    dropped_rows: dict[str, int] = field(default_factory=dict)  # rows left out per tensor (vocab: base)


def is_vocab_tensor(name: str) -> bool:
    return any(hint in name for hint in VOCAB_NAME_HINTS)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def align(base: CheckpointReader, finetune: CheckpointReader, vocab: str = "base") -> Alignment:
    """Raises one clear CheckpointError naming the first incompatibility found."""
    label = finetune.label
    base_names, ft_names = set(base.names), set(finetune.names)
    missing = [n for n in base.names if n not in ft_names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"fine-tune {label!r} is missing tensor {missing[0]!r}{more} present in the base")
    extra = sorted(ft_names - base_names)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"fine-tune {label!r} has tensor {extra[0]!r}{more} that the base lacks")
    keep_rows: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for name in base.names:
        b, f = base.info(name), finetune.info(name)
        if b.is_float != f.is_float or (not b.is_float and b.dtype != f.dtype):
            raise CheckpointError(f"fine-tune {label!r}: tensor {name!r} has dtype {f.dtype}, base has {b.dtype}")
        if b.shape == f.shape:
            continue
        grew_vocab = (
            is_vocab_tensor(name) and len(b.shape) == len(f.shape) and len(b.shape) >= 1
            and b.shape[1:] == f.shape[1:] and f.shape[0] > b.shape[0]
        )
        if grew_vocab and vocab == "base":
            keep_rows[name] = b.shape[0]
            dropped[name] = f.shape[0] - b.shape[0]
            continue
        raise CheckpointError(
            f"fine-tune {label!r}: tensor {name!r} has shape {_shape_text(f.shape)}, "
            f"base has {_shape_text(b.shape)}"
        )
    return Alignment(label=label, keep_rows=keep_rows, dropped_rows=dropped)


def aligned_rows(alignment: Alignment, name: str, rows: tuple[int, int] | None) -> tuple[int, int] | None:
    """Rows to read from the fine-tune so that it lines up with the base's rows."""
    keep = alignment.keep_rows.get(name)
    return (0, keep) if rows is None and keep is not None else rows


def tied_aliases(base: CheckpointReader) -> dict[str, str]:
    """Vocabulary tensors stored twice but equal in the base (tied embeddings) -> one name.

    Random sparsification (DARE) draws its mask from the tensor's name; giving tied tensors
    one name gives them one mask, so tied embeddings stay tied after the merge. Decided on the
    base alone so that extraction and merge, which see different inputs, always agree.
    """
    candidates = [n for n in base.names if is_vocab_tensor(n) and base.info(n).is_float]
    aliases: dict[str, str] = {}
    for i, first in enumerate(candidates):
        for second in candidates[i + 1 :]:
            a, b = base.info(first), base.info(second)
            if second in aliases or (a.dtype, a.shape) != (b.dtype, b.shape):
                continue
            if torch.equal(base.read(first), base.read(second)):
                aliases[second] = first
    return aliases
