"""LOMO: a fused low-memory update for full fine-tuning (Lv et al. 2023, "Full Parameter
Fine-tuning for Large Language Models with Limited Resources").

Each parameter is updated SGD-style inside the backward pass, the moment autograd has
accumulated its gradient, and the gradient is freed at once: no optimizer state and never more
than one parameter's gradient alive. Gradient-norm clipping needs the global norm before any
update, so a clipped step runs backward twice over one forward (the graph retained, as the
paper's `grad_norm` does): the first pass only sums the norm, the second applies
`p -= lr * (clip * grad + weight_decay * p)`. With fp16 the loss is scaled; an inf/nan norm
skips the step and halves the scale (dynamic loss scaling), as mixed-precision training does.

Under Ray Train (`optim.name: lomo`, `method.kind: full`, no DeepSpeed) every rank holds the
whole model, as plain data parallelism does, and each gradient is all-reduced inside its hook
before it is measured or applied, so every rank sees the same norm and makes the same update.
There is no gradient accumulation: a fused update cannot wait for later micro-batches without
holding every gradient, which is what LOMO exists to avoid, so the planner gives LOMO one
micro-step per step (`resources/planning.py`, `max_grad_accum`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

INITIAL_LOSS_SCALE = 2.0**16  # the paper's, for fp16
MAX_GRAD_ACCUM = 1  # the update is fused into the one backward of each step
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "lomo_state.json"


class Lomo:
    def __init__(self, model: torch.nn.Module, lr: float, grad_clip: float = 1.0,
                 loss_scale: float | None = None, scale_window: int = 1000,
                 weight_decay: float = 0.0, world_size: int = 1) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr, self.grad_clip, self.weight_decay = lr, grad_clip, weight_decay
        self.loss_scale = loss_scale  # None: no scaling (fp32/bf16)
        self.scale_window, self.good_steps = scale_window, 0
        self.world_size = world_size  # > 1: gradients are averaged over the process group
        self._mode = "idle"  # "norm" (first pass) or "update" (second pass)
        self._norm_sq: torch.Tensor | float = 0.0  # on the device: no host sync per parameter
        self._clip = 1.0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        p.grad = None  # freed now: LOMO never holds all gradients at once
        if self.world_size > 1:
            import torch.distributed as dist

            # every rank's loss is its share of the global mean (core/step.py): the mean of
            # the ranks' gradients is the global batch's gradient
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad.div_(self.world_size)
        grad = grad.float()  # p's own gradient (fp32) or a copy: no longer p's either way
        if self.loss_scale is not None:
            grad.div_(self.loss_scale)  # in place: no second copy of each gradient
        if self._mode == "norm":
            self._norm_sq = self._norm_sq + grad.pow(2).sum()
        elif self._mode == "update":
            with torch.no_grad():
                master = p if p.dtype == torch.float32 else p.float()  # no fp32 copy kept
                if self.weight_decay:
                    master.mul_(1 - self.lr * self.weight_decay)
                master.add_(grad, alpha=-self.lr * self._clip)
                if master is not p:
                    p.copy_(master)

    def backward(self, loss: torch.Tensor) -> dict[str, Any]:
        """Backward and update for one step's loss (the forward already run)."""
        scale = self.loss_scale or 1.0
        self._clip, grad_norm = 1.0, None
        if self.grad_clip > 0 or self.loss_scale is not None:  # norm first: clip, overflow
            self._mode, self._norm_sq = "norm", 0.0
            (loss * scale).backward(retain_graph=True)
            grad_norm = math.sqrt(float(self._norm_sq))
            if not math.isfinite(grad_norm):
                return self._overflow(grad_norm)
            if self.grad_clip > 0:
                self._clip = min(1.0, self.grad_clip / (grad_norm + 1e-6))  # as clip_grad_norm_
        self._mode = "update"
        (loss * scale).backward()
        self._mode = "idle"
        if self.loss_scale is not None:
            self.good_steps += 1
            if self.good_steps % self.scale_window == 0:
                self.loss_scale *= 2
        return {"loss": float(loss.detach()), "grad_norm": grad_norm, "skipped": False,
                "clip": self._clip}

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> dict[str, Any]:
        """One step: `loss_fn` runs the forward pass."""
        return self.backward(loss_fn())

    def _overflow(self, grad_norm: float) -> dict[str, Any]:
        self._mode = "idle"
        if self.loss_scale is not None:
            self.loss_scale = max(1.0, self.loss_scale / 2)
            self.good_steps = 0
        return {"loss": None, "grad_norm": grad_norm, "skipped": True, "clip": 0.0}


class LomoEngine:
    """What the recipe (core/train_loop.py, core/step.py, core/evaluate.py, the probe) asks of
    a DeepSpeed engine, for LOMO: forward, backward (where the update happens), step (the
    learning-rate schedule), and a checkpoint of parameters, schedule and loss scale.

    The schedule is torch's `LambdaLR` over a plain SGD optimizer that only carries the rate:
    its `step()` finds no gradient (each was applied and freed in the backward) and changes
    nothing, and calling it keeps the scheduler's own bookkeeping in order.
    """

    def __init__(self, model: torch.nn.Module, lomo: Lomo, rate: torch.optim.Optimizer,
                 scheduler: Any, device: torch.device, rank: int) -> None:
        self.module, self.lomo, self.optimizer, self.scheduler = model, lomo, rate, scheduler
        self.device, self.rank = device, rank
        self.last: dict[str, Any] | None = None

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self.lomo.lr = self.optimizer.param_groups[0]["lr"]
        self.last = self.lomo.backward(loss)

    def is_gradient_accumulation_boundary(self) -> bool:
        return True  # one micro-step per step (no accumulation: see the module's note)

    def step(self) -> None:
        if self.last is not None and not self.last["skipped"]:  # an overflow keeps the rate
            self.optimizer.step()
            self.scheduler.step()

    def save_checkpoint(self, save_dir: str, tag: str, client_state: Any = None) -> None:
        """Rank 0 writes the weights (every rank holds the same) and the schedule's state:
        nothing depends on the world size, so any world size resumes it as it is."""
        from safetensors.torch import save_model

        if self.rank != 0:
            return
        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        save_model(self.module, str(out / WEIGHTS_FILE))  # tied weights stored once
        (out / STATE_FILE).write_text(json.dumps({
            "scheduler": self.scheduler.state_dict(), "loss_scale": self.lomo.loss_scale,
            "good_steps": self.lomo.good_steps}, indent=1))

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> None:
        from safetensors.torch import load_model

        where = Path(load_dir) / tag
        load_model(self.module, str(where / WEIGHTS_FILE), device=str(self.device))
        state = json.loads((where / STATE_FILE).read_text())
        if load_lr_scheduler_states:
            self.scheduler.load_state_dict(state["scheduler"])
            # the rate lives in the optimizer's groups, which a scheduler's state leaves alone
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(),
                                 strict=True):
                group["lr"] = lr
        if load_optimizer_states:  # LOMO's only optimizer state: the loss scale
            self.lomo.loss_scale, self.lomo.good_steps = state["loss_scale"], state["good_steps"]


def build_lomo_engine(model: torch.nn.Module, lr: float, lr_fn: Callable[[int], float],
                      grad_clip: float, weight_decay: float, precision: str, rank: int = 0
                      ) -> tuple[LomoEngine, Any]:
    """The model on this rank's device in the training precision (no fp32 master copy: the
    memory LOMO saves), its fused updater and its learning-rate schedule."""
    import torch.distributed as dist

    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model.to(device=device, dtype=dtype)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    lomo = Lomo(model, lr=lr, grad_clip=grad_clip, weight_decay=weight_decay, world_size=world,
                loss_scale=INITIAL_LOSS_SCALE if precision == "fp16" else None)
    rate = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(rate, lr_fn)
    return LomoEngine(model, lomo, rate, scheduler, device, rank), scheduler
