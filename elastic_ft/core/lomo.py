"""LOMO: a fused low-memory update for full fine-tuning (Lv et al. 2023, "Full Parameter
Fine-tuning for Large Language Models with Limited Resources").

Each parameter is updated SGD-style inside the backward pass, the moment its gradient is
accumulated, and the gradient is freed at once: no optimizer state and never more than one
parameter's gradient alive. Gradient-norm clipping needs the global norm before any update, so
a clipped step runs backward twice: the first pass only accumulates the norm, the second
applies `p -= lr * clip * grad`. With fp16 the loss is scaled; an inf/nan norm skips the step
and halves the scale (dynamic loss scaling), as mixed-precision training does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


class Lomo:
    def __init__(self, model: torch.nn.Module, lr: float, grad_clip: float = 1.0,
                 loss_scale: float | None = None, scale_window: int = 1000) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr, self.grad_clip = lr, grad_clip
        self.loss_scale = loss_scale  # None: no scaling (fp32/bf16)
        self.scale_window, self._good_steps = scale_window, 0
        self._mode = "idle"  # "norm" (first pass) or "update" (second pass)
        self._norm_sq = 0.0
        self._clip = 1.0
        self._finite = True
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        if self.loss_scale is not None:
            grad = grad / self.loss_scale
        if self._mode == "norm":
            value = float(grad.float().pow(2).sum())
            self._finite &= math.isfinite(value)
            self._norm_sq += value
        elif self._mode == "update":
            with torch.no_grad():
                p.add_(grad.to(p.dtype), alpha=-self.lr * self._clip)
        p.grad = None  # freed now: LOMO never holds all gradients at once

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> dict[str, Any]:
        """One step. `loss_fn` runs the forward pass (called twice when clipping)."""
        scale = self.loss_scale or 1.0
        self._clip = 1.0
        grad_norm = None
        if self.grad_clip > 0 or self.loss_scale is not None:  # norm first: clip, overflow
            self._mode, self._norm_sq, self._finite = "norm", 0.0, True
            (loss_fn() * scale).backward()
            grad_norm = math.sqrt(self._norm_sq) if self._finite else float("inf")
            if not self._finite:
                return self._overflow(grad_norm)
            if self.grad_clip > 0:
                self._clip = min(1.0, self.grad_clip / (grad_norm + 1e-6))
        self._mode = "update"
        loss = loss_fn()
        (loss * scale).backward()
        self._mode = "idle"
        if self.loss_scale is not None:
            self._good_steps += 1
            if self._good_steps % self.scale_window == 0:
                self.loss_scale *= 2
        return {"loss": float(loss.detach()), "grad_norm": grad_norm, "skipped": False,
                "clip": self._clip}

    def _overflow(self, grad_norm: float) -> dict[str, Any]:
        self._mode = "idle"
        if self.loss_scale is not None:
            self.loss_scale = max(1.0, self.loss_scale / 2)
            self._good_steps = 0
        return {"loss": None, "grad_norm": grad_norm, "skipped": True, "clip": 0.0}
