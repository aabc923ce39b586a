"""JobConfig: everything a job process needs, as one JSON document on its command line.

The trainer builds it once at submit time (dataset version and digest pinned, defaults filled in)
and every rank of every attempt runs `python -m splitstack_trainer.job --config-json '<JobConfig>'`
(the local executor and the pod of an Indexed Job alike). Paths are where the executor's
processes see them: the trainer's work directory locally, the shared volume on Kubernetes.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from splitstack.common.v1 import common_pb2
from splitstack.registry.v1 import registry_pb2

JOB_MODULE = "splitstack_trainer.job"
CONFIG_FLAG = "--config-json"
SUPERVISOR_ENV = "SPLITSTACK_JOB_SUPERVISOR_PID"   # set by the local executor: die with that process
FAILURE_PREFIX = "job failed: "                      # a failed rank's last stderr line starts with this
LAST_CHECKPOINT = "last.ckpt"                        # under checkpoint_dir, written after every epoch
RESULT_FILE = "result.json"                          # under outputs_dir, written last: outputs complete
# Every rank's interpreter, local or in a pod: the current directory is never on the import path
# (`python -m` would put it first), output unbuffered, no bytecode written next to the code.
JOB_PYTHON_ENV = {"PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
TRANSIENT_EXIT_STATUS = 75                           # EX_TEMPFAIL: the rank gave up on an unreachable peer


@dataclass(frozen=True)
class JobConfig:
    """One job's immutable instructions to its ranks."""

    job_id: str
    model: str
    module: str
    datamodule: str
    module_hparams: dict[str, Any]
    datamodule_hparams: dict[str, Any]
    profile: dict[str, Any]                  # TrainingProfile as JSON
    max_epochs: int
    seed: int
    dataset: str
    dataset_version: int
    dataset_sha256: str
    dataset_size: int
    dataset_path: str                        # where the verified .npz is (or is downloaded to)
    work_dir: str                            # checkpoints/, outputs/ of this job (shared by attempts)
    required_targets: list[str]
    primary_metric: dict[str, Any]
    promotion_policy: dict[str, Any] | None
    parent_version: int
    code_version: str
    recipe: str = ""
    progress_interval_seconds: float = 1.0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    peer_retry_seconds: float = 120.0        # how long calls to the registry ride out its unavailability

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        return cls(**json.loads(text))

    def argv(self, python: str) -> list[str]:
        """The job command: the same for a local rank and a pod."""
        return [python, "-m", JOB_MODULE, CONFIG_FLAG, self.to_json()]

    # ---- typed views --------------------------------------------------------------------------

    @property
    def training_profile(self) -> common_pb2.TrainingProfile:
        return json_format.ParseDict(self.profile, common_pb2.TrainingProfile())

    @property
    def primary(self) -> common_pb2.PrimaryMetric:
        return json_format.ParseDict(self.primary_metric, common_pb2.PrimaryMetric())

    @property
    def policy(self) -> registry_pb2.PromotionPolicy | None:
        if self.promotion_policy is None:
            return None
        return json_format.ParseDict(self.promotion_policy, registry_pb2.PromotionPolicy())

    @property
    def world_size(self) -> int:
        profile = self.training_profile
        return profile.nodes * profile.devices

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.work_dir) / "checkpoints"

    @property
    def outputs_dir(self) -> Path:
        return Path(self.work_dir) / "outputs"


def message_json(message: Any) -> dict[str, Any]:
    """A protobuf message as the JSON dict JobConfig stores."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def code_version(configured: str = "") -> str:
    """The code version recorded in lineage: `configured` if set, else the trainer package's version."""
    if configured:
        return configured
    try:
        return f"splitstack-trainer {importlib.metadata.version('splitstack-trainer')}"
    except importlib.metadata.PackageNotFoundError:
        return "splitstack-trainer (unpackaged)"
