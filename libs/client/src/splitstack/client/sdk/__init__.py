"""The splitstack client SDK: the whole platform through gRPC and NATS events only.

    from splitstack.client.sdk import Platform, Pipeline

    with Platform.from_stack() as platform:            # addresses of the running local stack
        deployment = Pipeline(platform).train_and_deploy(
            {"model": "digits", "recipe": "digits-mlp", "max_epochs": 5}, "digits.npz")
        outputs = platform.predict("digits", rows)       # {"logits": ndarray}

Every service failure is a `PlatformError` (service, gRPC code, the service's message); bad local
input is a `ValueError`; waits that run out raise `TimeoutError` naming what was awaited.
"""

from splitstack.client.sdk.endpoints import Endpoints
from splitstack.client.sdk.errors import PlatformError
from splitstack.client.sdk.events import Event, EventSubscription
from splitstack.client.sdk.pipeline import Deployment, Pipeline
from splitstack.client.sdk.platform import Platform

__all__ = ["Deployment", "Endpoints", "Event", "EventSubscription", "Pipeline", "Platform", "PlatformError"]
