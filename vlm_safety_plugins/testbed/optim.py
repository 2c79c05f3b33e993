"""The optimiser, learning-rate schedule and progress log shared by the testbed's three trainers."""

from __future__ import annotations

import math
import time

import torch


def optimiser(parts: list[tuple[torch.nn.Module, float]], steps: int, warmup: int = 30, weight_decay: float = 0.01):
    """AdamW over ``(module, learning rate)`` parts, with linear warm-up then cosine decay to a tenth.

    Returns ``(optimiser, scheduler)``. Biases, norms and embeddings are not decayed."""
    groups = []
    for module, lr in parts:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
        rest = [p for n, p in named if p.dim() < 2 or "embed" in n]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": rest, "lr": lr, "weight_decay": 0.0},
        ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def step(loss: torch.Tensor, model: torch.nn.Module, opt, scheduler, clip: float = 1.0) -> None:
    """One optimisation step with gradient clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    scheduler.step()


class Progress:
    """Prints ``name step/steps loss elapsed`` every ``every`` steps (and at the end) to ``log``."""

    def __init__(self, name: str, steps: int, log=print, every: int = 50):
        self.name, self.steps, self.log, self.every = name, steps, log, every
        self.started = time.perf_counter()
        self.losses: list[float] = []

    def __call__(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            recent = self.losses[-self.every :]
            self.log(
                f"[{self.name}] step {step + 1}/{self.steps} loss {sum(recent) / len(recent):.4f} "
                f"({self.elapsed:.0f} s)"
            )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started
