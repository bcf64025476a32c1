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
