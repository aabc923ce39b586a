"""One rank of a training job, from its JobConfig to a registered model version.

1. (In __main__, before anything heavy loads) follow the supervisor: a local job dies with the
   trainer that started it (supervisor.py); pods are watched by Kubernetes.
2. Outputs complete from an earlier attempt? Then only register them (step 6).
3. The dataset version: the file at `dataset_path` if its SHA-256 is the pinned one, else
   downloaded from the registry and digest-checked.
4. Build the user's LightningModule and LightningDataModule from their import paths with the
   bound hyperparameters; the data module gets `dataset_path` and the profile's `batch_size`.
5. `Trainer` with the profile's accelerator, devices, nodes (DDP when more than one rank; the
   ranks find each other through MASTER_ADDR/MASTER_PORT/NODE_RANK/WORLD_SIZE), precision and
   batch size; a checkpoint after every epoch (resumed from when one exists); progress from rank
   zero. Then a final validation, the final checkpoint (every rank takes part), and on rank
   zero the outputs (outputs.py).
6. Rank zero registers the outputs through the registry API (register.py).

Registry calls ride out a registry restart for the JobConfig's `peer_retry_seconds` (every call
is idempotent: CreateVersion is keyed by the job id, which every attempt of the job shares).

Exit status 0 when the rank did its part; otherwise a last stderr line `job failed: <reason>`
(the local executor reports it as the job's error) and status 75 (`TRANSIENT_EXIT_STATUS`) when
a peer stayed unreachable — a new attempt may succeed — or 1 when retrying cannot help.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import grpc
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from splitstack.chassis import logs
from splitstack.chassis.errors import DomainError
from splitstack.chassis.retry import RetryBudget, is_transient
from splitstack.common.v1 import common_pb2
from splitstack_trainer.config import load_job_environment
from splitstack_trainer.job.bridge import PlatformBridge
from splitstack_trainer.job.outputs import JobOutputs, example_input, write_outputs
from splitstack_trainer.job.progress import ProgressReporter
from splitstack_trainer.job.register import register
from splitstack_trainer.jobconfig import (CONFIG_FLAG, FAILURE_PREFIX, LAST_CHECKPOINT, TRANSIENT_EXIT_STATUS,
                                          JobConfig)
from splitstack_trainer.registry_client import RegistryClient, sha256_of
from splitstack_trainer.specs import load_class

log = logging.getLogger(__name__)

FINAL_CHECKPOINT = "final.ckpt"


class JobFailed(Exception):
    """The job cannot go on; the message says why."""


def is_rank_zero() -> bool:
    return int(os.environ.get("NODE_RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def check_rank_environment(config: JobConfig) -> None:
    """A multi-rank job needs the rendezvous variables an Indexed Job (or the local executor) sets."""
    if config.world_size == 1:
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if not os.environ.get(v)]
    if missing:
        raise JobFailed(f"a {config.world_size}-rank job needs {', '.join(missing)} in its environment")
    declared = os.environ.get("WORLD_SIZE")
    if declared and int(declared) != config.world_size:
        raise JobFailed(f"WORLD_SIZE={declared} but the profile has {config.world_size} ranks")


def ensure_dataset(config: JobConfig, bridge: PlatformBridge) -> Path:
    """The pinned dataset version as a local, digest-checked file."""
    path = Path(config.dataset_path)
    if path.is_file() and sha256_of(path) == config.dataset_sha256:
        return path
    registry = peer_registry(bridge, config)
    record = bridge.call(lambda: registry.dataset_version(config.dataset, config.dataset_version))
    if record.sha256 != config.dataset_sha256:
        raise JobFailed(f"dataset {config.dataset} version {config.dataset_version} now has sha256 {record.sha256}, "
                        f"the job was submitted for {config.dataset_sha256}")
    bridge.call(lambda: registry.download_dataset(record, path))
    return path


def peer_registry(bridge: PlatformBridge, config: JobConfig) -> RegistryClient:
    """The registry client of this job: transient failures retried for the job's budget."""
    return bridge.registry.retrying(RetryBudget(total_seconds=config.peer_retry_seconds))


def build_trainer(config: JobConfig, reporter: ProgressReporter) -> L.Trainer:
    profile = config.training_profile
    checkpoints = ModelCheckpoint(dirpath=config.checkpoint_dir, filename="epoch-{epoch}", auto_insert_metric_name=False, save_top_k=1,
                                  save_last=True, every_n_epochs=1, enable_version_counter=False)
    return L.Trainer(
        accelerator="gpu" if profile.accelerator == common_pb2.GPU else "cpu", devices=profile.devices,
        num_nodes=profile.nodes, strategy="ddp" if config.world_size > 1 else "auto", precision=profile.precision,
        max_epochs=config.max_epochs, callbacks=[reporter, checkpoints], logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=config.work_dir)


def train(config: JobConfig, dataset: Path, reporter: ProgressReporter, outputs: JobOutputs) -> None:
    """Fit (resuming from the last checkpoint), validate, checkpoint; rank zero writes the outputs."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    module_cls = load_class("module", config.module, "lightning.pytorch:LightningModule")
    datamodule_cls = load_class("datamodule", config.datamodule, "lightning.pytorch:LightningDataModule")
    module = module_cls(**config.module_hparams)
    datamodule = datamodule_cls(dataset_path=str(dataset), batch_size=config.training_profile.batch_size,
                                **config.datamodule_hparams)
    trainer = build_trainer(config, reporter)
    last = config.checkpoint_dir / LAST_CHECKPOINT
    resume = str(last) if last.is_file() else None
    reporter.report("fit", f"resuming from checkpoint {last}" if resume else "training from scratch")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    reporter.report("validate", "final validation")
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    final = config.checkpoint_dir / FINAL_CHECKPOINT
    trainer.save_checkpoint(final, weights_only=False)
    if not trainer.is_global_zero:
        return
    reporter.report("export", "exporting the program and the sample")
    metrics = {name.removeprefix("val_"): float(value) for name, value in (results[0] if results else {}).items()}
    trained = module_cls(**config.module_hparams)
    trained.load_state_dict(module.state_dict())
    write_outputs(outputs, final, trained, datamodule, example_input(module, datamodule),
                  {"metrics": metrics, "world_size": trainer.world_size, "epochs": trainer.current_epoch,
                   "precision": config.training_profile.precision})


def run(config: JobConfig, bridge: PlatformBridge, reporter: ProgressReporter) -> None:
    outputs = JobOutputs(config.outputs_dir)
    if outputs.complete:
        reporter.report("register", "outputs of an earlier attempt are complete; registering them")
    else:
        dataset = ensure_dataset(config, bridge)
        reporter.report("fit", f"dataset {config.dataset} version {config.dataset_version} ready (sha256 verified)")
        train(config, dataset, reporter, outputs)
    if not is_rank_zero():
        return
    reporter.report("register", "registering the version")
    registry = peer_registry(bridge, config)
    version = bridge.call(lambda: register(registry, config, outputs))
    reporter.report("register", f"registered {config.model} version {version.version}")


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitstack_trainer.job", description=__doc__.splitlines()[0])
    parser.add_argument(CONFIG_FLAG, dest="config_json", required=True, help="the JobConfig as JSON")
    args = parser.parse_args(argv)
    logs.configure_logging(os.environ.get("SPLITSTACK_JOB_LOG_LEVEL", "INFO"))
    quiet_libraries()
    config = JobConfig.from_json(args.config_json)
    try:
        check_rank_environment(config)
        with PlatformBridge(load_job_environment(), config.job_id) as bridge:
            reporter = ProgressReporter(config.job_id, config.max_epochs, config.progress_interval_seconds,
                                        bridge.publish_progress)
            reporter.is_rank_zero = is_rank_zero()
            run(config, bridge, reporter)
    except (JobFailed, DomainError) as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - any error ends the job with its reason
        log.exception("job %s failed", config.job_id)
        _fail(failure_reason(exc), TRANSIENT_EXIT_STATUS if is_transient(exc) else 1)


def failure_reason(exc: BaseException) -> str:
    """One line naming the error (a gRPC error by its status and details, not its multi-line repr)."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        text = f"{exc.code().name} from a peer: {exc.details() if hasattr(exc, 'details') else ''}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _fail(reason: str, status: int = 1) -> None:
    sys.stderr.flush()
    print(f"{FAILURE_PREFIX}{reason}", file=sys.stderr, flush=True)
    raise SystemExit(status)
