"""hf://org/name@revision through huggingface_hub's own cache; the commit sha is the print."""

from __future__ import annotations

import os
from pathlib import Path

from metamerge.errors import RefError, TransientError
from metamerge.refs.resolved import CHECKPOINT_SUFFIXES, ResolvedModel

HF_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def resolve_hf(ref: str, cache_dir: Path | None = None) -> ResolvedModel:
    """hf://org/name@revision through huggingface_hub's own cache; the commit sha is the print.

    With HF_HUB_OFFLINE=1 (tests, air-gapped clusters) only the local cache is consulted.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    spec = ref.removeprefix("hf://")
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1:
        raise RefError(f"model ref {ref!r}: expected hf://org/name[@revision]")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        path = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HF_PATTERNS,
                                      local_files_only=offline))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise RefError(f"model ref {ref!r}: not in the local Hugging Face cache and offline mode is on") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise RefError(f"model ref {ref!r}: {type(exc).__name__}") from None
    except OSError as exc:
        raise TransientError(f"model ref {ref!r}: download failed ({exc})") from exc
    if not any(p.suffix in CHECKPOINT_SUFFIXES for p in path.iterdir()):
        raise RefError(f"model ref {ref!r}: snapshot has no .safetensors files")
    return ResolvedModel(ref=ref, path=path, fingerprint=f"hf-{repo_id.replace('/', '--')}-{path.name}")


def resolve(ref: str, cache_dir: Path | None = None, endpoint_url: str | None = None) -> ResolvedModel:
    """The scheme table's entry: huggingface_hub keeps its own cache."""
    return resolve_hf(ref, cache_dir)
