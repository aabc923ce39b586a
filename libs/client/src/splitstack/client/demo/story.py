"""The demo, step by step, through the SDK only — what a new user would do and see.

publish digits (60 %) -> train with a progress bar -> retrain policy -> conversion (gate, INT8 vs
FP32 profile) -> promotion (the model's AUTO policy; by hand only if the policy declines) -> serving
starts and answers over the Open Inference Protocol -> publish all rows -> the policy retrains ->
conversion -> promotion -> hot swap while a client keeps predicting -> summary of measured numbers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rich.console import Console

from splitstack.client.commands.conversion import point, show_choice
from splitstack.client.commands.training import follow
from splitstack.client.demo import environment
from splitstack.client.demo.data import DigitsSplit, digits_split
from splitstack.client.demo.report import CandidateFacts, Summary, VersionFacts, summary_table, traffic_lines
from splitstack.client.demo.traffic import Traffic
from splitstack.client.sdk import Platform, PlatformError
from splitstack.client.stackfile import StackPaths
from splitstack.common.v1 import common_pb2
from splitstack.registry.v1 import registry_pb2
from splitstack.trainer.v1 import trainer_pb2

log = logging.getLogger(__name__)

MODEL = DATASET = "digits"
POLICY = "digits-on-new-data"
TARGET = "cpu"
ALIAS = "production"
TRAINING = {"recipe": "digits-mlp", "hyperparameters": {"hidden": 1024, "layers": 2, "lr": 0.001},
            "max_epochs": 8, "seed": 7, "required_targets": [TARGET],
            # batch 64 instead of cpu-local's 1024: the digits are few, so more steps per epoch.
            "profile_override": {"name": "demo-cpu", "accelerator": "CPU", "precision": "32-true",
                                 "batch_size": 64, "devices": 1, "nodes": 1},
            "primary_metric": {"name": "accuracy", "direction": "MAXIMIZE"},
            "promotion_policy": {"mode": "AUTO", "metric": "accuracy", "direction": "MAXIMIZE", "margin": 0.0}}
DECISION_TIMEOUT_S = 60.0
SWAP_TIMEOUT_S = 120.0


def job_spec() -> dict[str, Any]:
    return {"model": MODEL, "dataset": DATASET, **TRAINING}


class Story:
    """One run of the demo on its own stack in `state_dir`."""

    def __init__(self, out: Console, state_dir: Path, project_stack_file: Path) -> None:
        self.out, self.state_dir, self.project_stack_file = out, state_dir, project_stack_file
        self.summary = Summary(MODEL)
        self.data: DigitsSplit = digits_split()
        self.platform: Platform | None = None
        self._step = 0

    # --- presentation ------------------------------------------------------------------------

    def step(self, title: str) -> None:
        self._step += 1
        self.out.rule(f"[bold]{self._step}. {title}", align="left")

    def say(self, text: str) -> None:
        self.out.print(text, markup=False, highlight=False)

    # --- the run -------------------------------------------------------------------------------

    def run(self) -> Summary:
        began = time.monotonic()
        environment.fresh_state_dir(self.state_dir)
        stack_file = environment.write_demo_stack_file(self.project_stack_file, self.state_dir, MODEL)
        self.step("Start the embedded stack: NATS (JetStream), registry, trainer, converter")
        with environment.DemoStack(StackPaths(self.state_dir, stack_file), self.say) as demo_stack:
            try:
                self._first_version(demo_stack)
                self._second_version()
            finally:
                if self.platform is not None:
                    self.platform.close()
                self.step("Stop the stack")
        self.summary.wall_seconds = time.monotonic() - began
        self._show_summary()
        return self.summary

    def _connect(self) -> Platform:
        if self.platform is not None:
            self.platform.close()
        self.platform = Platform.from_stack(self.state_dir, self.state_dir / "stack.toml")
        return self.platform

    def _first_version(self, demo_stack: environment.DemoStack) -> None:
        platform = self._connect()
        dataset = self._publish(platform, self.data.first, "the first 60 % of the published rows")
        self.step(f"Train {MODEL} on {DATASET} version {dataset.version} (digits-mlp, 2 x 1024 hidden)")
        job = follow(platform, platform.submit({**job_spec(), "dataset_version": dataset.version}), self.out)
        facts = self._trained(job, dataset, "SDK submit")
        self.step(f"Retrain policy {POLICY}: a new {DATASET} version trains {MODEL} again")
        self._set_policy(platform)
        self._convert(platform, facts)
        self._promote(platform, facts)
        self.step(f"Start serving: it follows {MODEL}@{ALIAS} and is ready once that version is loaded")
        demo_stack.start_serving()
        platform = self._connect()
        self._predict(platform, facts)

    def _second_version(self) -> None:
        platform = self.platform
        assert platform is not None
        dataset = self._publish(platform, self.data.full, "every published row")
        self.step(f"data.updated.{DATASET} -> the trainer's policy {POLICY} retrains {MODEL}")
        job = follow(platform, self._policy_job(platform, dataset.version), self.out)
        facts = self._trained(job, dataset, "retrain policy")
        self.say("a client now predicts continuously (one row per request) through the conversion, "
                 "the promotion and the hot swap (so this conversion's profile is measured under that load)")
        serving = platform.serving(TARGET)    # one client: the model's signature is read once, then 1 RPC a row
        traffic = Traffic(lambda rows: serving.predict(MODEL, rows), self.data.holdout.inputs,
                          self.data.holdout.labels).start()
        try:
            self._convert(platform, facts)
            self._promote(platform, facts)
            self._await_swap(platform, facts.version)
        finally:
            self.summary.record_traffic(traffic.stop())
        self.say(f"client: {self.summary.swap_requests} requests, {self.summary.swap_failures} failed")
        self._predict(platform, facts)
        self.summary.triton_client = self._triton(platform)
        self.say(f"tritonclient.grpc (a stock Triton client, own process): {self.summary.triton_client}")

    # --- steps ---------------------------------------------------------------------------------

    def _publish(self, platform: Platform, rows: Any, what: str) -> registry_pb2.DatasetVersion:
        self.step(f"Publish a {DATASET} dataset version: {what} of scikit-learn's digits")
        path = rows.write(self.state_dir / f"{DATASET}-{len(rows)}.npz")
        version = platform.publish_dataset(DATASET, path, metadata={"source": "sklearn.datasets.load_digits",
                                                                   "rows": str(len(rows))},
                                           description="scikit-learn's 8x8 digits, pixels scaled to [0, 1]")
        self.say(f"{DATASET} version {version.version}: {version.row_count} rows, sha256 {version.sha256[:16]} "
                 f"-> the registry announces data.updated.{DATASET}")
        return version

    def _trained(self, job: trainer_pb2.Job, dataset: registry_pb2.DatasetVersion, started_by: str) -> VersionFacts:
        if job.state != trainer_pb2.SUCCEEDED:
            raise PlatformError("trainer", grpc.StatusCode.FAILED_PRECONDITION, f"job {job.id} ended "
                                f"{trainer_pb2.JobState.Name(job.state)}: {job.error}")
        seconds = job.finished_at.ToDatetime() - job.started_at.ToDatetime()
        facts = VersionFacts(job.model_version, dataset.version, dataset.row_count, started_by,
                             seconds.total_seconds(), job.metrics.get("accuracy", float("nan")))
        self.summary.versions.append(facts)
        self.say(f"job {job.id}: {MODEL} version {facts.version} registered after {facts.train_seconds:.1f} s, "
                 f"validation accuracy {facts.val_accuracy:.4f} -> model.registered.{MODEL}")
        return facts

    def _set_policy(self, platform: Platform) -> None:
        template = {k: v for k, v in job_spec().items() if k not in ("model", "dataset")}
        platform.set_retrain_policy({"name": POLICY, "model": MODEL, "dataset": DATASET, "template": template,
                                     "debounce_seconds": 1.0, "max_concurrent_jobs": 1, "enabled": True})
        self.say(f"policy {POLICY}: on data.updated.{DATASET}, train {MODEL} with the same recipe "
                 f"(debounce 1 s, one job at a time)")

    def _policy_job(self, platform: Platform, dataset_version: int) -> trainer_pb2.Job:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for job in platform.jobs(model=MODEL):
                if job.retrain_policy == POLICY and job.spec.dataset_version == dataset_version:
                    self.say(f"the policy started job {job.id} on {DATASET} version {dataset_version}")
                    return job
            time.sleep(0.5)
        raise TimeoutError(f"the retrain policy {POLICY} started no job for {DATASET} version {dataset_version} "
                           f"within 120 s")

    def _convert(self, platform: Platform, facts: VersionFacts) -> None:
        self.step(f"Conversion of version {facts.version} for target {TARGET} (started by model.registered): "
                  f"ONNX FP32 and INT8, accuracy gate, measured profile")
        choice = platform.wait_serving_choice(MODEL, facts.version, TARGET, timeout=600)
        show_choice(self.out, choice)
        facts.serving_format = common_pb2.ModelFormat.Name(choice.artifact.format)
        for c in choice.candidates:
            one = point(c.profile, 1)
            facts.candidates.append(CandidateFacts(common_pb2.ModelFormat.Name(c.format), c.accepted,
                                                   c.gate.candidate_metric, one.p50_ms if one else float("nan"),
                                                   one.p99_ms if one else float("nan")))

    def _promote(self, platform: Platform, facts: VersionFacts) -> None:
        self.step(f"Promotion of version {facts.version} (the model's promotion policy: AUTO)")
        decision = self._decision(platform, facts.version)
        if decision is not None and decision.outcome == registry_pb2.PromotionDecision.PROMOTED:
            facts.promotion = "AUTO policy"
            self.say(f"registry/promotion-policy: PROMOTED - {decision.reason}")
        else:
            said = (f"{registry_pb2.PromotionDecision.Outcome.Name(decision.outcome)} - {decision.reason}"
                    if decision is not None else f"no decision within {DECISION_TIMEOUT_S:.0f} s")
            self.say(f"the policy did not promote version {facts.version} ({said}); promoting it by hand")
            platform.promote(MODEL, facts.version, ALIAS, reason=f"demo: newer data ({said})", actor="splitstack-demo")
            facts.promotion = "by hand"
        alias = next(a for a in platform.aliases(MODEL) if a.alias == ALIAS)
        self.summary.promoted_version = alias.version
        self.say(f"{MODEL}@{ALIAS} -> version {alias.version} (by {alias.actor}) -> model.promoted.{MODEL}.{ALIAS}")

    def _decision(self, platform: Platform, version: int) -> registry_pb2.PromotionDecision | None:
        deadline = time.monotonic() + DECISION_TIMEOUT_S
        while time.monotonic() < deadline:
            found = platform.version(MODEL, version)
            if found.HasField("promotion"):
                return found.promotion
            time.sleep(0.25)
        return None

    def _await_swap(self, platform: Platform, version: int) -> None:
        deadline = time.monotonic() + SWAP_TIMEOUT_S
        while (served := platform.serving_version(MODEL, target=TARGET)) != version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"serving still answers with version {served}, not {version}, "
                                   f"{SWAP_TIMEOUT_S:.0f} s after the promotion")
            time.sleep(0.1)
        self.say(f"serving swapped to version {version} (model.deployed.{MODEL}.{TARGET}); the client keeps going")
        time.sleep(1.0)

    def _predict(self, platform: Platform, facts: VersionFacts) -> None:
        self.step(f"Predictions through the Open Inference Protocol (version {facts.version} serving)")
        rows = self.data.holdout
        logits = platform.predict(MODEL, rows.inputs, target=TARGET)["logits"]
        facts.holdout_accuracy = float(np.mean(np.argmax(logits, axis=1) == rows.labels))
        self.summary.served_version = platform.serving_version(MODEL, target=TARGET)
        self.say(f"SDK: {len(rows)} held-out rows (never published), accuracy {facts.holdout_accuracy:.4f}; "
                 f"first predictions {np.argmax(logits[:10], axis=1).tolist()}, labels {rows.labels[:10].tolist()}")

    def _triton(self, platform: Platform) -> str:
        """The same rows through the unchanged Triton client, when it is installed."""
        if importlib.util.find_spec("tritonclient") is None:
            return "not installed (pip install 'tritonclient[grpc]'); skipped"
        rows = self.data.holdout.write(self.state_dir / "holdout.npz")
        done = subprocess.run([sys.executable, "-m", "splitstack.client.demo.triton", platform.endpoints.serving[TARGET],
                               MODEL, str(rows)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return f"failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"
        seen = json.loads(done.stdout)
        return (f"ready {seen['ready']}, version {seen['version']} answered {seen['rows']} rows, "
                f"accuracy {seen['accuracy']:.4f}")

    def _show_summary(self) -> None:
        self.out.print()
        self.out.print(summary_table(self.summary))
        for line in traffic_lines(self.summary):
            self.say(line)
        self.summary.write(self.state_dir / "summary.json")
