"""The cluster configs: launcher YAMLs through Ray's own validator and autoscaler bin packing
(no cloud credentials), KubeRay manifests against the fields KubeRay requires."""

from __future__ import annotations

import copy
import functools
import re
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import (
    _default_utilization_scorer,
    get_nodes_for,
)
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import get_preset
from pipeline.data.prepare.run import TASK_CPUS

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
HEAD, CPU_TYPE, GPU_TYPE = "head", "cpu_spot", "gpu"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_up_config(name: str) -> dict:
    """What `ray up` validates: the file merged with the provider's defaults, then checked
    against ray-schema.json (the provider bootstrap after it is what needs credentials)."""
    config = prepare_config(copy.deepcopy(_load(name)))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_rays_validation(name):
    config = _ray_up_config(name)
    assert config["provider"]["type"] == name.removesuffix(".yaml")
    assert set(config["available_node_types"]) == {HEAD, CPU_TYPE, GPU_TYPE}
    assert config["head_node_type"] == HEAD


def test_rays_validator_rejects_a_misspelt_field():
    # The check above means something only if the validator catches mistakes.
    config = _load("aws.yaml")
    config["available_node_types"][GPU_TYPE]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_node_types_scale_from_zero(name):
    config = _ray_up_config(name)
    types = config["available_node_types"]
    assert types[HEAD]["resources"] == {"CPU": 0}  # the head runs no tasks
    cpu, gpu = types[CPU_TYPE], types[GPU_TYPE]
    assert cpu["min_workers"] == 0 and cpu["max_workers"] > 0
    assert "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] > 0
    assert gpu["min_workers"] == 0 and gpu["max_workers"] > 0
    assert gpu["resources"]["GPU"] == 8
    assert cpu["max_workers"] + gpu["max_workers"] <= config["max_workers"]


def _image_cuda(image: str) -> str:
    """The torch build an image tag names: REGISTRY/clip-pipeline:2.60.0-cu128 -> cu128."""
    return image.rsplit(":", 1)[1].rsplit("-", 1)[1]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_every_node_runs_the_image_built_from_the_dockerfile(name):
    raw = _load(name)
    docker = raw["docker"]
    # One image for the head and every worker type: no per-type or head/worker override.
    assert set(docker) == {"image", "container_name", "pull_before_run", "run_options"}
    assert all("docker" not in t for t in raw["available_node_types"].values())
    image = docker["image"]
    assert image.rsplit(":", 1)[0].endswith("/clip-pipeline"), image
    # The tag names the Ray it holds (the one that submits to it: `ray up` refuses a mismatch
    # halfway) and the torch build, the Dockerfile's default.
    assert image.rsplit(":", 1)[1] == f"{ray.__version__}-{_default_build()['cuda']}"
    assert (
        image
        == _load("kuberay/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"][
            "containers"
        ][0]["image"]
    )
    # Nothing installed per node: the image holds every dependency.
    commands = [
        *raw["initialization_commands"],
        *raw["setup_commands"],
        *raw["head_setup_commands"],
        *raw["worker_setup_commands"],
    ]
    assert not [c for c in commands if "pip install" in c], commands
    config = _ray_up_config(name)  # Ray's defaults merged in: still one image everywhere
    for node_type in config["available_node_types"].values():
        assert node_type.get("docker", {}).get("worker_image", image) == image


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_runs_need_no_shared_mount_and_workers_reach_the_bucket(name):
    raw = _load(name)
    text = (CLUSTER / name).read_text()
    # The shared mount is an option in comments only: nothing mounts or binds /mnt/shared.
    live = [line for line in text.splitlines() if "/mnt/shared" in line.split("#", 1)[0]]
    assert live == []
    assert raw["initialization_commands"] == []
    assert not any("/mnt" in option for option in raw["docker"]["run_options"])
    # Code comes in the image (and per job with --working-dir), not as a file mount.
    assert set(raw["file_mounts"]) == {"~/.ray/auth_token"}
    for node_type in (CPU_TYPE, GPU_TYPE):
        node = raw["available_node_types"][node_type]["node_config"]
        if name == "aws.yaml":  # an instance profile whose role holds the bucket's access
            assert node["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
        else:  # a service account with the cloud-platform scope (its IAM roles decide)
            (account,) = node["serviceAccounts"]
            assert account["email"].endswith(".iam.gserviceaccount.com")
            assert account["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"]


def test_cpu_workers_are_spot():
    aws = _load("aws.yaml")["available_node_types"]
    assert aws[CPU_TYPE]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    gcp = _load("gcp.yaml")["available_node_types"]
    for node_type in (CPU_TYPE, GPU_TYPE):
        # GCE's Scheduling is one object; a list of one-key objects is refused at launch.
        assert isinstance(gcp[node_type]["node_config"]["scheduling"], dict)
    assert gcp[CPU_TYPE]["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
    assert gcp[GPU_TYPE]["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


def _nodes_launched_for(config: dict, demands: list[dict]) -> dict[str, int]:
    """Ray's autoscaler bin packing: which node types it adds for these resource requests."""
    scorer = functools.partial(
        _default_utilization_scorer,
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}),
    )
    to_add, unfulfilled = get_nodes_for(
        config["available_node_types"],
        {},
        config["head_node_type"],
        config["max_workers"],
        demands,
        scorer,
    )
    assert unfulfilled == [], f"no node type fits {unfulfilled}"
    return dict(to_add)


@pytest.fixture(scope="module")
def datacomp_worker_requests(tmp_path_factory) -> list[dict]:
    """What datacomp-small's trainer asks Ray for: its real ScalingConfig (no Ray started)."""
    from pipeline.train.loop import build_trainer

    train = get_preset("datacomp-small").train
    storage = tmp_path_factory.mktemp("storage")
    scaling = build_trainer(train, storage / "shards", 1_000_000, storage).scaling_config
    assert scaling.use_gpu
    return [dict(scaling.resources_per_worker)] * scaling.num_workers


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_autoscaler_adds_cpu_nodes_for_data_and_gpu_nodes_for_training(
    name, datacomp_worker_requests
):
    config = _ray_up_config(name)
    # prepare's requests (tests/e2e/test_cluster_multinode.py reads them back from Ray):
    # a task per input shard, TASK_CPUS each; the dedup step's finalizing tasks 0.25.
    data = [{"CPU": TASK_CPUS}] * 8 + [{"CPU": 0.25}] * 8
    assert set(_nodes_launched_for(config, data)) == {CPU_TYPE}

    assert all(r["GPU"] == 1 for r in datacomp_worker_requests), datacomp_worker_requests
    # All 8 workers on one GPU node: gradients all-reduce over NVLink, not the network.
    assert _nodes_launched_for(config, datacomp_worker_requests) == {GPU_TYPE: 1}


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_start_commands_lock_the_cluster_down(name):
    config = _load(name)
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head + workers
    assert "--num-cpus=0" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    # Token authentication on every node, with the token shipped to every node.
    for command in (head, workers):
        assert re.search(r"RAY_AUTH_MODE=token ray start", command), command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--address=$RAY_HEAD_IP:6379" in workers and "--port=6379" in head


def test_aws_and_gcp_describe_the_same_cluster():
    aws, gcp = _load("aws.yaml"), _load("gcp.yaml")
    for key in ("max_workers", "idle_timeout_minutes", "file_mounts", "setup_commands", "docker"):
        assert aws[key] == gcp[key], key
    assert aws["head_start_ray_commands"] == gcp["head_start_ray_commands"]
    assert aws["worker_start_ray_commands"] == gcp["worker_start_ray_commands"]
    for node_type in (HEAD, CPU_TYPE, GPU_TYPE):
        a, g = aws["available_node_types"][node_type], gcp["available_node_types"][node_type]
        assert a["resources"] == g["resources"], node_type
        assert a.get("min_workers") == g.get("min_workers"), node_type
        assert a.get("max_workers") == g.get("max_workers"), node_type


# ---------------------------------------------------------------------------------- KubeRay


def _check_group(group: dict, head: bool) -> list[dict]:
    assert isinstance(group["rayStartParams"], dict)
    containers = group["template"]["spec"]["containers"]
    ray_container = containers[0]  # KubeRay starts Ray in the first container
    assert ray_container["name"] and ray_container["image"]
    for kind in ("requests", "limits"):
        assert ray_container["resources"][kind]["cpu"], kind
        assert ray_container["resources"][kind]["memory"], kind
    # Runs live on a bucket: no pod mounts a shared volume (shared-pvc.yaml is an option)...
    volumes = group["template"]["spec"].get("volumes", [])
    assert not [v for v in volumes if "persistentVolumeClaim" in v], volumes
    mounts = {m["mountPath"] for m in ray_container.get("volumeMounts", [])}
    assert mounts <= {"/dev/shm"}, mounts
    # ...and every pod reaches it as one service account, bound to the bucket's access.
    assert group["template"]["spec"]["serviceAccountName"] == _service_account()
    # Every pod runs the image built from the Dockerfile, with its default torch build.
    assert _image_cuda(ray_container["image"]) == _default_build()["cuda"]
    if not head:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    return containers


def _check_cluster_spec(spec: dict) -> dict[str, dict]:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    _check_group(head, head=True)
    assert head["rayStartParams"]["num-cpus"] == "0"
    # Not exposed outside the Kubernetes cluster: no LoadBalancer, NodePort or Ingress.
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert len(groups) == len(spec["workerGroupSpecs"])
    for group in groups.values():
        _check_group(group, head=False)
    return groups


def test_raycluster_has_autoscaling_cpu_spot_and_gpu_groups():
    manifest = _load("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    groups = _check_cluster_spec(manifest["spec"])
    assert set(groups) == {"cpu-spot", "gpu"}
    cpu_pod = groups["cpu-spot"]["template"]["spec"]
    assert cpu_pod["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "8"
    for group in groups.values():
        assert group["minReplicas"] == 0  # both scale from zero pods


def test_rayjob_runs_pretrain_on_the_same_cluster():
    manifest = _load("kuberay/rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[:2] == ["python", "/home/ray/clip-pipeline/jobs/pretrain.py"]
    # Run dir, URL list and eval set on a bucket: no pod needs a shared file system.
    for flag in ("--run-dir", "--input", "--eval-dataset"):
        assert re.match(r"(s3|gs)://[^/]+/", entrypoint[entrypoint.index(flag) + 1]), flag
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"])
    # One cluster definition in two files: they must not drift apart.
    assert spec["rayClusterSpec"] == _load("kuberay/raycluster.yaml")["spec"]


def _service_account() -> str:
    account = _load("kuberay/serviceaccount.yaml")
    assert account["apiVersion"] == "v1" and account["kind"] == "ServiceAccount"
    return account["metadata"]["name"]


def _dockerfile_args() -> dict[str, str]:
    text = (CLUSTER / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


def _constraints(path: Path) -> dict[str, str]:
    """{index, torch, torchvision, cuda} of a constraints file; pins are `name==version`."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    index = [line.split()[1] for line in lines if line.startswith("--extra-index-url")]
    pins = dict(line.split("==") for line in lines if "==" in line)
    assert len(index) == 1 and set(pins) == {"torch", "torchvision"}, lines
    return {"index": index[0], **pins, "cuda": index[0].rstrip("/").rsplit("/", 1)[1]}


def _default_build() -> dict[str, str]:
    args = _dockerfile_args()
    return _constraints(CLUSTER.parent / args["TORCH_CONSTRAINTS"])


def test_dockerfile_installs_the_project_with_pinned_torch():
    # The Dockerfile puts the project where the RayJob's entrypoint looks for it.
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/clip-pipeline" in dockerfile
    assert re.search(r"^COPY .* jobs \./jobs$", dockerfile, re.M)
    assert re.search(r"^COPY .* cluster \./cluster$", dockerfile, re.M)  # the constraints
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    # One pip install, under the torch constraints, with the S3/GCS file systems.
    (install,) = re.findall(r"^RUN pip install .*$", dockerfile, re.M)
    assert "-c ${TORCH_CONSTRAINTS}" in install and '".[cloud]"' in install
    cloud = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]
    assert {"s3fs", "gcsfs"} <= set(cloud["optional-dependencies"]["cloud"])
    # The base image's CUDA is the torch build's: rayproject/ray:2.60.0-py311-cu128 with
    # torch==X+cu128 from download.pytorch.org/whl/cu128.
    base = _dockerfile_args()["BASE_IMAGE"]
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311-"), base
    build = _default_build()
    assert base.rsplit("-", 1)[1] == build["cuda"]


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("constraints-*.txt")), ids=lambda p: p.name)
def test_torch_pins_name_one_build(path):
    build = _constraints(path)
    assert path.name == f"constraints-{build['cuda']}.txt"
    assert build["index"] == f"https://download.pytorch.org/whl/{build['cuda']}"
    torch_version, torch_build = build["torch"].split("+")
    vision_version, vision_build = build["torchvision"].split("+")
    assert torch_build == vision_build == build["cuda"]
    # torchvision 0.(N+15).P is the release built against torch 2.N.P.
    major, minor, patch = (int(x) for x in torch_version.split("."))
    assert major == 2 and vision_version == f"0.{minor + 15}.{patch}"


def test_all_constraints_pin_the_same_torch():
    builds = [_constraints(p) for p in sorted(CLUSTER.glob("constraints-*.txt"))]
    assert {b["cuda"] for b in builds} >= {"cpu", _default_build()["cuda"]}
    assert len({b["torch"].split("+")[0] for b in builds}) == 1
    assert len({b["torchvision"].split("+")[0] for b in builds}) == 1


def test_shared_volume_stays_an_option():
    claim = _load("kuberay/shared-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_runtime_env_ships_code_not_run_data(tmp_path):
    """Ray's own packaging of a working dir with runtime_env.yaml's excludes, no .gitignore."""
    from ray._private.runtime_env.packaging import create_package

    runtime_env = _load("runtime_env.yaml")
    assert "working_dir" not in runtime_env  # given by --working-dir on the command line
    tree = tmp_path / "checkout"
    for path in (
        "jobs/pretrain.py",
        "pipeline/train/loop.py",
        "runs/tiny/data/shards/part-00000.parquet",
        "runs/tiny/train/checkpoint_000001/state.pt",
        "pipeline/__pycache__/train.cpython-311.pyc",
        ".git/HEAD",
    ):
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text("x")
    package = tmp_path / "package.zip"
    create_package(str(tree), package, include_gitignore=True, excludes=runtime_env["excludes"])
    with zipfile.ZipFile(package) as archive:
        shipped = sorted(archive.namelist())
    assert shipped == ["jobs/pretrain.py", "pipeline/train/loop.py"]
