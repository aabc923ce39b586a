"""`make deploy-check` on the real tree passes; on a copy broken one way at a time it fails, naming the object.

Each breakage is one a person could make: a misspelled field, a consumer name KEDA would not find,
a serving pool without CPU requests, a setting the service does not have, ports that do not
match, a hand-edited training Job, a scaling policy that differs from the inference target, a
Dockerfile running as root. Everything here is offline: no cluster, no Docker engine.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tools.deploy_check import check_tree
from tools.deploy_check.run import write_training_jobs

ROOT = Path(__file__).resolve().parents[2]
Edit = Callable[[str, str, str], None]
BASE = "deploy/k8s/base"

BREAKAGES = {
    "bad-field": (f"{BASE}/registry/deployment.yaml", "  replicas: 2\n", "  replica: 2\n",
                  ["[prod] Deployment splitstack/registry", "'replica' was unexpected"]),
    "keda-crd-field": (f"{BASE}/converter/cpu/scaledobject.yaml", "  maxReplicaCount: 8\n", "  maxReplicas: 8\n",
                       ["[prod] ScaledObject splitstack/converter-cpu", "'maxReplicas' was unexpected"]),
    "wrong-consumer": (f"{BASE}/converter/t4-int8/scaledobject.yaml", "consumer: converter-t4-int8",
                       "consumer: converter-t4", ["[prod] ScaledObject splitstack/converter-t4-int8",
                                                  "'converter-t4' is not 'converter-t4-int8'"]),
    "wrong-stream": (f"{BASE}/converter/cpu/scaledobject.yaml", "stream: SPLITSTACK_MODELS", "stream: MODELS",
                     ["[prod] ScaledObject splitstack/converter-cpu", "stream 'MODELS' is not 'SPLITSTACK_MODELS'"]),
    "no-cpu-request": (f"{BASE}/serving/cpu/deployment.yaml", '            cpu: "2"\n', "",
                       ["[prod] Deployment splitstack/serving-cpu", "no CPU request"]),
    "unknown-env": (f"{BASE}/serving/cpu/configmap.yaml", "  SPLITSTACK_SERVING_MODELS: digits\n",
                    "  SPLITSTACK_SERVING_MODEL: digits\n",
                    ["[prod] Deployment splitstack/serving-cpu",
                     "SPLITSTACK_SERVING_MODEL is not a setting of serving"]),
    "bad-setting-value": (f"{BASE}/converter/cpu/configmap.yaml", 'SPLITSTACK_CONVERTER_CONCURRENCY: "1"',
                          'SPLITSTACK_CONVERTER_CONCURRENCY: "0"',
                          ["[prod] Deployment splitstack/converter-cpu", "CONCURRENCY must be > 0"]),
    "container-port": (f"{BASE}/serving/cpu/deployment.yaml", "containerPort: 8001", "containerPort: 8011",
                       ["[prod] Deployment splitstack/serving-cpu",
                        "containerPort grpc=8011 but SPLITSTACK_SERVING_GRPC_PORT=8001"]),
    "probe-port": (f"{BASE}/registry/deployment.yaml", "readinessProbe:\n          grpc:\n            port: 50051",
                   "readinessProbe:\n          grpc:\n            port: 9090",
                   ["[prod] Deployment splitstack/registry", "readinessProbe grpc port 9090"]),
    "service-port": (f"{BASE}/trainer/service.yaml", "targetPort: grpc", "targetPort: rpc",
                     ["[prod] Service splitstack/trainer", "targetPort rpc is not a container port of trainer"]),
    "peer-port": (f"{BASE}/trainer/configmap.yaml", "SPLITSTACK_REGISTRY_ADDR: registry:50051",
                  "SPLITSTACK_REGISTRY_ADDR: registry:5051",
                  ["[prod] Deployment splitstack/trainer", "Service registry has no port 5051"]),
    "hpa-policy": (f"{BASE}/serving/t4-int8/hpa.yaml", "maxReplicas: 50", "maxReplicas: 40",
                   ["[prod] HorizontalPodAutoscaler splitstack/serving-t4-int8",
                    "replicas 2..40, target t4-int8 says 2..50"]),
    "gpu-product": (f"{BASE}/converter/t4-int8/deployment.yaml", "nvidia.com/gpu.product: Tesla-T4",
                    "nvidia.com/gpu.product: NVIDIA-A10",
                    ["[prod] Deployment splitstack/converter-t4-int8", "needs 'Tesla-T4'"]),
    "drain-time": (f"{BASE}/serving/cpu/deployment.yaml", "terminationGracePeriodSeconds: 45",
                   "terminationGracePeriodSeconds: 20",
                   ["[prod] Deployment splitstack/serving-cpu", "not above the drain time 25 s"]),
    "rbac": (f"{BASE}/trainer/rbac.yaml", 'verbs: ["create", "get", "list", "delete"]', 'verbs: ["get", "list"]',
             ["[prod] Deployment splitstack/trainer", "may not create/delete jobs (batch)"]),
    "training-image": ("deploy/k8s/overlays/prod/trainer-config.yaml", "registry.example.com/splitstack/trainer:0.1.0",
                       "registry.example.com/splitstack/trainer:0.2.0",
                       ["[prod] Deployment splitstack/trainer", "not the controller's image"]),
}


def test_deploy_check_passes_on_the_tree_as_make_runs_it() -> None:
    result = subprocess.run([sys.executable, "-m", "tools.deploy_check"], cwd=ROOT, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert "ok: dev" in result.stdout and "prod" in result.stdout and "Dockerfiles linted" in result.stdout


def test_a_copy_of_the_tree_passes(tree: Path) -> None:
    problems, summary = check_tree(tree, lint=False)
    assert problems == [] and "prod 39 objects" in summary


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_a_broken_manifest_fails_naming_the_object(case: str, tree: Path, edit: Edit) -> None:
    path, old, new, expected = BREAKAGES[case]
    edit(path, old, new)
    problems, _ = check_tree(tree, ["prod"], lint=False)
    assert any(all(e in p for e in expected) for p in problems), "\n".join(problems)


def test_the_cli_exits_1_with_one_line_per_problem(tree: Path, edit: Edit) -> None:
    edit(f"{BASE}/converter/cpu/scaledobject.yaml", "consumer: converter-cpu", "consumer: converter")
    result = subprocess.run([sys.executable, "-m", "tools.deploy_check", "--root", str(tree), "--no-lint"],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert "deploy-check: [dev] ScaledObject splitstack-dev/converter-cpu: nats-jetstream consumer 'converter'" \
           in "\n".join(lines)
    assert any(line.startswith("deploy-check: [prod] ScaledObject splitstack/converter-cpu") for line in lines)
    assert lines[-1].startswith("deploy-check: FAILED, 2 problem(s)")


def test_the_training_job_must_be_the_trainers_own_rendering(tree: Path, edit: Edit) -> None:
    edit("deploy/k8s/overlays/prod/training-job.yaml", "completions: 32", "completions: 16")
    problems, _ = check_tree(tree, ["prod"], lint=False)
    assert any(p.startswith("[prod] Job splitstack/train-example: ") and "render_training_job" in p
               for p in problems), problems
    # Regenerated from the trainer's function, it passes again.
    assert write_training_jobs(tree, ["prod"]) == [tree / "deploy/k8s/overlays/prod/training-job.yaml"]
    assert check_tree(tree, ["prod"], lint=False)[0] == []


def test_a_training_profile_change_shows_in_the_job(tree: Path, edit: Edit) -> None:
    edit(f"{BASE}/trainer/configmap.yaml", "SPLITSTACK_TRAINER_DEFAULT_PROFILE: a100-bf16",
         "SPLITSTACK_TRAINER_DEFAULT_PROFILE: cpu-ddp2")
    problems, _ = check_tree(tree, ["prod"], lint=False)
    assert any("Job splitstack/train-example" in p and "from profile cpu-ddp2" in p for p in problems), problems


def test_an_image_without_a_dockerfile_fails(tree: Path) -> None:
    (tree / "services/serving/Dockerfile.gpu").unlink()
    problems, _ = check_tree(tree, ["prod"], lint=False)
    assert any(p.startswith("[prod] Deployment splitstack/serving-t4-int8: ") and "services/serving/Dockerfile.gpu" in p
               for p in problems), problems


def test_dockerfiles_are_linted(tree: Path, edit: Edit) -> None:
    edit("services/registry/Dockerfile", "USER 10001\n", "USER root\n")
    edit("services/serving/Dockerfile", "WORKDIR /var/lib/splitstack\n",
         "WORKDIR /var/lib/splitstack\nRUN cd /tmp && touch x\n")
    problems, _ = check_tree(tree, ["dev"], lint=True)
    assert "services/registry/Dockerfile: the last USER must be a non-root user" in problems
    assert any(p.startswith("services/registry/Dockerfile:") and "DL3002" in p for p in problems), problems
    assert any(p.startswith("services/serving/Dockerfile:") and "DL3003" in p for p in problems), problems
