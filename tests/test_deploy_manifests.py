"""cluster.yaml against Ray's own cluster schema; the KubeRay RayJob and the GPU-cluster config checked."""
from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from resnet_batch.config import load_config

REPO = Path(__file__).resolve().parent.parent
PROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# EC2 types with exactly one NVIDIA GPU (A10G on g5, L4 on g6).
ONE_GPU_TYPES = {f"{family}.{size}" for family in ("g5", "g6")
                 for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")}
SECRET_WORDS = re.compile(r"aws_access_key|aws_secret|secret_access|session_token|ssh_private_key|password|"
                          r"BEGIN [A-Z ]*PRIVATE KEY", re.I)


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((REPO / "deploy/kuberay/rayjob.yaml").read_text())


# -- cluster.yaml --------------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_schema_after_filling_defaults(cluster_cfg):
    full = prepare_config(copy.deepcopy(cluster_cfg))  # what `ray up` does before it validates
    validate_config(full)  # ray/autoscaler/ray-schema.json plus Ray's own consistency checks
    assert full["provider"]["type"] == "aws"
    assert full["head_node_type"] in full["available_node_types"]


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.update(max_worker=3), jsonschema.ValidationError),  # misspelt top-level key
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="1"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="nope"), ValueError),
    (lambda c: c.update(max_workers=0), ValueError),  # fewer than the node types' min_workers
])
def test_the_validation_rejects_broken_variants(cluster_cfg, mutate, error):
    broken = copy.deepcopy(cluster_cfg)
    mutate(broken)
    with pytest.raises(error):
        validate_config(prepare_config(broken))


def _node_types(cfg: dict) -> dict:
    return cfg["available_node_types"]


def test_head_is_cpu_only_and_hosts_no_work(cluster_cfg):
    head = _node_types(cluster_cfg)[cluster_cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))


def test_gpu_worker_type_has_one_gpu_per_node_and_a_range(cluster_cfg):
    gpu = [t for t in _node_types(cluster_cfg).values() if t["resources"].get("GPU")]
    assert len(gpu) == 1
    (gpu,) = gpu
    assert gpu["resources"]["GPU"] == 1
    assert gpu["node_config"]["InstanceType"] in ONE_GPU_TYPES
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] and gpu["max_workers"] >= 2
    cpu_workers = [name for name, t in _node_types(cluster_cfg).items()
                   if name != cluster_cfg["head_node_type"] and not t["resources"].get("GPU")]
    assert cpu_workers, "a CPU worker type for decoding"
    assert all(_node_types(cluster_cfg)[n]["resources"]["CPU"] >= 8 for n in cpu_workers)
    assert sum(t.get("min_workers", 0) for t in _node_types(cluster_cfg).values()) <= cluster_cfg["max_workers"]


def test_every_node_reaches_s3_through_an_instance_profile(cluster_cfg):
    for name, t in _node_types(cluster_cfg).items():
        assert set(t["node_config"]["IamInstanceProfile"]) <= {"Name", "Arn"}, name


def _pip_installs(cfg: dict) -> list[str]:
    """Every requirement that a setup command passes to `pip install`."""
    reqs = []
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        for cmd in cfg.get(key, []):
            for part in cmd.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:2] == ["pip", "install"] or words[1:3] == ["-m", "pip"]:
                    reqs += [w for w in words[2:] if not w.startswith("-") and w not in ("pip", "install")]
    return reqs


def test_setup_installs_this_project_at_the_pinned_version_and_nothing_unpinned(cluster_cfg):
    reqs = _pip_installs(cluster_cfg)
    wheel = f"resnet_batch-{PROJECT_VERSION}-py3-none-any.whl"
    assert any(r.endswith("/" + wheel) for r in reqs), (wheel, reqs)
    for r in reqs:
        assert r.endswith(".whl") or re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[0-9][0-9A-Za-z.\-+]*", r), \
            f"unpinned install in cluster.yaml: {r!r}"
    assert "./dist" in cluster_cfg["file_mounts"].values()  # the wheel `pip wheel . -w dist/` builds


def test_ray_images_match_the_pinned_ray(cluster_cfg):
    docker = cluster_cfg["docker"]
    for key in ("image", "head_image"):
        assert docker[key].startswith(f"rayproject/ray:{ray.__version__}-"), docker[key]
    assert docker["image"].endswith("-gpu")


def test_nodes_start_with_token_auth_and_no_secrets_in_the_file(cluster_cfg):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster_cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert cluster_cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # synced, not inlined
    assert "ssh_private_key" not in cluster_cfg["auth"]
    assert not SECRET_WORDS.search((REPO / "cluster.yaml").read_text())


# -- deploy/kuberay/rayjob.yaml --------------------------------------------------------------------

def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_rayjob_runs_the_embed_job_with_a_committed_config(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "python" and words[1].endswith("/jobs/embed.py")
    config = words[words.index("--config") + 1]
    assert config.startswith("/home/ray/resnet-batch/")
    load_config(REPO / config.removeprefix("/home/ray/resnet-batch/"))  # the file exists and validates
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_rayjob_has_an_autoscaling_gpu_worker_group(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = [g for g in groups.values()
           if any(c["resources"]["limits"].get("nvidia.com/gpu") for c in _containers(g["template"]))]
    assert len(gpu) == 1
    (gpu,) = gpu
    (container,) = _containers(gpu["template"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["maxReplicas"] >= 2


def _all_containers(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [rayjob["spec"]["submitterPodTemplate"], cluster["headGroupSpec"]["template"]]
    pods += [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for p in pods for c in _containers(p)]


def test_rayjob_images_are_pinned_and_token_auth_comes_from_a_secret(rayjob):
    containers = _all_containers(rayjob)
    for c in containers:
        assert c["image"].endswith(f"/resnet-batch:{PROJECT_VERSION}"), c["image"]  # this release, not :latest
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "value" not in env["RAY_AUTH_TOKEN"] and env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    autoscaler_env = {e["name"] for e in rayjob["spec"]["rayClusterSpec"]["autoscalerOptions"]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= autoscaler_env
    assert not SECRET_WORDS.search((REPO / "deploy/kuberay/rayjob.yaml").read_text())


def test_rayjob_pods_use_a_service_account_for_s3(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert {p["spec"]["serviceAccountName"] for p in pods} == {"resnet-batch"}


# -- configs/gpu-cluster.yaml ----------------------------------------------------------------------

def test_gpu_cluster_config_is_valid_and_uses_the_gpus():
    cfg = load_config(REPO / "configs/gpu-cluster.yaml")
    assert cfg.input.uri.startswith("s3://") and cfg.output.uri.startswith("s3://")
    assert cfg.input.storage_options == {} and cfg.output.storage_options == {}  # instance profile, no keys
    assert cfg.compute.gpus_per_actor > 0 and cfg.model.precision in ("fp16", "bf16")
    assert cfg.compute.device == "cuda"  # GPUs asked for even while the GPU nodes are still starting
    assert cfg.compute.max_actors > cfg.compute.min_actors  # the pool scales with the GPU nodes
    gpu_nodes = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]["gpu_worker"]
    assert cfg.compute.max_actors == gpu_nodes["max_workers"] / cfg.compute.gpus_per_actor
