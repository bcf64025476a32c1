"""configs/cluster/: launcher YAMLs validate against Ray's own schema; KubeRay manifest shape."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from elastic_ft.resources.node_health import head_env
from tests.conftest import ROOT

CLUSTER = ROOT / "configs" / "cluster"
LAUNCHERS = ["aws-spot.yaml", "gcp-spot.yaml"]


def _ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_validates_against_ray_schema(name: str) -> None:
    config = yaml.safe_load((CLUSTER / name).read_text())
    schema = _ray_schema()
    jsonschema.validate(config, schema)
    # the schema does catch mistakes: a misspelt node-type field fails
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_spot"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_has_spot_workers_on_demand_head_and_drain(name: str) -> None:
    config = yaml.safe_load((CLUSTER / name).read_text())
    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], types["gpu_spot"]
    text = json.dumps(workers["node_config"])
    assert "spot" in text.lower()
    assert "spot" not in json.dumps(head["node_config"]).lower()
    assert 1 <= workers["min_workers"] <= workers["max_workers"] <= config["max_workers"]
    assert any("pip install" in c and "elastic_ft" in c for c in config["setup_commands"])
    start = " ".join(config["worker_start_ray_commands"])
    assert "--block" in start and "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S" in start
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for name, value in head_env().items():  # a lost node is declared dead in seconds
        assert f"{name}={value}" in head_start


def test_kuberay_rayjob_manifest() -> None:
    manifest = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("elastic-ft train ")
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["template"]["spec"]["containers"][0]["image"]
    head_vars = {e["name"]: e["value"] for e in head["template"]["spec"]["containers"][0]["env"]}
    assert head_env().items() <= head_vars.items()
    (group,) = cluster["workerGroupSpecs"]
    for field in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
        assert field in group, f"KubeRay requires workerGroupSpecs[].{field}"
    assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    pod = group["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    # the pod's grace period must outlast Ray's drain window plus a checkpoint
    assert pod["terminationGracePeriodSeconds"] > float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
