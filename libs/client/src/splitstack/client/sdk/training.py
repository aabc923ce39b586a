"""The trainer through its gRPC API: submit, watch, list and cancel jobs; retraining policies.

A job spec is a `JobSpec` or a mapping in protobuf JSON form (`{"model": "digits", "recipe":
"digits-mlp", "hyperparameters": {"hidden": 64}, "max_epochs": 3, "dataset": "digits"}`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from splitstack.client.sdk.errors import PlatformError, call, translating
from splitstack.client.sdk.registry import paged, to_message
from splitstack.trainer.v1 import trainer_pb2 as tpb
from splitstack.trainer.v1 import trainer_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "trainer"
TERMINAL_STATES = frozenset({tpb.SUCCEEDED, tpb.FAILED, tpb.CANCELLED})


def job_spec(spec: tpb.JobSpec | Mapping[str, Any]) -> tpb.JobSpec:
    """A JobSpec from a message or a mapping (ValueError naming an unknown or mistyped field)."""
    return to_message(spec, tpb.JobSpec, "job spec")


def job_state(state: int | str | None) -> int:
    """A JobState from its number or name ('RUNNING', 'succeeded'); None = any."""
    if state is None:
        return tpb.JOB_STATE_UNSPECIFIED
    if isinstance(state, str):
        try:
            return tpb.JobState.Value(state.upper())
        except ValueError:
            raise ValueError(f"unknown job state {state!r} (one of {', '.join(tpb.JobState.keys()[1:])})") from None
    return int(state)


def is_terminal(job: tpb.Job) -> bool:
    return job.state in TERMINAL_STATES


class TrainerClient:
    """The trainer's RPCs with the SDK's conventions."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        self.stub = trainer_pb2_grpc.TrainerStub(channel)
        self.timeout = timeout

    def _call(self, method: str, request: Any) -> Any:
        return call(SERVICE, getattr(self.stub, method), request, self.timeout)

    def submit(self, spec: tpb.JobSpec | Mapping[str, Any]) -> tpb.Job:
        job = self._call("SubmitJob", tpb.SubmitJobRequest(spec=job_spec(spec)))
        log.info("submitted job %s (%s)", job.id, job.spec.model)
        return job

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[tpb.Job]:
        """The job now, then every change, until it ends (SUCCEEDED, FAILED or CANCELLED)."""
        stream = self.stub.WatchJob(tpb.WatchJobRequest(id=job_id), timeout=timeout)
        try:
            with translating(SERVICE):
                for update in stream:
                    yield update.job
                    if is_terminal(update.job):
                        return
        except PlatformError as exc:
            if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"job {job_id} did not end within {timeout:g}s") from None
            raise
        finally:
            stream.cancel()
        job = self.job(job_id)   # the stream ended early: report where the job is
        if not is_terminal(job):
            raise PlatformError(SERVICE, grpc.StatusCode.UNAVAILABLE,
                                f"the watch of job {job_id} ended while it was {tpb.JobState.Name(job.state)}")
        yield job

    def job(self, job_id: str) -> tpb.Job:
        return self._call("GetJob", tpb.GetJobRequest(id=job_id))

    def jobs(self, *, model: str | None = None, state: int | str | None = None) -> list[tpb.Job]:
        return list(paged(lambda token: self._call("ListJobs", tpb.ListJobsRequest(
            model=model or "", state=job_state(state), page_token=token)), "jobs"))

    def cancel(self, job_id: str, reason: str = "") -> tpb.Job:
        return self._call("CancelJob", tpb.CancelJobRequest(id=job_id, reason=reason or "cancelled through the SDK"))

    def set_retrain_policy(self, policy: tpb.RetrainPolicy | Mapping[str, Any]) -> tpb.RetrainPolicy:
        return self._call("SetRetrainPolicy", tpb.SetRetrainPolicyRequest(
            policy=to_message(policy, tpb.RetrainPolicy, "retrain policy")))

    def retrain_policy(self, name: str) -> tpb.RetrainPolicy:
        return self._call("GetRetrainPolicy", tpb.GetRetrainPolicyRequest(name=name))

    def retrain_policies(self) -> list[tpb.RetrainPolicy]:
        return list(self._call("ListRetrainPolicies", tpb.ListRetrainPoliciesRequest()).policies)

    def delete_retrain_policy(self, name: str) -> None:
        self._call("DeleteRetrainPolicy", tpb.DeleteRetrainPolicyRequest(name=name))

    def profiles(self) -> list[Any]:
        return list(self._call("ListProfiles", tpb.ListProfilesRequest()).profiles)
