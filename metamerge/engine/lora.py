"""PEFT LoRA adapters as fine-tunes: τ = s·B·A per target module, never the whole model at once.

An adapter folder (adapter_config.json + adapter_model.safetensors) is read as a virtual
checkpoint with the base's names, shapes and dtypes: a tensor the adapter targets is
θ₀ + s·B·A (materialized for that tensor or row range only), a `modules_to_save` tensor or a
trained bias is the adapter's full tensor, and every other tensor is the base's. So every merge
method, TIES and DARE included, acts on exactly what `merge_and_unload()` would have produced,
while MetaGPT's statistic ‖s·B·A‖²_F = s²·tr((BᵀB)(AAᵀ)) needs only r×r products.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from metamerge.engine.checkpoint import CheckpointReader, TensorInfo
from metamerge.engine.remote import ModelSource, open_checkpoint
from metamerge.errors import CheckpointError
from metamerge.io.remote_model import RemoteModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$|^(?P<emb>.+)\.(?P<epart>lora_embedding_[AB])$")
# adapter options that change what a merged weight is; each gets one clear line instead of a wrong merge
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "lora_bias (a bias on B)", "use_qalora": "QA-LoRA",
                "use_bdlora": "BD-LoRA", "layer_replication": "layer_replication", "target_parameters": "target_parameters"}


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraModule:
    """One target: W (out × in) += scale · B (out × r) · A (r × in); transposed for fan_in_fan_out and embeddings."""

    a_key: str
    b_key: str
    scale: float
    transposed: bool


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the module name's end."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraAdapter:
    """The parsed adapter, checked against the base: every key maps to a base tensor of the right shape."""

    def __init__(self, folder: Path, label: str, base: CheckpointReader):
        self.folder, self.label = Path(folder), label
        self.config = self._read_config()
        weights = self.folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"fine-tune {label!r}: adapter {self.folder} has no {ADAPTER_WEIGHTS} "
                                  "(adapter_model.bin is not read: save the adapter with safetensors)")
        try:
            self._file = safe_open(str(weights), framework="pt")
            keys = list(self._file.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad header
            raise CheckpointError(f"fine-tune {label!r}: {weights} is not a readable safetensors file ({exc})") from exc
        self.modules: dict[str, LoraModule] = {}
        self.full: dict[str, str] = {}  # base tensor name -> adapter key (modules_to_save, biases)
        self._parse(keys, base)

    def _fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"fine-tune {self.label!r} (LoRA adapter {self.folder}): {message}")

    def _read_config(self) -> dict:
        try:
            config = json.loads((self.folder / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"fine-tune {self.label!r}: {self.folder / ADAPTER_CONFIG} is unreadable ({exc})") from exc
        if config.get("peft_type", "LORA") != "LORA":
            raise self._fail(f"peft_type {config.get('peft_type')!r} is not supported (LoRA only)")
        for option, name in _UNSUPPORTED.items():
            if config.get(option):
                raise self._fail(f"{name} adapters are not supported: their merged weight is not θ₀ + s·B·A")
        return config

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def _parse(self, keys: list[str], base: CheckpointReader) -> None:
        parts: dict[str, dict[str, str]] = {}
        for key in keys:
            if not key.startswith(_PREFIX):
                raise self._fail(f"unexpected tensor {key!r} (PEFT adapters prefix every key with {_PREFIX!r})")
            name = key.removeprefix(_PREFIX)
            match = _LORA_KEY.match(name)
            if match:
                module = match["module"] or match["emb"]
                part = (match["part"] or match["epart"]).replace("lora_embedding_", "emb_")
                parts.setdefault(module, {})[part] = key
            elif name.endswith(".base_layer.weight"):  # PEFT saves embedding base weights: the base's own
                target = name.replace(".base_layer.weight", ".weight")
                self._check_target(target, self._shape(key), base, "its saved base layer")
            else:  # modules_to_save tensors, and biases trained with `bias: lora_only | all` (under base_layer)
                target = name.replace(".modules_to_save.default", "").replace(".base_layer.", ".")
                self._check_target(target, self._shape(key), base, "its full tensor")
                self.full[target] = key
        alpha = float(self.config.get("lora_alpha", 8))
        rank_pattern, alpha_pattern = self.config.get("rank_pattern") or {}, self.config.get("alpha_pattern") or {}
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        for module, found in parts.items():
            embedding = "emb_A" in found or "emb_B" in found
            a_key, b_key = (found.get("emb_A"), found.get("emb_B")) if embedding else (found.get("lora_A"), found.get("lora_B"))
            if a_key is None or b_key is None:
                raise self._fail(f"module {module!r} has only one of its two LoRA matrices")
            (r, n_in), (n_out, r_b) = self._shape(a_key), self._shape(b_key)
            if r != r_b:
                raise self._fail(f"module {module!r}: lora_A has rank {r}, lora_B rank {r_b}")
            transposed = embedding or fan_in_fan_out
            target = f"{module}.weight"
            self._check_target(target, (n_in, n_out) if transposed else (n_out, n_in), base, "B·A")
            rank = _pattern_value(rank_pattern, module, self.config.get("r", r))
            module_alpha = _pattern_value(alpha_pattern, module, alpha)
            scale = module_alpha / math.sqrt(rank) if self.config.get("use_rslora") else module_alpha / rank
            self.modules[target] = LoraModule(a_key, b_key, scale, transposed)
        both = set(self.modules) & set(self.full)
        if both:
            raise self._fail(f"tensor {sorted(both)[0]!r} is both a LoRA target and saved in full")

    def _check_target(self, target: str, shape: tuple[int, ...], base: CheckpointReader, what: str) -> None:
        if target not in base:
            raise self._fail(f"target {target!r} is not in the base (an adapter of another architecture?)")
        want = tuple(base.info(target).shape)
        if shape != want:
            raise self._fail(f"shape mismatch for {target!r}: {what} is {shape}, the base's {want}")

    def _ab(self, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._file.get_tensor(module.a_key).to(torch.float32)
        b = self._file.get_tensor(module.b_key).to(torch.float32)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise self._fail(f"tensor {module.a_key.removeprefix(_PREFIX).rsplit('.', 2)[0]!r} contains NaN or Inf")
        return a, b

    def delta(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """s·B·A for rows [r0, r1) of the target (float32): only those rows are ever materialized."""
        module = self.modules[name]
        a, b = self._ab(module)
        if module.transposed:  # W = (B·A)ᵀ: rows of W are columns of A
            a_rows = a if rows is None else a[:, rows[0]:rows[1]]
            return (a_rows.T @ b.T).mul_(module.scale)
        b_rows = b if rows is None else b[rows[0]:rows[1]]
        return (b_rows @ a).mul_(module.scale)

    def sq_norm(self, name: str) -> float:
        """‖s·B·A‖²_F = s²·tr((BᵀB)(AAᵀ)) in float64: two r×r products instead of the m×n matrix."""
        module = self.modules[name]
        a, b = (t.to(torch.float64) for t in self._ab(module))
        return module.scale ** 2 * float(torch.sum((b.T @ b) * (a @ a.T)))

    def full_tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self._file.get_tensor(self.full[name])
        return tensor if rows is None else tensor[rows[0]:rows[1]]


class LoraReader:
    """A fine-tune that is base + adapter, read like a CheckpointReader (names, shapes, dtypes: the base's)."""

    def __init__(self, base_dir: ModelSource, adapter_dir: Path, label: str):
        self.base = open_checkpoint(base_dir, "base")
        self.adapter = LoraAdapter(adapter_dir, label, self.base)
        self.label = label

    @property
    def names(self) -> list[str]:
        return self.base.names

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def piece_shape(self, name: str, rows: tuple[int, int] | None = None) -> tuple[int, ...]:
        return self.base.piece_shape(name, rows)

    def read(self, name: str, pin: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """What merge_and_unload() stores for this piece: θ₀ + s·B·A in the base's dtype."""
        if name in self.adapter.full:
            return self.adapter.full_tensor(name, rows).to(self.base.info(name).dtype).contiguous()
        piece = self.base.read(name, pin=pin, rows=rows)
        if name in self.adapter.modules:
            merged = piece.to(torch.float32) + self.adapter.delta(name, rows).reshape(piece.shape)
            piece.copy_(merged.to(piece.dtype))
        return piece

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        out.copy_(self.read(name, rows=rows).reshape(out.shape))

    def read_f32_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        out.copy_(self.read(name, rows=rows).reshape(-1))
        return out

    def read_f32_onto(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None, base_f32: torch.Tensor) -> None:
        """Fills `out` with the fine-tune's piece given the base's (already read): no second base read."""
        if name in self.adapter.full:
            out.copy_(self.adapter.full_tensor(name, rows).reshape(-1))
        elif name in self.adapter.modules:
            dtype = self.base.info(name).dtype
            merged = base_f32 + self.adapter.delta(name, rows).reshape(-1)
            out.copy_(merged if dtype == torch.float32 else merged.to(dtype))  # as merge_and_unload() stores it
        else:
            out.copy_(base_f32)

    def expect(self, reads: list[tuple[str, tuple[int, int] | None]]) -> None:
        """Adapters are small and read whole; the base rows come from the merge's own base reader."""

    def close(self) -> None:
        self.base.close()


def open_finetune(base_dir: ModelSource, folder: ModelSource, label: str) -> CheckpointReader | LoraReader:
    """A fine-tune's reader: a full checkpoint (local or in S3), or base + adapter for a PEFT adapter folder."""
    if not isinstance(folder, RemoteModel) and is_adapter(folder):
        return LoraReader(base_dir, folder, label)
    return open_checkpoint(folder, label)


def _same_local_model(a: Path, b: Path) -> bool:
    """The same folder, or a copy of it: same checkpoint files, sizes, and bytes at three sampled places.

    Sampling (not a full hash) keeps the check cheap on 100 GB bases; a fine-tune of the same
    architecture has the same sizes but differs in nearly every tensor, so the samples differ.
    """
    if a.resolve() == b.resolve():
        return True

    def signature(folder: Path) -> list[tuple[str, int, bytes]]:
        found = []
        for file in sorted(folder.glob("*.safetensors")):
            size = file.stat().st_size
            with open(file, "rb") as fh:
                samples = b""
                for at in (0, size // 2, max(size - 65536, 0)):
                    fh.seek(at)
                    samples += fh.read(65536)
            found.append((file.name, size, samples))
        return found

    mine = signature(a)
    return bool(mine) and mine == signature(b)


def check_adapter_base(adapter_dir: Path, label: str, base_ref: str, base_path: Path) -> None:
    """Fails when the adapter names another base than the recipe's, where that can be told.

    A local folder named by the adapter is compared with the base folder; a hub name with an
    hf:// base. A hub name against a local or S3 base cannot be checked and passes (the shape
    checks still catch another architecture).
    """
    if not is_adapter(adapter_dir):
        return
    try:
        named = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return  # LoraAdapter reports an unreadable config with its own line
    if not named:
        return
    local = Path(named).expanduser()
    if local.is_dir() and Path(base_path).is_dir():  # a base read in place from S3 cannot be compared
        same = _same_local_model(local, Path(base_path))
    elif base_ref.startswith("hf://"):
        same = named == base_ref.removeprefix("hf://").split("@", 1)[0]
    else:
        return
    if not same:
        raise CheckpointError(f"fine-tune {label!r}: the LoRA adapter was trained on {named!r}, "
                              f"but the recipe's base is {base_ref!r}")
