"""Deployment files in infra/: valid, complete, consistent with each other and the code."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
IMAGE_NAME = "wham-batch"


def load_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} has no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def nightly_template(docs: list[dict[str, Any]], run_date: str = "2026-11-30") -> dict[str, Any]:
    text = one(docs, "ConfigMap")["data"]["rayjob.yaml"]
    return yaml.safe_load(text.replace("__RUN_DATE__", run_date))


def containers(obj: Any) -> list[dict[str, Any]]:
    """Every container spec anywhere in a manifest (pod templates nest at many depths)."""
    found = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += value
            else:
                found += containers(value)
    elif isinstance(obj, list):
        for item in obj:
            found += containers(item)
    return found


def image_workdir() -> str:
    return re.search(r"^WORKDIR (\S+)", (INFRA / "Dockerfile").read_text(), re.MULTILINE)[1]


def check_entrypoint(command: str, module: str) -> list[str]:
    """`[cd WORKDIR &&] python -m MODULE CONFIG ...`: the module is importable and the
    config is in the repository (so in the image's WORKDIR)."""
    args = shlex.split(command)
    if args[0] == "cd":
        assert args[1:3] == [image_workdir(), "&&"], f"{command}: not the image's WORKDIR"
        args = args[3:]
    assert args[:3] == ["python", "-m", module], command
    assert importlib.util.find_spec(module) is not None, f"{module} is not importable"
    config = args[args.index("--config") + 1] if "--config" in args else args[3]
    assert (ROOT / config).is_file(), f"entrypoint config {config} is not in the repository"
    return args


def all_manifests() -> list[Path]:
    return sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])


def test_there_are_manifests() -> None:
    names = {p.relative_to(INFRA).as_posix() for p in all_manifests()}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/nightly-cronjob.yaml",
            "aws/cluster.yaml", "local/docker-compose.yaml"} <= names


@pytest.mark.parametrize("path", all_manifests(), ids=lambda p: p.relative_to(INFRA).as_posix())
def test_manifest_is_valid_yaml(path: Path) -> None:
    docs = load_docs(path)
    if path.parent == KUBERAY:
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion/kind missing"
            name = doc.get("metadata", {}).get("name", "")
            assert DNS_1123.match(name), f"{path}: bad metadata.name {name!r}"


def test_raycluster_has_cpu_head_and_gpu_workers() -> None:
    docs = load_docs(KUBERAY / "raycluster.yaml")
    cluster = one(docs, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]
    head_res = containers(head)[0]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {})
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = cluster["spec"]["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in containers(g)[0]["resources"]["limits"]]
    assert gpu, "no GPU worker group"
    for group in gpu:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # The pods' service account (the IRSA role for S3) is defined in the same file.
    accounts = {d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")}
    assert head["template"]["spec"]["serviceAccountName"] in accounts
    assert all(g["template"]["spec"]["serviceAccountName"] in accounts for g in groups)


def _cluster_name() -> str:
    return one(load_docs(KUBERAY / "raycluster.yaml"), "RayCluster")["metadata"]["name"]


def test_rayjob_runs_a_shipped_config_on_the_cluster() -> None:
    job = one(load_docs(KUBERAY / "rayjob.yaml"), "RayJob")
    check_entrypoint(job["spec"]["entrypoint"], "jobs.run")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == _cluster_name()
    assert job["spec"]["activeDeadlineSeconds"] > 0


def test_nightly_cronjob_creates_a_dated_rayjob_with_rbac() -> None:
    docs = load_docs(KUBERAY / "nightly-cronjob.yaml")
    cron = one(docs, "CronJob")
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5, "schedule must be a 5-field cron expression"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert account in {d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")}
    role = one(docs, "Role")
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    rules = [r for r in role["rules"] if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]]
    assert rules and "create" in rules[0]["verbs"]
    assert not any("secrets" in r["resources"] for r in role["rules"])
    # The mounted template is the ConfigMap in this file and renders to a valid RayJob.
    volume = pod["volumes"][0]["configMap"]["name"]
    assert volume == one(docs, "ConfigMap")["metadata"]["name"]
    job = nightly_template(docs)
    assert job["kind"] == "RayJob" and DNS_1123.match(job["metadata"]["name"])
    args = check_entrypoint(job["spec"]["entrypoint"], "jobs.nightly")
    assert args[args.index("--date") + 1] == "2026-11-30"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == _cluster_name()
    # The scheduler script is valid shell.
    script = containers(cron)[0]["args"][0]
    subprocess.run(["sh", "-n", "-c", script], check=True, timeout=10)
    assert "__RUN_DATE__" in script and "date -u +%Y-%m-%d" in script


def test_nightly_template_date_matches_the_job_date_format() -> None:
    from jobs.nightly import resolve_date

    docs = load_docs(KUBERAY / "nightly-cronjob.yaml")
    job = nightly_template(docs, "2027-01-02")
    args = shlex.split(job["spec"]["entrypoint"])
    assert resolve_date(args[args.index("--date") + 1]) == dt.date(2027, 1, 2)


def test_aws_cluster_launcher_config() -> None:
    (config,) = load_docs(INFRA / "aws" / "cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "docker", "max_workers"):
        assert key in config, f"aws/cluster.yaml: {key} missing"
    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    for name, node in nodes.items():
        assert node["node_config"]["InstanceType"], name
        assert "IamInstanceProfile" in node["node_config"], f"{name}: no instance profile"
    workers = [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert any(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in workers)
    assert sum(n.get("max_workers", 0) for n in workers) <= config["max_workers"]


def test_local_compose_has_minio_and_bucket_creation() -> None:
    (compose,) = load_docs(INFRA / "local" / "docker-compose.yaml")
    services = compose["services"]
    assert "minio" in services and "create-bucket" in services
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for port in services["minio"]["ports"]:
        assert str(port).startswith("127.0.0.1:"), f"{port} is not bound to loopback"
    # Credentials come from the user's shell: no literal password in the file.
    env = services["minio"]["environment"]
    assert env["MINIO_ROOT_PASSWORD"].startswith("${")


def _our_images() -> dict[str, str]:
    images = {}
    for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml",
                 KUBERAY / "nightly-cronjob.yaml"):
        docs = load_docs(path)
        if path.name == "nightly-cronjob.yaml":
            docs = [*docs, nightly_template(docs)]
        for i, container in enumerate(containers(docs)):
            if IMAGE_NAME in container["image"]:
                images[f"{path.name}:{container['name']}:{i}"] = container["image"]
    (aws,) = load_docs(INFRA / "aws" / "cluster.yaml")
    images["aws/cluster.yaml"] = aws["docker"]["image"]
    return images


def test_image_names_are_consistent() -> None:
    images = _our_images()
    assert len(images) >= 5, images
    assert len(set(images.values())) == 1, f"different images: {images}"
    image = next(iter(images.values()))
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"-t {image} " in dockerfile, "Dockerfile's build command tags another image"
    readme = (INFRA / "README.md").read_text()
    assert f"-t {image} " in readme


def test_dockerfile_installs_package_gpu_extra_and_runs_jobs() -> None:
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.MULTILINE)
    assert base and "cuda" in base.group(1)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.MULTILINE)
    runs = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", text, re.MULTILINE | re.DOTALL))
    assert 'pip install ".[gpu]"' in runs
    assert "flash-attn" in runs and "--no-build-isolation" in runs
    for src in re.findall(r"^COPY (\S+) ", text, re.MULTILINE):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    for package in ("pipeline", "workers", "jobs", "configs"):
        assert re.search(rf"^COPY {package} ", text, re.MULTILINE), f"{package} not copied"
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))
    check_entrypoint(shlex.join(cmd), "jobs.run")
    # No credentials baked into the image.
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)", text)


def test_no_credentials_in_manifests() -> None:
    for path in all_manifests():
        # Comments may explain where credentials come from; the data must not set any.
        text = "\n".join(line.split(" #")[0] for line in path.read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)", text), path
        for doc in load_docs(path):
            for container in containers(doc):
                for env in container.get("env", []):
                    if env["name"] == "RAY_AUTH_TOKEN":
                        assert "value" not in env and "secretKeyRef" in env["valueFrom"], path


def test_s3_policy_is_valid_and_in_the_readme() -> None:
    policy = json.loads((INFRA / "aws" / "s3-policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject"} <= actions
    assert "s3:*" not in actions and all(s["Effect"] == "Allow" for s in policy["Statement"])
    readme = (INFRA / "README.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", readme, re.DOTALL)
    assert any(json.loads(b) == policy for b in blocks), "README policy differs from the file"
