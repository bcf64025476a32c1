"""One training step of one rank: its micro-batches through forward, backward and the
optimizer step, with the timing the controller balances on and the documented fault injection.

Fault injection (off unless set; per node, e.g. `FakeNodeCluster.add_node(env_vars=...)`):
- `ELASTIC_FT_FAULT_SLOWDOWN=F` stretches this rank's forward and backward to F times the wall
  time their compute took on this node (a sleep of (F-1) x each), standing in for a device F
  times slower in the same conditions; its compute clock counts F x the compute. In wall
  terms, because on a shared CPU contention stretches every rank's compute: a sleep of (F-1) x
  the CPU time made a slowed rank less than F times slower than its peers. The backward's
  sleep comes before the backward, sized from this rank's last backward: a slower device's
  backward ends, and its gradient reduction starts, that much later. Slept after the backward
  (as at first), it followed the reduction the other ranks wait in, and they waited for it
  again in the optimizer step's collective, so it sat on every step's path whatever the split
  (py-spy of a 2x-slowed rank: 28% of its step waiting in the backward's all-reduce, the
  other rank 17% in the optimizer step's).
- `ELASTIC_FT_FAULT_OOM_MICRO_BATCH_OVER=N` raises `torch.OutOfMemoryError` in the phase
  `ELASTIC_FT_FAULT_OOM_PHASE` (forward | backward | optimizer_step, default optimizer_step)
  whenever this rank trains a micro-batch larger than N: a device too small for the plan,
  where Adam's state and the fp32 gradients peak.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PHASES = ("forward", "backward", "optimizer_step")


@dataclass
class Faults:
    slowdown: float = 1.0
    oom_over_micro_batch: int | None = None
    oom_phase: str = "optimizer_step"
    # what the slowdown drill learned of this rank: its backward's compute seconds per sample,
    # and the wall seconds per compute second of its last forward (contention on a CPU)
    backward_s_per_sample: float | None = field(default=None, compare=False, repr=False)
    wall_per_compute: float = field(default=1.0, compare=False, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Faults:
        env = os.environ if env is None else env
        slowdown = float(env.get("ELASTIC_FT_FAULT_SLOWDOWN", "1") or 1)
        over = env.get("ELASTIC_FT_FAULT_OOM_MICRO_BATCH_OVER")
        phase = env.get("ELASTIC_FT_FAULT_OOM_PHASE", "optimizer_step")
        if slowdown < 1 or phase not in PHASES:
            raise ValueError("ELASTIC_FT_FAULT_SLOWDOWN must be >= 1 and "
                             f"ELASTIC_FT_FAULT_OOM_PHASE one of {PHASES}")
        return cls(slowdown, int(over) if over else None, phase)

    def stretch(self, compute_s: float, wall_s: float | None = None) -> float:
        """Sleep (F-1) x the wall time the compute took (`wall_s`; `compute_s` when they are
        the same, as a GPU's); returns (F-1) x `compute_s`, what the compute clock counts."""
        if self.slowdown <= 1:
            return 0.0
        if wall_s is not None and compute_s > 0:
            self.wall_per_compute = wall_s / compute_s
        time.sleep((self.slowdown - 1) * (compute_s if wall_s is None else wall_s))
        return (self.slowdown - 1) * compute_s

    def stretch_backward_ahead(self, micro_batch: int, forward_s: float | None) -> None:
        """Before a backward: sleep (F-1) x its expected compute (the last backward's per
        sample; the forward's for the first), in wall terms as the last forward ran. Not the
        backward's own wall time: that includes the gradient reduction's wait."""
        if self.slowdown <= 1:
            return
        per_sample = self.backward_s_per_sample
        expected_s = per_sample * micro_batch if per_sample is not None else forward_s or 0.0
        time.sleep((self.slowdown - 1) * expected_s * self.wall_per_compute)

    def learn_backward(self, compute_s: float | None, micro_batch: int) -> None:
        if compute_s is not None and micro_batch > 0:
            self.backward_s_per_sample = compute_s / micro_batch

    def maybe_oom(self, phase: str, micro_batch: int) -> None:
        import torch

        if (self.oom_over_micro_batch is not None and phase == self.oom_phase
                and micro_batch > self.oom_over_micro_batch):
            raise torch.OutOfMemoryError(
                f"elastic_ft fault injection: {phase} of micro-batch {micro_batch} over "
                f"ELASTIC_FT_FAULT_OOM_MICRO_BATCH_OVER={self.oom_over_micro_batch}")


class ComputeClock:
    """A rank's compute time, the measure load balancing compares across ranks.

    On a GPU: CUDA events around the work, read once the step's collective has synchronised
    (no extra host sync). On a CPU the device is the CPU: CPU time, so that a rank sharing its
    cores with other processes is not taken for a slow one (two alike ranks on this 2-core box
    measured 1.7-2.2x apart in wall time). The calling thread's CPU time when torch computes
    on that one thread (Ray's default for a 1-CPU worker): the process's would also count
    Ray's background threads, such as the data iterator's prefetch, which run meanwhile.
    """

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self._cpu_clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time
        self._events: list[tuple[Any, Any]] = []
        self._cpu_s = 0.0
        self._torch = torch

    def start(self) -> Any:
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self._cpu_clock(), time.perf_counter()

    def stop(self, started: Any, faults: Faults, stretch: bool = True) -> float | None:
        """This piece's compute seconds when known now: always on a CPU, on a GPU under the
        slowdown drill (which synchronises for it). `stretch`: the drill's sleep follows it."""
        if self.cuda:
            end = _record(self._torch)
            compute_s = None
            if faults.slowdown > 1:  # the drill needs the compute time now: one sync
                end.synchronize()
                compute_s = started.elapsed_time(end) / 1000
                if stretch:
                    faults.stretch(compute_s)
                    end = _record(self._torch)  # the sleep counts: a slower GPU's time
            self._events.append((started, end))
            return compute_s
        started_cpu, started_wall = started
        compute_s = self._cpu_clock() - started_cpu
        wall_s = time.perf_counter() - started_wall
        self._cpu_s += compute_s + (faults.stretch(compute_s, wall_s) if stretch else 0.0)
        return compute_s

    def seconds(self) -> float:
        """Call after the step's collective: the GPU work is done by then."""
        return self._cpu_s + sum(a.elapsed_time(b) for a, b in self._events) / 1000


def _record(torch: Any) -> Any:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class StepOutOfMemory(RuntimeError):
    """An OOM in one phase of a step (the group restarts with a smaller plan)."""

    def __init__(self, phase: str, micro_batch: int, error: BaseException) -> None:
        super().__init__(f"out of memory in {phase} at micro-batch {micro_batch}: {error}")
        self.phase, self.micro_batch = phase, micro_batch


@dataclass
class StepResult:
    loss_sum: Any  # a device tensor: summed normalised loss of this rank's micro-batches
    real_tokens: int  # trainable tokens this rank trained
    forward: ComputeClock  # forward compute: no collective waits under ZeRO 0-2 (the rate)
    data_wait_s: float


def train_step(engine: Any, slots: list[list[int]], next_micro: Callable[[list[int]], Any],
               n_trainable: int, world: int, grad_accum: int, faults: Faults) -> StepResult:
    """Each micro-batch's summed token loss divided by N / (W * a) (N: trainable tokens of the
    whole global batch); DeepSpeed divides by a and averages over W ranks, so the step
    minimises the mean over all N tokens whatever each rank's share of them."""
    import torch

    device = engine.device
    # The loss stays on the device until the step's one collective: a float() per
    # micro-batch would make the host wait for the device before queueing the next one.
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    real_tokens, data_s = 0, 0.0
    forward = ComputeClock(device)
    # the backward is timed only for the slowdown drill's sleep ahead; the balancer reads the
    # forward's clock alone
    backward = ComputeClock(device) if faults.slowdown > 1 else None
    items = torch.tensor(n_trainable / (world * grad_accum), device=device)
    for slot in slots:
        t0 = time.time()
        micro = next_micro(slot)
        batch = {k: torch.tensor(micro[k], device=device)  # a copy: Ray's arrays are read-only
                 for k in ("input_ids", "labels", "position_ids")}
        data_s += time.time() - t0
        real_tokens += int((micro["labels"] != -100).sum())  # on the host: no device sync
        phase, m = "forward", len(slot)
        try:
            faults.maybe_oom(phase, m)
            started = forward.start()
            out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         labels=batch["labels"], use_cache=False, num_items_in_batch=items)
            forward_s = forward.stop(started, faults)
            phase = "backward"
            faults.maybe_oom(phase, m)
            faults.stretch_backward_ahead(m, forward_s)
            started = backward.start() if backward else None
            engine.backward(out.loss)
            if backward:
                faults.learn_backward(backward.stop(started, faults, stretch=False), m)
            phase = "optimizer_step"  # a no-op but at the accumulation boundary
            if engine.is_gradient_accumulation_boundary():
                faults.maybe_oom(phase, m)
            engine.step()
        except torch.OutOfMemoryError as error:
            raise StepOutOfMemory(phase, m, error) from error
        loss_sum += out.loss.detach().float()
    return StepResult(loss_sum, real_tokens, forward, data_s)
