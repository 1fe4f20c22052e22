"""The contract every zoo meets on the CPU that built it: each fine-tune masters its own task.

Float training follows the CPU kernels torch picks (AVX-512, AVX2 or the portable ones), so the
same seed and data give different weights on different machines. A zoo that trained a fixed
number of steps is then a zoo whose quality depends on the machine, and every test threshold
tuned on one machine's zoo fails on another. Instead, a zoo builder trains each fine-tune in
rounds until it reaches a bar on its own task (or fails the build with one clear line), and
records what it measured. Tests and the demo then rely on the contract and on the recorded
numbers, never on one machine's luck.

The score here is lm-eval's multiple-choice accuracy computed the way lm-eval computes it
(context/continuation split, summed log-likelihood of the continuation, argmax over the
choices), so the recorded number is the one the pipeline's lm-eval evaluation reports, up to
float noise in near-ties. It runs in-process on the model being trained: no save, no reload,
no lm-eval start-up per round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from metamerge.errors import InputError

# Each fine-tune reaches this accuracy on its own 4-way multiple-choice task, or the build fails.
OWN_TASK_BAR = 0.95
# ...and the base stays at most here on every task (chance is 0.25): a fine-tune's gain is real.
BASE_CEILING = 0.5


class ZooContractError(InputError):
    """A fine-tune could not reach the bar within its step budget on this machine."""


class ChoiceExample(Protocol):
    prompt: str
    answer: str
    choices: tuple[str, ...]


@dataclass
class FineTuneRecord:
    """What the build measured for one fine-tune; stored in zoo.json under `contract`."""

    task: str
    bar: float
    steps: int = 0
    score: float = 0.0
    rounds: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def cpu_capability() -> str:
    """The kernel family torch uses here (`ATEN_CPU_CAPABILITY` overrides it): part of a zoo's identity."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def lm_eval_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair: trailing spaces move to the continuation; encode the whole."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids):]


def multiple_choice_accuracy(model, tokenizer, examples: Sequence[ChoiceExample], batch_size: int = 64) -> float:
    """Share of examples whose answer has the highest summed log-likelihood among the choices."""
    import torch

    requests: list[tuple[int, list[int], list[int]]] = []  # (example, input ids, continuation ids)
    for index, example in enumerate(examples):
        for choice in example.choices:
            context_ids, continuation_ids = lm_eval_split(tokenizer, example.prompt, " " + choice)
            requests.append((index, (context_ids + continuation_ids)[:-1], continuation_ids))
    likelihoods: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            width = max(len(ids) for _, ids, _ in batch)
            # right padding without a mask, as lm-eval does: a causal model never looks ahead
            inputs = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, ids, _) in enumerate(batch):
                inputs[row, : len(ids)] = torch.tensor(ids)
            logprobs = torch.log_softmax(model(input_ids=inputs).logits.float(), dim=-1)
            for row, (_, ids, continuation) in enumerate(batch):
                positions = torch.arange(len(ids) - len(continuation), len(ids))
                picked = logprobs[row, positions, torch.tensor(continuation)]
                likelihoods.append(float(picked.sum()))
    if was_training:
        model.train()
    correct, cursor = 0, 0
    for example in examples:
        scores = likelihoods[cursor:cursor + len(example.choices)]
        cursor += len(example.choices)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first maximum, like np.argmax
        correct += example.choices[best] == example.answer
    return correct / len(examples)


def contract_record(records: dict, base_scores: dict[str, float], **extra: object) -> dict:
    """What zoo.json keeps of a build's contract: the bars, the CPU kernels, every measured number."""
    return {"bar": OWN_TASK_BAR, "base_ceiling": BASE_CEILING, "cpu_capability": cpu_capability(),
            "finetunes": records, "base": base_scores, **extra}


def check_base(base_scores: dict[str, float], ceiling: float = BASE_CEILING) -> None:
    above = {task: score for task, score in base_scores.items() if score > ceiling}
    if above:
        raise ZooContractError(f"zoo: the base already scores {above} (ceiling {ceiling}); the zoo was not built")


def squared_norms(base_state: dict, finetune_states: dict[str, dict]) -> dict[str, float]:
    """‖θ_t − θ₀‖² per fine-tune over every float tensor, in float64."""
    norms = {}
    for label, state in finetune_states.items():
        norms[label] = float(sum(((state[k].double() - v.double()) ** 2).sum() for k, v in base_state.items()
                                 if v.is_floating_point()))
    return norms


def check_dominant(norms: dict[str, float], dominant: str | None) -> None:
    """A zoo that promises one fine-tune moved furthest (MetaGPT gives it the largest λ) keeps it."""
    if dominant is not None and max(norms, key=norms.get) != dominant:
        raise ZooContractError(
            f"zoo: fine-tune {dominant!r} should have the largest task vector, but the squared norms are "
            f"{ {k: round(v, 3) for k, v in norms.items()} } (CPU kernels {cpu_capability()}); the zoo was not built"
        )


def train_to_bar(
    label: str,
    task: str,
    train_round: Callable[[int, int], None],
    score: Callable[[], float],
    first_steps: int,
    max_steps: int,
    bar: float = OWN_TASK_BAR,
    log: Callable[[str], None] = print,
) -> FineTuneRecord:
    """Trains `first_steps`, then rounds of half as many, until `score() >= bar` or `max_steps`.

    `train_round(steps, round_index)` continues training the same model; each round gets its
    own index so its batches differ from the previous round's.
    """
    record = FineTuneRecord(task=task, bar=bar)
    steps, round_index = first_steps, 0
    while True:
        train_round(steps, round_index)
        record.steps += steps
        record.score = round(score(), 4)
        record.rounds.append({"steps": record.steps, "score": record.score})
        if record.score >= bar:
            return record
        steps = max(1, first_steps // 2)
        if record.steps + steps > max_steps:
            raise ZooContractError(
                f"zoo: fine-tune {label!r} reached {record.score:.3f} on {task} after {record.steps} steps, "
                f"below the bar {bar} (CPU kernels {cpu_capability()}); the zoo was not built"
            )
        round_index += 1
        log(f"zoo: fine-tune {label} at {record.score:.3f} on {task} after {record.steps} steps; training on")
