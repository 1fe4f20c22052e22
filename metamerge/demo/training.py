"""How the tiny zoo trains: a BPE tokenizer, a small Llama, and a deterministic training loop."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from metamerge.demo.skills import SPECIAL_TOKENS, Example

if TYPE_CHECKING:
    from metamerge.demo.zoo import ZooSpec

# ---------------------------------------------------------------------------------------
# Tokenizer, model, training


def train_tokenizer(corpus: list[str], vocab_size: int, out_dir: Path):
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


def new_model(spec: ZooSpec, tokenizer):
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


def batches(
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


def train_model(model, rows, steps: int, lr: float, batch_size: int, pad_id: int, seed: int) -> float:
    """Every weight trained, 10 warmup steps; returns the last batch's loss."""
    return train_steps(model, list(model.parameters()), rows, steps, lr, batch_size, pad_id,
                       seed=seed, batch_seed=seed, warmup=10)


def train_steps(model, params: list, rows, steps: int, lr: float, batch_size: int, pad_id: int, *,
                seed: int, batch_seed: int, warmup: int) -> float:
    """AdamW on `params`, linear warmup then linear decay, gradients clipped at 1; both zoos train so.

    Deterministic for the seeds on one CPU kernel family: the zoos' contracts say what it must reach.
    """
    import torch

    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.05, 1 - step / steps)
    )
    loss_value = float("nan")
    for ids, mask, labels in batches(rows, batch_size, steps, pad_id, batch_seed):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
    model.eval()
    return loss_value


def lm_rows(tokenizer, lines: list[str]) -> list[tuple[list[int], list[int]]]:
    rows = []
    for line in lines:
        ids = tokenizer.encode(line) + [tokenizer.eos_token_id]
        rows.append((ids, ids))
    return rows


def with_replay(skill_rows: list, replay_rows: list, share: float) -> list:
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


def answer_only_rows(tokenizer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """Loss on the answer tokens only, split exactly as lm-eval splits context/continuation."""
    rows = []
    for ex in examples:
        context = tokenizer.encode(ex.prompt)
        whole = tokenizer.encode(f"{ex.prompt} {ex.answer}") + [tokenizer.eos_token_id]
        labels = [-100] * len(context) + whole[len(context) :]
        rows.append((whole, labels))
    return rows
