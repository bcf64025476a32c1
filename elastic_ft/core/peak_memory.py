"""Peak memory of a block of CPU work: RSS growth (what the probe decides on) and the peak of live
CPU tensor bytes (what the memory benchmark scores the model against)."""

from __future__ import annotations

import bisect
import gc
import threading
import time

import psutil

# (time_ns, ptr, size_bytes): one allocation (size > 0) or free (size < 0) the profiler saw.
AllocationEvent = tuple[int, int, int]


class RssPeak:
    """Peak RSS growth of this process while the block runs (CPU has no allocator counter)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.proc = psutil.Process()

    def __enter__(self) -> RssPeak:
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def peak_live_bytes(events: list[AllocationEvent], held_at_end: set[int],
                    step_ends_ns: list[int]) -> int:
    """The largest total of live bytes over `events`, replayed in time order.

    The profiler records only the calling thread's frees. A block this thread allocated and
    another thread freed has no free event, so the profiler's own running total keeps it for
    good: twice in CI the total held one more of DeepSpeed's 8 MiB gradient buffers (allocated
    in its AccumulateGrad hook, so most likely released last by a communication thread). Such a
    block is recognised because nothing holds it at the end (`held_at_end`: the storage
    pointers of the live tensors); it is counted until the end of the step that allocated it,
    or until its address is handed out again. Blocks allocated outside any step are never
    dropped.
    """
    events = sorted(events)  # the profiler's tree is not in time order
    step_ends_ns = sorted(step_ends_ns)
    allocated: dict[int, tuple[int, int]] = {}  # address -> (time, size) of its last allocation
    for t, ptr, size in events:
        if size > 0:
            allocated[ptr] = (t, size)  # an address handed out again was freed before
        else:
            allocated.pop(ptr, None)
    unseen_frees: list[AllocationEvent] = []
    for ptr, (t, size) in allocated.items():
        step = bisect.bisect_left(step_ends_ns, t)
        if ptr not in held_at_end and step < len(step_ends_ns):
            unseen_frees.append((step_ends_ns[step], ptr, -size))
    total = peak = 0
    live: dict[int, int] = {}
    for _, ptr, size in sorted(events + unseen_frees):
        if size > 0:
            total += size - live.get(ptr, 0)
            live[ptr] = size
            peak = max(peak, total)
        elif ptr in live:  # a free of a block from before the window is not in the total
            total -= live.pop(ptr)
    return peak


def held_storage_ptrs() -> set[int]:
    """Storage addresses of every CPU tensor the interpreter still holds."""
    import torch

    held = set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.layout == torch.strided:
            held.add(obj.untyped_storage().data_ptr())
    return held


class CpuAllocatedPeak:
    """Peak bytes of live CPU tensors allocated while the block runs: the CPU analogue of
    `torch.cuda.max_memory_allocated`, free of the heap and page-cache slack in RSS.

    PyTorch's CPU allocator reports every allocation and free to the profiler while it records
    memory; the events are replayed by `peak_live_bytes`, and the caller marks each training
    step's end with `end_step`. Costs a profiler's overhead, so the probe itself stays on RSS;
    the memory benchmark uses this to score the model exactly. Only the calling thread's
    allocations are seen, so Hugging Face's threaded weight loading is switched off meanwhile.
    """

    def __enter__(self) -> CpuAllocatedPeak:
        import os

        from torch.profiler import ProfilerActivity, profile

        self._async_load = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        self._step_ends_ns: list[int] = []
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        self.peak = 0
        return self

    def end_step(self) -> None:
        self._step_ends_ns.append(time.time_ns())  # the profiler's clock is Unix time in ns

    def __exit__(self, *exc: object) -> None:
        import os

        from torch._C._profiler import _EventType

        self._profile.__exit__(*exc)
        if self._async_load is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = self._async_load
        events: list[AllocationEvent] = []
        pending = list(self._profile.profiler.kineto_results.experimental_event_tree())
        while pending:
            event = pending.pop()
            pending.extend(event.children)
            if event.tag == _EventType.Allocation and str(event.extra_fields.device) == "cpu":
                fields = event.extra_fields
                events.append((event.start_time_ns, fields.ptr, fields.alloc_size))
        self.peak = peak_live_bytes(events, held_storage_ptrs(), self._step_ends_ns)
