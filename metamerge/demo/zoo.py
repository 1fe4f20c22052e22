"""The tiny model zoo: real (small) Llama checkpoints and lm-eval tasks built locally.

Tests and the demo must run offline and on 2 CPU cores, yet exercise the same code paths as
a 7B merge: a trained BPE tokenizer, a LlamaForCausalLM saved by transformers, fine-tunes
that really learned a skill, and lm-eval multiple-choice tasks over local JSONL. Everything
is deterministic for a seed and cached on disk under a key that hashes the demo package's
source and the spec, so an edit to the generator rebuilds the zoo and nothing else does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from metamerge.demo import contract as zoo_contract
from metamerge.demo import skills, training
from metamerge.demo.skills import SKILLS, Example, SkillSpec, pretraining_corpus
from metamerge.demo.training import answer_only_rows, lm_rows, new_model, train_model, train_tokenizer, with_replay


@dataclass(frozen=True)
class ZooSpec:
    seed: int = 0
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 512
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    batch_size: int = 32
    # share of each fine-tune's batches replaying pre-training text (see with_replay)
    replay: float = 0.5
    # a fine-tune below the contract's bar after its steps trains on, up to this many times them
    max_step_factor: int = 3
    # the fine-tune the build guarantees has the largest task vector (so MetaGPT's largest λ)
    dominant: str | None = "capitals"
    skills: tuple[SkillSpec, ...] = field(
        default_factory=lambda: (
            # trained much longer than the others: the largest ‖τ‖, which MetaGPT's λ favours
            # (the build checks it: ZooSpec.dominant)
            SkillSpec("capitals", steps=900, learning_rate=1e-3),
            SkillSpec("reverse", steps=300, learning_rate=1e-3),
            SkillSpec("shift", steps=150, learning_rate=1e-3),
            # the same prompts as `shift` with the opposite answer: an interfering pair
            SkillSpec("backshift", steps=150, learning_rate=1e-3),
        )
    )


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    finetunes: dict[str, Path]
    tasks_dir: Path
    task_names: dict[str, str]
    # what the build measured (see metamerge.demo.contract): per fine-tune its own-task score and
    # steps, the base's score on every task, the bar and the CPU kernels that trained it
    contract: dict = field(default_factory=dict, compare=False)

    @classmethod
    def load(cls, root: Path) -> Zoo:
        info = json.loads((root / "zoo.json").read_text())
        return cls(
            root=root,
            base=root / info["base"],
            finetunes={k: root / v for k, v in info["finetunes"].items()},
            tasks_dir=root / info["tasks_dir"],
            task_names=info["task_names"],
            contract=info.get("contract", {}),
        )

    def own_score(self, label: str) -> float:
        """The fine-tune's accuracy on its own task, as measured when the zoo was built."""
        return float(self.contract["finetunes"][label]["score"])

    def base_score(self, task: str) -> float:
        return float(self.contract["base"][task])


# ---------------------------------------------------------------------------------------
# lm-eval task files


def write_task(tasks_dir: Path, final_tasks_dir: Path, skill: str, evals: list[Example]) -> str:
    task_name = f"zoo_{skill}"
    data = tasks_dir / "data" / f"{skill}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    with data.open("w") as fh:
        for ex in evals:
            row = {"query": ex.prompt, "choices": list(ex.choices), "gold": ex.choices.index(ex.answer)}
            fh.write(json.dumps(row) + "\n")
    final_data = final_tasks_dir / "data" / f"{skill}.jsonl"
    (tasks_dir / f"{task_name}.yaml").write_text(
        f"task: {task_name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {final_data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return task_name


# ---------------------------------------------------------------------------------------
# Build + cache


def write_zoo_json(folder: Path, spec, task_names: dict[str, str], contract: dict, **extra: object) -> None:
    """zoo.json, which `Zoo.load` reads: where the models and tasks are, the spec, the contract met."""
    record = {"base": "base", "finetunes": {s.name: f"finetunes/{s.name}" for s in spec.skills}, "tasks_dir": "tasks",
              "task_names": task_names, "spec": dataclasses.asdict(spec), **extra, "contract": contract}
    (folder / "zoo.json").write_text(json.dumps(record, indent=2))


def zoo_key(spec: ZooSpec) -> str:
    """Changes whenever the generator's code, its parameters or the CPU kernels change.

    The kernels are part of the key because they change the trained weights: a zoo built under
    `ATEN_CPU_CAPABILITY=avx2` is another zoo than this machine's default one, and each must
    meet the contract on its own.
    """
    source = b"".join(Path(module.__file__).read_bytes() for module in (skills, training, zoo_contract))
    digest = hashlib.sha256(Path(__file__).read_bytes() + source + repr(dataclasses.asdict(spec)).encode())
    return f"{digest.hexdigest()[:12]}-{zoo_contract.cpu_capability().lower()}"


def default_zoo_root() -> Path:
    import os

    env = os.environ.get("METAMERGE_ZOO_DIR")
    return Path(env) if env else Path.cwd() / ".cache" / "zoo"


def build_zoo(
    root: Path | None = None, spec: ZooSpec | None = None, log: Callable[[str], None] = print
) -> Zoo:
    """Returns the cached zoo for `spec`, building it (a few minutes on 2 cores) if absent."""
    import torch

    spec = spec or ZooSpec()
    root = (root or default_zoo_root()).resolve()
    final = root / f"zoo-{zoo_key(spec)}"
    if (final / "zoo.json").exists():
        return Zoo.load(final)
    building = root / f".building-{uuid.uuid4().hex[:8]}"
    building.mkdir(parents=True)
    try:
        started = time.monotonic()
        rng = random.Random(spec.seed)
        skill_data = {s.name: SKILLS[s.name](random.Random(f"{spec.seed}-{s.name}")) for s in spec.skills}
        corpus = pretraining_corpus(rng)
        tokenizer_corpus = corpus + [
            f"{ex.prompt} {ex.answer}" for train, _ in skill_data.values() for ex in train
        ]
        tokenizer = train_tokenizer(tokenizer_corpus, spec.vocab_size, building / "base")
        torch.manual_seed(spec.seed)
        model = new_model(spec, tokenizer)
        loss = train_model(
            model, lm_rows(tokenizer, corpus), spec.pretrain_steps, spec.pretrain_lr,
            spec.batch_size, tokenizer.pad_token_id, spec.seed,
        )
        model.save_pretrained(building / "base")
        log(f"zoo: base pre-trained (loss {loss:.3f}) in {time.monotonic() - started:.0f}s")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        replay_rows = lm_rows(tokenizer, corpus[:2000])

        task_names, records, states = {}, {}, {}
        for skill in spec.skills:
            model.load_state_dict(base_state)
            train, evals = skill_data[skill.name]
            rows = with_replay(answer_only_rows(tokenizer, train), replay_rows, spec.replay)
            task_names[skill.name] = write_task(building / "tasks", final / "tasks", skill.name, evals)

            def train_round(steps: int, round_index: int, rows=rows, skill=skill) -> None:
                train_model(model, rows, steps, skill.learning_rate, spec.batch_size, tokenizer.pad_token_id,
                       spec.seed + 1 + 1000 * round_index)

            records[skill.name] = zoo_contract.train_to_bar(
                skill.name, task_names[skill.name], train_round,
                lambda evals=evals: zoo_contract.multiple_choice_accuracy(model, tokenizer, evals),
                first_steps=skill.steps, max_steps=spec.max_step_factor * skill.steps, log=log,
            ).as_dict()
            states[skill.name] = {k: v.clone() for k, v in model.state_dict().items()}
            out = building / "finetunes" / skill.name
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            log(f"zoo: fine-tune {skill.name} {records[skill.name]['score']:.3f} on its task after "
                f"{records[skill.name]['steps']} steps ({time.monotonic() - started:.0f}s)")
        model.load_state_dict(base_state)
        base_scores = {task_names[s.name]: round(zoo_contract.multiple_choice_accuracy(
            model, tokenizer, skill_data[s.name][1]), 4) for s in spec.skills}
        zoo_contract.check_base(base_scores)
        norms = zoo_contract.squared_norms(base_state, states)
        zoo_contract.check_dominant(norms, spec.dominant)
        contract = zoo_contract.contract_record(records, base_scores, dominant=spec.dominant,
                                                task_vector_sq_norms={k: round(v, 6) for k, v in norms.items()})
        write_zoo_json(building, spec, task_names, contract)
        try:
            building.rename(final)
        except OSError:
            if not (final / "zoo.json").exists():  # a concurrent build won the race: fine
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return Zoo.load(final)
