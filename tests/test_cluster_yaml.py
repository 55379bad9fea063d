"""cluster.yaml and the job configs in jobs/: does the cluster launch, is it closed, and does
every stage's worker or actor fit on one of its node types?

Offline: the cluster config is validated with the schema that ships with Ray
(``ray/autoscaler/ray-schema.json``) and with the launcher's own ``prepare_config`` /
``validate_config`` (what ``ray up`` runs before calling AWS); nothing is launched. Each check
is a function returning a list of problems, and the last tests break copies of the real files
to show that every check can fail. Runs in about 3 s.
"""

import copy
import inspect
import json
import math
import os
import re
from dataclasses import fields
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from ezsasrec_ray.evaluate import evaluate
from ezsasrec_ray.prepare import PrepareConfig
from ezsasrec_ray.score import recommend
from ezsasrec_ray.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_PATH = ROOT / "cluster.yaml"
JOB_CONFIGS = sorted((ROOT / "jobs").glob("config*.yaml"))
CLUSTER_JOB = ROOT / "jobs" / "config.cluster.yaml"

# vCPUs and GPUs of the instance types the cluster may use (AWS's published specs). A node
# type must not advertise more than its hardware has; add a row to use another type.
INSTANCE_SPECS = {
    "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "m5.8xlarge": (32, 0),
    "r5.2xlarge": (8, 0), "r5.4xlarge": (16, 0),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.12xlarge": (48, 4),
    "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1),
}


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_yaml(CLUSTER_PATH)


# --------------------------------------------------------------------------------------------
# Checks: each returns a list of one-line problems (empty = fine)


def schema_errors(cfg: dict) -> list[str]:
    """Errors against Ray's ray-schema.json, then against the launcher's own validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        schema = json.load(f)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(cfg)]
    if errors:
        return errors
    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except (ValueError, KeyError, RuntimeError, jsonschema.ValidationError) as exc:
        return [f"ray validate_config: {exc}"]
    return []


def network_problems(cfg: dict) -> list[str]:
    """Anything that would open a port other than SSH (22) to the outside (AWS)."""
    problems = []
    if cfg["provider"]["type"] != "aws":
        return [f"provider.type {cfg['provider']['type']!r}: only the AWS rules are checked"]
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        ports = (rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort"))
        if ports != ("tcp", 22, 22):
            problems.append(f"provider.security_group.IpPermissions opens {ports}; only SSH "
                            "(tcp 22) may be reachable from outside")
    for name, node_type in cfg["available_node_types"].items():
        for key in ("SecurityGroupIds", "NetworkInterfaces"):
            if key in node_type["node_config"]:
                problems.append(f"{name}.node_config.{key}: a group outside the checked "
                                "Ray-managed one")
    for command in cfg.get("head_start_ray_commands", []):
        host = re.search(r"--dashboard-host[= ](\S+)", command)
        if host and host.group(1) not in ("127.0.0.1", "localhost"):
            problems.append(f"head_start_ray_commands: --dashboard-host {host.group(1)}; the "
                            "dashboard must listen on 127.0.0.1 (reach it with ray dashboard)")
    docker = cfg.get("docker", {})
    options = docker.get("run_options", []) + [
        opt for t in cfg["available_node_types"].values()
        for opt in t.get("docker", {}).get("worker_run_options", [])]
    for opt in options:
        if re.match(r"(-p|--publish)\b", opt):
            problems.append(f"docker run option {opt!r} publishes a port")
    return problems


def node_resources(cfg: dict) -> dict[str, tuple[dict, int]]:
    """Node type -> (resources, how many may run); the head counts once."""
    return {name: (t.get("resources", {}),
                   1 if name == cfg["head_node_type"] else t.get("max_workers", 0))
            for name, t in cfg["available_node_types"].items()}


def autoscaling_problems(cfg: dict) -> list[str]:
    """Idle timeout, an autoscaling GPU group and CPU group, resources true to the hardware."""
    problems = []
    idle = cfg.get("idle_timeout_minutes")
    if not isinstance(idle, int | float) or not 0 < idle <= 60:
        problems.append(f"idle_timeout_minutes: {idle!r}; set 1..60 so idle workers go away")
    groups = {"GPU": False, "CPU-only": False}
    for name, t in cfg["available_node_types"].items():
        res, instance = t["resources"], t["node_config"].get("InstanceType")
        if instance not in INSTANCE_SPECS:
            problems.append(f"{name}: instance type {instance!r} not in INSTANCE_SPECS")
            continue
        cpus, gpus = INSTANCE_SPECS[instance]
        if res.get("CPU", cpus) > cpus or res.get("GPU", gpus) > gpus:
            problems.append(f"{name}: resources {res} exceed {instance} ({cpus} vCPU, "
                            f"{gpus} GPU)")
        if name == cfg["head_node_type"]:
            if res.get("GPU", gpus) > 0:
                problems.append(f"{name}: the head should be a CPU node")
            continue
        autoscaling = t.get("min_workers", 0) < t.get("max_workers", 0)
        kind = "GPU" if res.get("GPU", 0) >= 1 else "CPU-only" if res.get("CPU", 0) >= 1 else None
        if kind and autoscaling:
            groups[kind] = True
    problems += [f"no autoscaling {kind} worker group (min_workers < max_workers)"
                 for kind, found in groups.items() if not found]
    return problems


def setup_commands(cfg: dict, name: str) -> list[str]:
    """The setup commands ``ray up`` runs on nodes of this type (Ray's merge rules)."""
    if name == cfg["head_node_type"]:
        return cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
    node_type = cfg["available_node_types"][name]
    if "worker_setup_commands" in node_type:  # replaces both global lists
        return node_type["worker_setup_commands"]
    return cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", [])


def package_mounts(cfg: dict) -> list[str]:
    """Remote paths of file_mounts whose local source is this repository."""
    mounts = []
    for remote, local in cfg.get("file_mounts", {}).items():
        pyproject = (ROOT / os.path.expanduser(local)).resolve() / "pyproject.toml"
        if pyproject.is_file() and 'name = "ezsasrec_ray"' in pyproject.read_text():
            mounts.append(remote)
    return mounts


def install_problems(cfg: dict) -> list[str]:
    """Every node type pip-installs the mounted package; GPU nodes with its [gpu] extra."""
    mounts = package_mounts(cfg)
    if not mounts:
        return ["file_mounts: no mount of this repository (its pyproject.toml)"]
    remote = [m.replace("~", "$HOME", 1) for m in mounts] + mounts
    problems = []
    for name, t in cfg["available_node_types"].items():
        installs = [c for c in setup_commands(cfg, name) if re.search(r"\bpip install\b", c)
                    and any(r in c for r in remote)]
        if not installs:
            problems.append(f"{name}: its setup commands do not pip install {mounts[0]}")
        elif t["resources"].get("GPU", 0) and not any("[gpu]" in c for c in installs):
            problems.append(f"{name}: a GPU node without the package's [gpu] extra")
    return problems


def image_problems(cfg: dict) -> list[str]:
    """Ray's images must carry the Ray version of this client."""
    images = [cfg.get("docker", {}).get(k) for k in ("image", "head_image", "worker_image")]
    images += [t.get("docker", {}).get("worker_image")
               for t in cfg["available_node_types"].values()]
    problems = []
    for image in filter(None, images):
        match = re.fullmatch(r"rayproject/ray(?:-ml)?:([\d.]+)-py3\d+-\w+", image)
        if not match or match.group(1) != ray.__version__:
            problems.append(f"docker image {image}: expected rayproject/ray:{ray.__version__}-"
                            "pyXY-{cpu,gpu}, the Ray version of this client")
    return problems


# --------------------------------------------------------------------------------------------
# Job configs: what each stage asks of one node per worker / actor


def _defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _given(section: dict) -> dict:
    return {k: v for k, v in section.items() if v is not None}


def stage_demands(job: dict) -> list[tuple[str, dict, int]]:
    """(stage, resources of one worker or actor, how many) for each stage that uses the
    cluster. Missing (or null) options take the library's defaults."""
    demands = []
    if job.get("prepare") is not None:
        demands.append(("prepare", {"CPU": 1}, 1))  # Ray Data tasks: 1 CPU each
    if job.get("train") is not None:
        train = {f.name: f.default for f in fields(TrainConfig)} | _given(job["train"])
        bundle = {"CPU": train["cpus_per_worker"] or 1, "GPU": 1 if train["use_gpu"] else 0}
        demands.append(("train", bundle, int(train["num_workers"])))
    if job.get("score") is not None:
        score = _defaults(recommend) | _given(job["score"])
        bundle = {"CPU": score["cpus_per_actor"], "GPU": score["gpus_per_actor"] or 0}
        demands.append(("score", bundle, int(score["actors"])))
    return demands


def per_node(resources: dict, bundle: dict) -> int:
    """How many ``bundle``s fit on one node with ``resources``."""
    wanted = {k: v for k, v in bundle.items() if v > 0}
    if not wanted:
        return 0
    return min(math.floor(resources.get(k, 0) / v + 1e-9) for k, v in wanted.items())


def capacity(cfg: dict, bundle: dict) -> int:
    """Most bundles the cluster can place, within the global max_workers."""
    fits = sorted(((per_node(res, bundle), count, name == cfg["head_node_type"])
                   for name, (res, count) in node_resources(cfg).items()), reverse=True)
    total, workers_left = 0, cfg.get("max_workers", 0)
    for fit, count, is_head in fits:
        nodes = count if is_head else min(count, workers_left)
        workers_left -= 0 if is_head else nodes
        total += fit * nodes
    return total


def resource_problems(cfg: dict, job: dict, name: str) -> list[str]:
    problems = []
    for stage, bundle, count in stage_demands(job):
        cap = capacity(cfg, bundle)
        if cap < count:
            problems.append(f"{name}: {stage} asks for {count} x {bundle} per worker/actor; "
                            f"cluster.yaml's node types can place {cap}")
    return problems


def shared_mounts(cfg: dict) -> list[str]:
    """Host paths mounted into every container (docker -v SRC:DST -> DST)."""
    options = cfg.get("docker", {}).get("run_options", [])
    return [opt.split()[1].split(":")[1] for opt in options
            if opt.startswith("-v ") and ":" in opt]


# --------------------------------------------------------------------------------------------
# The real files


def test_cluster_yaml_matches_rays_schema(cluster):
    assert schema_errors(cluster) == []
    assert cluster["provider"]["type"] == "aws"


def test_only_ssh_is_reachable_from_outside(cluster):
    assert network_problems(cluster) == []
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    header = CLUSTER_PATH.read_text().split("\ncluster_name:")[0]
    assert "ray dashboard cluster.yaml" in header  # how to reach it, documented on top


def test_autoscaling_groups_idle_timeout_and_true_resources(cluster):
    assert autoscaling_problems(cluster) == []


def test_every_node_installs_the_package(cluster):
    assert install_problems(cluster) == []
    assert package_mounts(cluster)  # this repository is what gets installed


def test_images_carry_this_ray_version(cluster):
    assert image_problems(cluster) == []


def test_job_configs_were_found():
    assert CLUSTER_JOB in JOB_CONFIGS


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_stage_fits_on_the_cluster(cluster, path):
    job = load_yaml(path)
    assert resource_problems(cluster, job, path.name) == []


def test_cluster_job_config_is_gpu_and_uses_real_options(cluster):
    job = load_yaml(CLUSTER_JOB)
    stages = {stage: (bundle, count) for stage, bundle, count in stage_demands(job)}
    assert stages["train"][0]["GPU"] == 1 and stages["train"][1] > 1
    assert stages["score"][0]["GPU"] > 0
    # Every option is one the library takes, with a valid value.
    config = TrainConfig(**job["train"])
    assert config.storage_path and config.run_name
    assert set(job["score"]) <= set(_defaults(recommend)), set(job["score"]) - set(
        _defaults(recommend))
    assert set(job["evaluate"]) <= set(_defaults(evaluate))
    PrepareConfig(**job["prepare"], output=os.path.join(job["workdir"], "prepared"))
    assert job["prepare"]["input"].startswith("s3://")
    # What the stages write sits on the storage every node mounts.
    mounts = shared_mounts(cluster)
    for path in (job["workdir"], config.storage_path):
        assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (path, mounts)
    mount_cmds = " ".join(cluster["initialization_commands"])
    assert all(f" {m}" in mount_cmds for m in mounts)


# --------------------------------------------------------------------------------------------
# Each check fails on a broken copy


def _open_dashboard(cfg):
    cfg["provider"]["security_group"]["IpPermissions"] = [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]


def _dashboard_on_all_interfaces(cfg):
    cfg["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1",
                                                "--dashboard-host=0.0.0.0")
                                      for c in cfg["head_start_ray_commands"]]


def _no_gpu_nodes(cfg):
    cfg["available_node_types"] = {k: v for k, v in cfg["available_node_types"].items()
                                   if not v["resources"].get("GPU")}


def _two_gpu_nodes(cfg):
    for t in cfg["available_node_types"].values():
        if t["resources"].get("GPU"):
            t["max_workers"] = 2


def _small_gpu_nodes(cfg):
    for t in cfg["available_node_types"].values():
        if t["resources"].get("GPU"):
            t["resources"]["CPU"] = 2


def _no_setup(cfg):
    cfg["setup_commands"] = []


def _gpu_without_extra(cfg):
    for t in cfg["available_node_types"].values():
        if "worker_setup_commands" in t:
            t["worker_setup_commands"] = [c.replace("[gpu]", "")
                                          for c in t["worker_setup_commands"]]


def _gpu_string(cfg):
    next(iter(cfg["available_node_types"].values()))["resources"]["GPU"] = "one"


def _no_idle_timeout(cfg):
    del cfg["idle_timeout_minutes"]


def _more_gpus_than_hardware(cfg):
    for t in cfg["available_node_types"].values():
        if t["resources"].get("GPU"):
            t["resources"]["GPU"] = 4


def _old_image(cfg):
    cfg["docker"]["image"] = "rayproject/ray:2.9.0-py311-cpu"


BREAKS = [
    (_open_dashboard, network_problems, "8265"),
    (_dashboard_on_all_interfaces, network_problems, "0.0.0.0"),
    (_no_gpu_nodes, "resources", "train asks for 8"),
    (_two_gpu_nodes, "resources", "can place 2"),
    (_small_gpu_nodes, "resources", "train asks"),
    (_no_setup, install_problems, "do not pip install"),
    (_gpu_without_extra, install_problems, "[gpu] extra"),
    (_gpu_string, schema_errors, "resources/GPU"),
    (_no_idle_timeout, autoscaling_problems, "idle_timeout_minutes"),
    (_more_gpus_than_hardware, autoscaling_problems, "exceed g5"),
    (_old_image, image_problems, "2.9.0"),
]


@pytest.mark.parametrize("breaker, check, expected", BREAKS, ids=[b[0].__name__ for b in BREAKS])
def test_a_broken_copy_is_caught(cluster, breaker, check, expected):
    broken = copy.deepcopy(cluster)
    breaker(broken)
    if check == "resources":
        problems = resource_problems(broken, load_yaml(CLUSTER_JOB), CLUSTER_JOB.name)
        assert resource_problems(cluster, load_yaml(CLUSTER_JOB), CLUSTER_JOB.name) == []
    else:
        problems = check(broken)
        assert check(cluster) == []
    assert any(expected in p for p in problems), problems

