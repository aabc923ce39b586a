"""Every bad spec is refused with INVALID_ARGUMENT naming the problem, before any job or process exists."""

from __future__ import annotations

import os
import stat

import grpc
from trainer_support import SMALL_MLP, digits_npz, name, spec

from splitstack.common.v1 import common_pb2
from splitstack.trainer.v1 import trainer_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DIGITS = "splitstack_trainer.recipes.digits"


def bad_specs(model: str, dataset: str) -> list[tuple[pb.JobSpec, tuple[str, ...]]]:
    """(spec, words the error must contain) for each kind of mistake."""
    override = common_pb2.TrainingProfile(name="tiny", accelerator=common_pb2.CPU, precision="32-true",
                                          batch_size=0, devices=1, nodes=1)
    return [
        (spec(model, dataset, recipe="digits-transformer"), ("recipe", "digits-transformer", "digits-mlp")),
        (spec(model, dataset, recipe=""), ("recipe", "module", "datamodule")),
        (spec(model, dataset, module=f"{DIGITS}:DigitsMLP"), ("either recipe or module",)),
        (spec(model, dataset, recipe="", module="no_such_package.nets:Net", datamodule=f"{DIGITS}:DigitsDataModule"),
         ("module", "no_such_package.nets", "SPLITSTACK_TRAINER_ALLOWED_MODULE_PREFIXES")),
        (spec(model, dataset, recipe="", module=f"{DIGITS}:DigitsMLP", datamodule=f"{DIGITS}.missing:Data"),
         ("datamodule", f"{DIGITS}.missing", "cannot be imported")),
        (spec(model, dataset, recipe="", module=f"{DIGITS}.DigitsMLP", datamodule=f"{DIGITS}:DigitsDataModule"),
         ("module", "import path")),
        (spec(model, dataset, recipe="", module=f"{DIGITS}:NoSuchNet", datamodule=f"{DIGITS}:DigitsDataModule"),
         ("module", "NoSuchNet")),
        (spec(model, dataset, recipe="", module=f"{DIGITS}:DigitsDataModule", datamodule=f"{DIGITS}:DigitsDataModule",
              hyperparameters={}), ("module", "not a LightningModule")),
        (spec(model, dataset, recipe="", module=f"{DIGITS}:DigitsMLP", datamodule="collections:OrderedDict",
              hyperparameters={}), ("datamodule", "collections", "not allowed")),
        (spec(model, dataset, recipe="", module=f"{DIGITS}:DigitsMLP", datamodule=f"{DIGITS}:DigitsMLP",
              hyperparameters={}), ("datamodule", "not a LightningDataModule")),
        (spec(model, dataset, hyperparameters={"hiddn": 64}), ("hyperparameters", "hiddn", "DigitsMLP")),
        (spec(model, dataset, hyperparameters={"hidden": "wide"}), ("DigitsMLP.hidden", "integer")),
        (spec(model, dataset, hyperparameters={"hidden": 2.5}), ("DigitsMLP.hidden", "integer")),
        (spec(model, dataset, hyperparameters={"lr": -1}), ("lr",)),
        (spec(model, dataset, hyperparameters={"val_fraction": 1.5}), ("val_fraction",)),
        (spec(model, dataset, hyperparameters={**SMALL_MLP, "batch_size": 8}), ("batch_size", "profile")),
        (spec(model, dataset, profile="tpu-pod"), ("profile", "tpu-pod", "cpu-local")),
        (spec(model, dataset, profile_override=override), ("profile_override", "batch_size")),
        (spec(model, dataset, executor="slurm"), ("executor", "slurm")),
        (spec(model, dataset, executor="kubernetes"), ("executor", "kubernetes", "not available")),
        (spec("Not A Name", dataset), ("model", "Not A Name")),
        (spec(model, ""), ("dataset",)),
        (spec(model, dataset, max_epochs=-1), ("max_epochs",)),
        (spec(model, dataset, required_targets=["cpu", "cpu"]), ("required_targets", "twice")),
        (spec(model, "no-such-dataset"), ("no-such-dataset", "not in the registry")),
        (spec(model, dataset, dataset_version=99), ("version 99", "not in the registry")),
        (spec(model, dataset, parent_version=7), ("parent_version 7", "not in the registry")),
    ]


async def test_every_bad_spec_is_rejected_naming_the_problem(stack, digits) -> None:  # noqa: ANN001
    dataset, _ = digits
    model = name("bad")
    async with stack.clients() as api:
        for bad, words in bad_specs(model, dataset):
            await api.trainer.fails(api.trainer.submit(bad), INVALID, *words)
        gpu = spec(model, dataset, profile="a100-bf16")
        await api.trainer.fails(api.trainer.submit(gpu), grpc.StatusCode.FAILED_PRECONDITION, "a100-bf16", "GPU")
        assert await api.trainer.jobs(model=model) == []
        assert not list((stack.trainers.root / "work" / "jobs").glob("*/rank-*.log")) or all(
            model not in p.read_text(errors="replace") for p in (stack.trainers.root / "work" / "jobs").glob("*/rank-*.log"))


async def test_a_dataset_whose_content_breaks_its_digest_is_rejected(stack) -> None:  # noqa: ANN001
    dataset = name("corrupt-data")
    async with stack.clients() as api:   # content of its own: the trainer has not cached it
        record = (await api.registry.dataset(dataset, [digits_npz(1500, seed=99)]))[0]
    blob = stack.root / "registry" / "artifacts" / "sha256" / record.sha256[:2] / record.sha256
    os.chmod(blob, stat.S_IRUSR | stat.S_IWUSR)
    content = bytearray(blob.read_bytes())
    content[len(content) // 2] ^= 0xFF
    blob.write_bytes(bytes(content))
    model = name("corrupt")
    async with stack.clients() as api:
        await api.trainer.fails(api.trainer.submit(spec(model, dataset)), INVALID, "digest", dataset)
        assert await api.trainer.jobs(model=model) == []
