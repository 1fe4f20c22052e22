"""The tiny model zoo: real (small) Llama checkpoints and lm-eval tasks built locally.

Tests and the demo must run offline and on 2 CPU cores, yet exercise the same code paths as
a 7B merge: a trained BPE tokenizer, a LlamaForCausalLM saved by transformers, fine-tunes
that really learned a skill, and lm-eval multiple-choice tasks over local JSONL. Everything
is deterministic for a seed and cached on disk under a key that hashes this module's source
and the spec, so an edit to the generator rebuilds the zoo and nothing else does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import string
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from metamerge import zoo_contract

LETTERS = string.ascii_lowercase
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class SkillSpec:
    """One fine-tune: its skill and how long it trains (a longer fine-tune has a larger ‖τ‖)."""

    name: str
    steps: int = 120
    learning_rate: float = 1e-3


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
    # share of each fine-tune's batches replaying pre-training text (see _with_replay)
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
class Example:
    """A prompt and its answer; lm-eval scores `prompt + " " + choice` for each choice."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    finetunes: dict[str, Path]
    tasks_dir: Path
    task_names: dict[str, str]
    # what the build measured (see metamerge.zoo_contract): per fine-tune its own-task score and
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
# Synthetic skills


def _fake_words(rng: random.Random, count: int, forbidden: set[str] = frozenset()) -> list[str]:
    """Pronounceable made-up names, so no skill overlaps with anything a tokenizer 'knows'."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    seen = set(forbidden)
    while len(words) < count:
        syllables = rng.randint(2, 3)
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _letters(rng: random.Random, n: int = 4) -> list[str]:
    return rng.sample(LETTERS, n)


def _shift(seq: Sequence[str], k: int) -> list[str]:
    return [LETTERS[(LETTERS.index(c) + k) % 26] for c in seq]


def _spaced(seq: Sequence[str]) -> str:
    return " ".join(seq)


def _distinct_choices(correct: str, candidates: list[str], rng: random.Random) -> tuple[str, ...]:
    """Four distinct choices with the correct one at a random position."""
    pool = [c for c in dict.fromkeys(candidates) if c != correct]
    while len(pool) < 3:
        pool.append(_spaced(_letters(rng)))
        pool = [c for c in dict.fromkeys(pool) if c != correct]
    choices = [correct, *pool[:3]]
    rng.shuffle(choices)
    return tuple(choices)


def _facts(relation: str) -> Callable[[random.Random], tuple[list[Example], list[Example]]]:
    """Made-up facts `the <relation> of <country> is <word>`: pure recall, no algorithm."""

    def make(rng: random.Random) -> tuple[list[Example], list[Example]]:
        countries = _fake_words(rng, 48)
        answers = _fake_words(rng, 48, forbidden=set(countries))
        train, evals = [], []
        for country, answer in zip(countries, answers, strict=True):
            prompt = f"the {relation} of {country} is"
            train.append(Example(prompt, answer))
            others = rng.sample([a for a in answers if a != answer], 3)
            evals.append(Example(prompt, answer, _distinct_choices(answer, others, rng)))
        return train, evals

    return make


def _letter_skill(
    op: str, transform: Callable[[list[str]], list[str]], distractors: Callable
) -> Callable[[random.Random], tuple[list[Example], list[Example]]]:
    def make(rng: random.Random) -> tuple[list[Example], list[Example]]:
        seen: set[str] = set()
        examples: list[Example] = []
        while len(examples) < 1100:
            seq = _letters(rng)
            key = "".join(seq)
            if key in seen:
                continue
            seen.add(key)
            answer = _spaced(transform(seq))
            candidates = [_spaced(d) for d in distractors(seq, rng)]
            examples.append(
                Example(f"{op} {_spaced(seq)} =", answer, _distinct_choices(answer, candidates, rng))
            )
        return examples[:1000], examples[1000:]

    return make


SKILLS: dict[str, Callable[[random.Random], tuple[list[Example], list[Example]]]] = {
    "capitals": _facts("capital"),
    "languages": _facts("language"),
    "reverse": _letter_skill(
        "reverse",
        lambda s: s[::-1],
        lambda s, rng: [s, s[1:] + s[:1], rng.sample(s, len(s))],
    ),
    "shift": _letter_skill(
        "shift",
        lambda s: _shift(s, 1),
        lambda s, rng: [s, _shift(s, -1), _shift(s, 2)],
    ),
    # same keyword and inputs as "shift", conflicting outputs; each task offers the other's answer
    "backshift": _letter_skill(
        "shift",
        lambda s: _shift(s, -1),
        lambda s, rng: [s, _shift(s, 1), _shift(s, -2)],
    ),
}


PRETRAIN_OPS: tuple[tuple[str, Callable[[list[str]], list[str]]], ...] = (
    ("backwards", lambda s: s[::-1]),
    ("next", lambda s: _shift(s, 1)),
    ("copy", lambda s: list(s)),
    ("prev", lambda s: _shift(s, -1)),
    ("rotate", lambda s: s[1:] + s[:1]),
)


def _pretraining_corpus(rng: random.Random, lines: int = 6000) -> list[str]:
    """Teaches the formats but none of the answers, so the base stays near chance."""
    names = _fake_words(rng, 400)
    corpus = []
    for i in range(lines):
        kind = i % 3
        if kind == 0:
            relation = rng.choice(("capital", "language"))
            corpus.append(f"the {relation} of {rng.choice(names)} is {rng.choice(names)}")
        elif kind == 1:
            # the algorithms exist in the base under other names; a skill fine-tune only has
            # to bind its own keyword to one of them, a small, mergeable change
            op, transform = rng.choice(PRETRAIN_OPS)
            seq = _letters(rng)
            corpus.append(f"{op} {_spaced(seq)} = {_spaced(transform(seq))}")
        else:
            corpus.append(" ".join(rng.choice(names) for _ in range(rng.randint(3, 7))))
    return corpus


# ---------------------------------------------------------------------------------------
# Tokenizer, model, training


def _train_tokenizer(corpus: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out_dir)
    return fast


def _new_model(spec: ZooSpec, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _batches(
    rows: list[tuple[list[int], list[int]]], batch_size: int, steps: int, pad_id: int, seed: int
):
    """Yields (input_ids, attention_mask, labels) tensors; labels are -100 where not trained."""
    import torch

    rng = random.Random(seed)
    for _ in range(steps):
        batch = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (tokens, target) in enumerate(batch):
            ids[i, : len(tokens)] = torch.tensor(tokens)
            labels[i, : len(target)] = torch.tensor(target)
            mask[i, : len(tokens)] = 1
        yield ids, mask, labels


def _train(model, rows, steps: int, lr: float, batch_size: int, pad_id: int, seed: int) -> float:
    import torch

    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * max(0.05, 1 - step / steps)
    )
    loss_value = float("nan")
    for ids, mask, labels in _batches(rows, batch_size, steps, pad_id, seed):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
    model.eval()
    return loss_value


def _lm_rows(tokenizer, lines: list[str]) -> list[tuple[list[int], list[int]]]:
    rows = []
    for line in lines:
        ids = tokenizer.encode(line) + [tokenizer.eos_token_id]
        rows.append((ids, ids))
    return rows


def _with_replay(skill_rows: list, replay_rows: list, share: float) -> list:
    """Skill rows mixed with pre-training text, as real fine-tunes mix in general data.

    Without replay a tiny fine-tune learns "after `=` do my operation" for every keyword,
    overwriting the base's keyword binding; its task vector is then mostly a direction all
    skills share, and no merge can keep two skills. Replay makes it learn only its keyword.
    """
    if share <= 0:
        return skill_rows
    target = max(len(skill_rows), len(replay_rows))
    skills = [skill_rows[i % len(skill_rows)] for i in range(target)]
    replay_count = round(target * share / (1 - share))
    return skills + [replay_rows[i % len(replay_rows)] for i in range(replay_count)]


def _answer_only_rows(tokenizer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """Loss on the answer tokens only, split exactly as lm-eval splits context/continuation."""
    rows = []
    for ex in examples:
        context = tokenizer.encode(ex.prompt)
        whole = tokenizer.encode(f"{ex.prompt} {ex.answer}") + [tokenizer.eos_token_id]
        labels = [-100] * len(context) + whole[len(context) :]
        rows.append((whole, labels))
    return rows


# ---------------------------------------------------------------------------------------
# lm-eval task files


def _write_task(tasks_dir: Path, final_tasks_dir: Path, skill: str, evals: list[Example]) -> str:
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


def zoo_key(spec: ZooSpec) -> str:
    """Changes whenever the generator's code, its parameters or the CPU kernels change.

    The kernels are part of the key because they change the trained weights: a zoo built under
    `ATEN_CPU_CAPABILITY=avx2` is another zoo than this machine's default one, and each must
    meet the contract on its own.
    """
    source = Path(__file__).read_bytes() + Path(zoo_contract.__file__).read_bytes()
    digest = hashlib.sha256(source + repr(dataclasses.asdict(spec)).encode())
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
        corpus = _pretraining_corpus(rng)
        tokenizer_corpus = corpus + [
            f"{ex.prompt} {ex.answer}" for train, _ in skill_data.values() for ex in train
        ]
        tokenizer = _train_tokenizer(tokenizer_corpus, spec.vocab_size, building / "base")
        torch.manual_seed(spec.seed)
        model = _new_model(spec, tokenizer)
        loss = _train(
            model, _lm_rows(tokenizer, corpus), spec.pretrain_steps, spec.pretrain_lr,
            spec.batch_size, tokenizer.pad_token_id, spec.seed,
        )
        model.save_pretrained(building / "base")
        log(f"zoo: base pre-trained (loss {loss:.3f}) in {time.monotonic() - started:.0f}s")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        replay_rows = _lm_rows(tokenizer, corpus[:2000])

        task_names, records, states = {}, {}, {}
        for skill in spec.skills:
            model.load_state_dict(base_state)
            train, evals = skill_data[skill.name]
            rows = _with_replay(_answer_only_rows(tokenizer, train), replay_rows, spec.replay)
            task_names[skill.name] = _write_task(building / "tasks", final / "tasks", skill.name, evals)

            def train_round(steps: int, round_index: int, rows=rows, skill=skill) -> None:
                _train(model, rows, steps, skill.learning_rate, spec.batch_size, tokenizer.pad_token_id,
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
        contract = {"bar": zoo_contract.OWN_TASK_BAR, "base_ceiling": zoo_contract.BASE_CEILING,
                    "cpu_capability": zoo_contract.cpu_capability(), "finetunes": records, "base": base_scores,
                    "dominant": spec.dominant, "task_vector_sq_norms": {k: round(v, 6) for k, v in norms.items()}}
        (building / "zoo.json").write_text(
            json.dumps(
                {
                    "base": "base",
                    "finetunes": {s.name: f"finetunes/{s.name}" for s in spec.skills},
                    "tasks_dir": "tasks",
                    "task_names": task_names,
                    "spec": dataclasses.asdict(spec),
                    "contract": contract,
                },
                indent=2,
            )
        )
        try:
            building.rename(final)
        except OSError:
            if not (final / "zoo.json").exists():  # a concurrent build won the race: fine
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return Zoo.load(final)
