from __future__ import annotations

import logging

from elastic_ft.resources.monitor import NvmlReader, sample_node


def test_degrades_to_cpu_without_nvml(caplog) -> None:
    import torch

    with caplog.at_level(logging.INFO, logger="elastic_ft.monitor"):
        reader = NvmlReader()
    sample = sample_node("n1", reader)
    assert sample.cpu_count >= 1 and 0 < sample.mem_used_bytes <= sample.mem_total_bytes
    if not torch.cuda.is_available():
        assert not reader.available and sample.gpus == []
        assert len([r for r in caplog.records if "GPU monitoring off" in r.message]) == 1
    else:
        assert sample.gpus and sample.gpus[0].mem_total_bytes > 0


def test_nvml_sees_this_process_allocate_on_the_gpu() -> None:
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run by scripts/gpu_checks.sh)")
    reader = NvmlReader()
    assert reader.available
    torch.cuda.init()
    before = reader.sample()[0]
    block = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    after = reader.sample()[0]
    assert after.mem_used_bytes - before.mem_used_bytes >= 2 * 1024**3 * 0.95
    assert after.mem_total_bytes >= torch.cuda.get_device_properties(0).total_memory * 0.95
    assert 0 <= after.util_pct <= 100 and after.name
    del block
