"""`train`, `jobs`, `cancel`: training jobs on the training stack.

`jobs` lists jobs with how often each started; for a job that started more than once (a retraining
job retried after a transient failure, a job resumed after a trainer restart) it then prints why
each attempt ended.

`train` builds a `JobSpec` from a JSON or TOML spec file and/or flags (flags win), submits it, and
follows it with a live progress bar until it ends (`--detach`: print the job id and return).
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from splitstack.client.commands.common import (
    CommandError, json_option, key_values, metrics_text, platform_options, plain, print_json, session, show, when)
from splitstack.trainer.v1 import trainer_pb2

TERMINAL = {trainer_pb2.SUCCEEDED, trainer_pb2.FAILED, trainer_pb2.CANCELLED}
SCALARS = {"model": "model", "dataset": "dataset", "dataset_version": "dataset_version", "recipe": "recipe",
           "module": "module", "datamodule": "datamodule", "profile": "profile", "max_epochs": "max_epochs",
           "executor": "executor", "seed": "seed", "idempotency_key": "idempotency_key",
           "parent_version": "parent_version"}


def read_spec_file(path: Path) -> dict[str, Any]:
    """A spec file as a dict: `.toml` as TOML, anything else as JSON."""
    try:
        text = path.read_text()
        doc = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except FileNotFoundError:
        raise CommandError(f"spec file {path} not found") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"spec file {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise CommandError(f"spec file {path}: expected a table/object of JobSpec fields")
    return doc


def _hyperparameters(values: list[str]) -> dict[str, Any]:
    """`--hp KEY=VALUE`: VALUE as JSON when it parses (numbers, booleans), else as a string."""
    parsed = {}
    for key, text in key_values(values, "--hp").items():
        try:
            parsed[key] = json.loads(text)
        except json.JSONDecodeError:
            parsed[key] = text
    return parsed


def build_spec(args: argparse.Namespace) -> trainer_pb2.JobSpec:
    """The JobSpec from the spec file (if any) with the flags on top; unknown fields are named."""
    doc = read_spec_file(Path(args.spec)) if args.spec else {}
    doc.update({field: getattr(args, flag) for flag, field in SCALARS.items() if getattr(args, flag) is not None})
    if args.hp:
        doc["hyperparameters"] = {**doc.get("hyperparameters", {}), **_hyperparameters(args.hp)}
    if args.target:
        doc["required_targets"] = args.target
    if args.promotion:
        doc["promotion_policy"] = {"mode": args.promotion.upper(), "margin": args.promotion_margin,
                                   "metric": args.metric, "direction": "MAXIMIZE"}
    try:
        return json_format.ParseDict(doc, trainer_pb2.JobSpec())
    except json_format.ParseError as exc:
        raise CommandError(f"job spec: {str(exc).splitlines()[0]}") from None


def job_line(job: trainer_pb2.Job) -> str:
    """One line on a finished job."""
    state = trainer_pb2.JobState.Name(job.state)
    if job.state == trainer_pb2.SUCCEEDED:
        return (f"job {job.id} {state}: {job.spec.model} version {job.model_version} "
                f"({metrics_text(job.metrics)})")
    return f"job {job.id} {state}: {job.error or 'no reason given'}"


class JobProgress:
    """A rich progress bar fed with the successive states of one job."""

    def __init__(self, out: Console, job_id: str) -> None:
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=out, transient=False)
        self.task = self.bar.add_task(f"job {job_id}", total=None, detail="queued")

    def __enter__(self) -> JobProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, job: trainer_pb2.Job) -> None:
        p = job.progress
        detail = f"{trainer_pb2.JobState.Name(job.state).lower()} {p.stage}".strip()
        if p.stage == "fit" and p.max_epochs:
            detail += f" epoch {min(p.epoch + 1, p.max_epochs)}/{p.max_epochs}"
        if p.loss:
            detail += f" loss {p.loss:.3f}"
        if "accuracy" in p.val_metrics:
            detail += f" val_accuracy {p.val_metrics['accuracy']:.3f}"
        total, done = (p.total_steps, p.step) if p.total_steps else (None, 0)
        if job.state == trainer_pb2.SUCCEEDED:
            total, done = total or 1, total or 1
        self.bar.update(self.task, total=total, completed=done, detail=detail)


def follow(platform: Any, job: trainer_pb2.Job, out: Console) -> trainer_pb2.Job:
    """Watch a job to its end with a progress bar; return its last state."""
    with JobProgress(out, job.id) as progress:
        for job in platform.watch(job.id):
            progress.update(job)
    return job


def _train(args: argparse.Namespace, out: Console) -> int:
    spec = build_spec(args)
    with session(args) as platform:
        job = platform.submit(spec)
        if args.detach:
            show(out, args.json, job, f"submitted job {job.id} (model {job.spec.model})")
            return 0
        if not args.json:
            plain(out, f"submitted job {job.id}: {job.spec.model} on {job.spec.dataset}")
        job = follow(platform, job, Console(stderr=True) if args.json else out)
    show(out, args.json, job, job_line(job))
    return 0 if job.state == trainer_pb2.SUCCEEDED else 1


def _jobs(args: argparse.Namespace, out: Console) -> int:
    state = None
    if args.state:
        if args.state.upper() not in trainer_pb2.JobState.keys():
            raise CommandError(f"--state {args.state!r}: one of queued, running, succeeded, failed, cancelled")
        state = trainer_pb2.JobState.Value(args.state.upper())
    with session(args) as platform:
        jobs = list(platform.jobs(model=args.model, state=state))
    if args.json:
        print_json(jobs)
        return 0
    table = Table("job", "model", "state", "version", "attempts", "progress", "metrics", "policy", "created")
    for job in jobs:
        p = job.progress
        progress = f"{p.stage} epoch {p.epoch}/{p.max_epochs}" if p.max_epochs else (p.stage or "-")
        table.add_row(job.id, job.spec.model, trainer_pb2.JobState.Name(job.state),
                      str(job.model_version or "-"), str(job.attempts), progress, metrics_text(job.metrics),
                      job.retrain_policy or "-", when(job.created_at))
    out.print(table)
    for line in (line for job in jobs for line in attempt_lines(job)):
        plain(out, line)
    return 0


def attempt_lines(job: trainer_pb2.Job) -> list[str]:
    """Why each attempt of a job that started more than once ended (below the table)."""
    if len(job.attempt_history) < 2:
        return []
    lines = []
    for attempt in job.attempt_history:
        ended = attempt.error or ("running" if not attempt.HasField("ended_at") else "succeeded")
        notes = [word for word, flag in (("transient", attempt.transient), ("retried", attempt.retried)) if flag]
        lines.append(f"{job.id} attempt {attempt.number}: {ended}" + (f" ({', '.join(notes)})" if notes else ""))
    return lines


def _cancel(args: argparse.Namespace, out: Console) -> int:
    with session(args) as platform:
        job = platform.cancel(args.job)
    plain(out, f"job {job.id}: {trainer_pb2.JobState.Name(job.state)}")
    return 0


def _add_spec_flags(train: argparse.ArgumentParser) -> None:
    train.add_argument("--spec", help="JobSpec fields as a JSON or .toml file (flags override it)")
    train.add_argument("--model", help="registry model the result is registered under")
    train.add_argument("--dataset", help="registry dataset to train on")
    train.add_argument("--dataset-version", type=int, help="0 = latest (default)")
    train.add_argument("--recipe", help="built-in recipe: digits-mlp, digits-cnn")
    train.add_argument("--module", help="LightningModule import path package.module:Class")
    train.add_argument("--datamodule", help="LightningDataModule import path")
    train.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                       help="a hyperparameter (VALUE parsed as JSON when it can be); repeatable")
    train.add_argument("--profile", help="training profile (default cpu-local)")
    train.add_argument("--max-epochs", type=int)
    train.add_argument("--target", action="append", metavar="TARGET", help="required inference target; repeatable")
    train.add_argument("--executor", help="local (default) or kubernetes")
    train.add_argument("--seed", type=int)
    train.add_argument("--parent-version", type=int)
    train.add_argument("--idempotency-key")
    train.add_argument("--promotion", choices=["auto", "manual"], help="the model's promotion policy")
    train.add_argument("--promotion-margin", type=float, default=0.0, help="AUTO: how much better (default 0)")
    train.add_argument("--metric", default="accuracy", help="AUTO: the metric compared (default accuracy)")


def add_training_commands(commands: argparse._SubParsersAction) -> None:
    """`train`, `jobs`, `cancel`."""
    train = commands.add_parser("train", parents=[platform_options()],
                                help="submit a training job and follow it with a progress bar")
    _add_spec_flags(train)
    train.add_argument("--detach", action="store_true", help="print the job id and return at once")
    json_option(train)
    train.set_defaults(handler=_train)
    jobs = commands.add_parser("jobs", parents=[platform_options()], help="training jobs, oldest first")
    jobs.add_argument("--model")
    jobs.add_argument("--state", help="queued, running, succeeded, failed or cancelled")
    json_option(jobs)
    jobs.set_defaults(handler=_jobs)
    cancel = commands.add_parser("cancel", parents=[platform_options()], help="cancel a queued or running job")
    cancel.add_argument("job")
    cancel.set_defaults(handler=_cancel)
