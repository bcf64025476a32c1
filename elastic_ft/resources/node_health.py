"""How fast the cluster declares a vanished node dead: Ray's GCS health check, set for training.

Ray's defaults (a check every 3 s, 10 s timeout, dead after 5 failures) declare a killed node
dead 15-65 s after it went. Until then its resources still count as free, so Ray Train's
restart tries to place the new group at the old size on a node that is gone and waits out
`workers.start_timeout_s` before trying smaller (the largest phase of a hard loss's recovery,
`resources/recovery.py`). With a check every second, a 2 s timeout and 3 failures, a node whose
raylet is gone (connection refused) is dead in about 3 s, one that vanished from the network
in about 9 s, while a raylet that is merely busy still answers well inside 2 s.

These are GCS settings, read on the head only: `ray start --head` takes them as environment
variables (`head_env()`: RAY_<name>, how Ray overrides any of its C++ settings), a local
cluster as `_system_config` (`SYSTEM_CONFIG`). The shipped cluster configs set them
(`configs/cluster/`, checked by tests/test_cluster_configs.py).
"""

from __future__ import annotations

SYSTEM_CONFIG: dict[str, int] = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 3,
}


def head_env() -> dict[str, str]:
    """The same settings as the head's environment variables."""
    return {f"RAY_{name}": str(value) for name, value in SYSTEM_CONFIG.items()}


def death_detection_s() -> float:
    """The longest the head takes with these settings to declare a killed node dead: the
    failed checks in a row, one period apart, the last one timing out."""
    return (SYSTEM_CONFIG["health_check_failure_threshold"]
            * SYSTEM_CONFIG["health_check_period_ms"]
            + SYSTEM_CONFIG["health_check_timeout_ms"]) / 1000
