"""What every ref scheme resolves to: a local folder plus a fingerprint of its content."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class ResolvedModel:
    ref: str
    path: Path
    fingerprint: str
