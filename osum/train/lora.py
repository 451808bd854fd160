"""A minimal LoRA for training osum-mini: ``y = W x + (alpha / r) * B (A x)``.

Only what the recipe needs: wrap the target ``nn.Linear`` modules of the frozen LLM,
train A and B, and export them under peft's key names (``...q_proj.lora_A.default.weight``)
so that :func:`osum.loading.merge_lora` folds them into the weights at load time,
exactly as for OSUM's released checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LoRALinear", "add_lora", "lora_state_dict", "lora_parameters"]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # starts as the identity change
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.lora_B(self.lora_A(self.dropout(x).float())) * self.scale
        return self.base(x) + delta.to(x.dtype)


def add_lora(llm: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, dropout: float = 0.0) -> None:
    """Replace every ``nn.Linear`` whose name ends in one of ``targets`` with a LoRA wrapper."""
    for module in list(llm.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))


def lora_parameters(llm: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in llm.named_parameters() if ".lora_" in n]


def lora_state_dict(llm: nn.Module, prefix: str = "llm.") -> dict[str, torch.Tensor]:
    """LoRA weights under peft's names: ``<prefix><module>.lora_{A,B}.default.weight``."""
    out = {}
    for name, module in llm.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{prefix}{name}.lora_A.default.weight"] = module.lora_A.weight.detach().clone()
            out[f"{prefix}{name}.lora_B.default.weight"] = module.lora_B.weight.detach().clone()
    return out
