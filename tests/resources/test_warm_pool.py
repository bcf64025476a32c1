"""Warm spares: the controller's book (pure) and the raylet mechanism it relies on (real Ray)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from elastic_ft.resources.warm_pool import (
    STARTING_TIMEOUT_S,
    WARM_ENV,
    SparePool,
    model_type_of,
    node_slots,
    parse_spare_keys,
    prestart,
    spare_key,
    spare_prefix,
    warm_env_vars,
    warm_modules,
)


def test_node_slots_count_ranks_a_node_can_host() -> None:
    per_worker = {"CPU": 1, "trainer": 1}
    assert node_slots({"CPU": 1.0, "trainer": 1.0}, per_worker, cap=4) == 1
    assert node_slots({"CPU": 2.0}, per_worker, cap=4) == 0  # the head: no trainer resource
    assert node_slots({"CPU": 96.0, "GPU": 8.0}, {"CPU": 1, "GPU": 1}, cap=4) == 4
    assert node_slots({"CPU": 96.0, "GPU": 8.0}, {"CPU": 8, "GPU": 1}, cap=16) == 8
    assert node_slots({"CPU": 2.0}, {"CPU": 0.5}, cap=8) == 4


def test_spare_pool_tops_up_each_node_to_its_slots() -> None:
    pool = SparePool(runtime_env="{}")
    slots = {"a": 1, "b": 2}
    assert pool.orders(slots, set(), now=0.0) == {"a": 1, "b": 2}
    # asked for and still warming: nothing more to ask
    assert pool.orders(slots, set(), now=1.0) == {}
    assert pool.orders(slots, {("a", 11), ("b", 21)}, now=2.0) == {}
    # a group starts in a's listed spare and in a new process on b: one rank was a spare
    assert pool.claim("a", 11, listed=True, older_than_group=True)
    assert not pool.claim("b", 99, listed=False, older_than_group=False)
    ready = {("b", 21)}  # a's key went with the claim
    assert pool.orders(slots, ready, now=3.0) == {"a": 1}
    # the next group comes before a's new spare listed itself: it was still warming
    assert pool.claim("a", 12, listed=False, older_than_group=True)
    assert pool.orders(slots, ready, now=3.5) == {"a": 1}
    # a spare listed and claimed between two looks answers its request all the same
    assert pool.claim("a", 13, listed=True, older_than_group=True)
    assert pool.orders(slots, ready, now=4.0) == {"a": 1}
    # a process older than the group on a node with nothing asked of it: not a spare
    assert not pool.claim("c", 5, listed=False, older_than_group=True)
    # b's second spare never listed itself (no free CPU there): asked again after the timeout
    assert pool.orders(slots, ready, now=3.0 + STARTING_TIMEOUT_S) == {"b": 1}
    # a node that left: nothing asked of it, its spares forgotten
    pool.forget_node("b")
    assert pool.orders({"a": 1}, set(), now=3.0 + STARTING_TIMEOUT_S) == {}
    assert not pool.seen


def test_spare_keys_name_node_and_pid() -> None:
    prefix = spare_prefix("ctl")
    keys = [spare_key(prefix, "n1", 42).encode(), spare_key(prefix, "n2", 7).encode(),
            f"{prefix}junk".encode()]
    assert parse_spare_keys(keys, prefix) == {("n1", 42), ("n2", 7)}


def test_warm_env_names_the_controller_and_the_model_module(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert model_type_of(str(tmp_path)) == "llama"
    assert model_type_of("meta-llama/Llama-3.1-8B") is None  # a hub id: no local config
    spec = json.loads(warm_env_vars("ctl", "ns", "cpu", warm_modules("llama"))[WARM_ENV])
    assert spec["controller"] == "ctl" and spec["namespace"] == "ns"
    assert spec["accelerator"] == "cpu"
    assert "transformers.models.llama.modeling_llama" in spec["modules"]
    assert "elastic_ft.core.train_loop" in spec["modules"]


def _wait(predicate, timeout_s: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def test_an_actor_with_the_training_env_starts_in_a_warm_spare(ray_local) -> None:  # noqa: ANN001
    """The raylet's prestart with a rank's runtime environment gives a process that warms
    itself, lists itself as a spare, and is the one the next actor with that environment
    starts in; a process started for an actor does not list itself; an idle spare exits once
    its controller is gone."""
    import psutil
    import ray
    from ray.experimental.internal_kv import _internal_kv_list

    name = f"controller_{os.getpid()}_{int(time.time())}"
    prefix = spare_prefix(name)

    @ray.remote(num_cpus=0)
    class Controller:  # what the spares watch for: the run's named actor
        def ping(self) -> bool:
            return True

    @ray.remote(num_cpus=0.1)
    class Rank:
        def place(self) -> tuple[int, str, float | None]:
            from elastic_ft.resources import worker_setup

            return (os.getpid(), ray.get_runtime_context().get_runtime_env_string(),
                    worker_setup.warm_s())

        def torch_threads(self) -> int:
            import torch

            from elastic_ft.resources import worker_setup

            worker_setup.adopt_actor_threads()  # as a rank does first
            return torch.get_num_threads()

    def listed() -> set[tuple[str, int]]:
        return parse_spare_keys(_internal_kv_list(prefix), prefix)

    controller = Controller.options(name=name).remote()
    ray.get(controller.ping.remote())
    env = {"env_vars": warm_env_vars(name, ray.get_runtime_context().namespace, "cpu",
                                     ["json"])}
    cold = Rank.options(runtime_env=env).remote()
    cold_pid, runtime_env, cold_warm_s = ray.get(cold.place.remote(), timeout=120)
    assert cold_warm_s is not None  # warmed by its hook before the actor started
    assert not listed()  # but claimed at once: not a spare
    ray.kill(cold)
    node = next(n for n in ray.nodes() if n["Alive"])
    job_id = ray.get_runtime_context().get_job_id()

    prestart(node, job_id, runtime_env, 1)
    spares = _wait(listed, 120, "no spare listed itself")
    assert len(spares) == 1
    spare_pid = next(iter(spares))[1]
    assert spare_pid != cold_pid
    t0 = time.time()
    warm = Rank.options(runtime_env=env).remote()
    pid, _, warm_s = ray.get(warm.place.remote(), timeout=60)
    assert pid == spare_pid and warm_s is not None
    # torch was imported before Ray set the actor's OMP_NUM_THREADS (num_cpus=0.1 -> 1)
    assert ray.get(warm.torch_threads.remote()) == 1
    print(f"actor in a warm spare: {time.time() - t0:.2f} s (warming took {warm_s:.1f} s)")
    ray.kill(warm)
    assert listed() == spares  # the key goes when a controller claims it (plan)

    prestart(node, job_id, runtime_env, 1)
    idle = _wait(lambda: listed() - spares, 120, "second spare not listed")
    idle_pid = next(iter(idle))[1]
    ray.kill(controller)  # the run is over
    _wait(lambda: not psutil.pid_exists(idle_pid), 30, "an idle spare outlived its controller")


def test_warming_for_cuda_leaves_the_cuda_driver_uninitialised() -> None:
    """On a GPU node: a spare's imports must not initialise CUDA before Ray picks its GPUs
    (scripts/gpu_checks.sh runs this; without a CUDA driver there is nothing to check)."""
    import subprocess
    import sys

    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    code = ("from elastic_ft.resources.warm_pool import warm_modules\n"
            "from elastic_ft.resources.worker_setup import cuda_driver_initialized, "
            "warm_imports\n"
            "assert not cuda_driver_initialized()\n"
            "warm_imports('cuda', warm_modules('llama'))\n"
            "print('initialised' if cuda_driver_initialized() else 'untouched')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "untouched", out.stderr[-2000:]
