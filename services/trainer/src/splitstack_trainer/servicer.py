"""gRPC adapter: splitstack.trainer.v1.Trainer requests <-> core.Trainer calls (no logic here)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack.trainer.v1 import trainer_pb2_grpc
from splitstack_trainer.core import Trainer

SERVICE_NAME = "splitstack.trainer.v1.Trainer"


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    """The Trainer service over a core.Trainer."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return await self.trainer.submit_job(request.spec)

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return await self.trainer.get_job(request.id)

    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        jobs, token = await self.trainer.list_jobs(request.model, request.state, request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return await self.trainer.cancel_job(request.id, request.reason)

    async def WatchJob(self, request: pb.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.JobUpdate]:
        async for job in self.trainer.watch_job(request.id):
            yield pb.JobUpdate(job=job)

    async def SetRetrainPolicy(self, request: pb.SetRetrainPolicyRequest,
                               context: grpc.aio.ServicerContext) -> pb.RetrainPolicy:
        return await self.trainer.retraining.set_policy(request.policy)

    async def GetRetrainPolicy(self, request: pb.GetRetrainPolicyRequest,
                               context: grpc.aio.ServicerContext) -> pb.RetrainPolicy:
        return await self.trainer.retraining.get_policy(request.name)

    async def ListRetrainPolicies(self, request: pb.ListRetrainPoliciesRequest,
                                  context: grpc.aio.ServicerContext) -> pb.ListRetrainPoliciesResponse:
        return pb.ListRetrainPoliciesResponse(policies=await self.trainer.retraining.list_policies())

    async def DeleteRetrainPolicy(self, request: pb.DeleteRetrainPolicyRequest,
                                  context: grpc.aio.ServicerContext) -> pb.DeleteRetrainPolicyResponse:
        await self.trainer.retraining.delete_policy(request.name)
        return pb.DeleteRetrainPolicyResponse()

    async def ListProfiles(self, request: pb.ListProfilesRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListProfilesResponse:
        return pb.ListProfilesResponse(profiles=self.trainer.list_profiles())
