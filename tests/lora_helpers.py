"""Real PEFT LoRA adapters on a real checkpoint (the tiny zoo's base), built with `peft` on CPU."""

from __future__ import annotations

import random
from pathlib import Path

import torch


def _peft_model(base_dir: Path, seed: int, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(**config))


def make_adapter(base_dir: Path, out: Path, seed: int, b_scale: float = 0.02, **config) -> Path:
    """An adapter with random A and B (B shrunk so that ‖τ‖/‖θ₀‖ looks like a fine-tune's)."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"],
              "init_lora_weights": False, **config}
    model = _peft_model(base_dir, seed, **config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(b_scale)
            elif param.requires_grad and "lora_A" not in name and "lora_embedding_A" not in name:
                param.add_(b_scale * torch.randn_like(param))  # modules_to_save, trained biases
    model.save_pretrained(out)
    return out


def train_adapter(zoo, skill: str, out: Path, steps: int = 150, seed: int = 0, lr: float = 3e-3) -> Path:
    """A LoRA adapter trained with peft on one of the zoo's skills (answer-only loss, as the zoo trains)."""
    from transformers import AutoTokenizer

    from metamerge.demo.skills import SKILLS
    from metamerge.demo.training import answer_only_rows, train_steps

    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    train, _ = SKILLS[skill](random.Random(f"lora-{seed}-{skill}"))
    model = _peft_model(zoo.base, seed, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                              "up_proj", "down_proj", "gate_proj"])
    params = [p for p in model.parameters() if p.requires_grad]
    train_steps(model, params, answer_only_rows(tokenizer, train), steps, lr, 16, tokenizer.pad_token_id,
                seed=seed, batch_seed=seed, warmup=5)
    model.save_pretrained(out)
    return out


def materialize(base_dir: Path, adapter: Path, out: Path) -> Path:
    """The same adapter merged into its base by peft itself (`merge_and_unload`), saved as safetensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    return out
