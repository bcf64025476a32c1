from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model + tokenizer, built once per session with the real command."""
    from elastic_ft.core.tiny_assets import make_tiny_assets

    out = tmp_path_factory.mktemp("assets")
    make_tiny_assets(out)
    return out / "model"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():  # a fake-node cluster of another module
        ray.shutdown()
    # 4 logical CPUs on a 2-core box: training workers and data tasks never starve each other.
    # address="local": never attach to a `ray start` head another test left on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
