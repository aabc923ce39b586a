"""`make deploy-check`: render every overlay of deploy/k8s and check it offline.

- Every object validates strictly against the pinned Kubernetes version's schema
  (kubernetes-validate); KEDA's ScaledObject against the CRD kept in deploy/k8s/crds/.
- Every SPLITSTACK_* variable a manifest gives a service is one of that service's settings
  (`env_vars` of its settings class), the settings load, and every port a manifest names (container
  ports, probes, Service target ports, peer addresses) is the one the configuration makes it listen on.
- Pools: serving and converter pools match their inference target (GPU product, tolerations, HPA
  policy), KEDA consumer names are the contracts' durable consumers, serving drains in time.
- The trainer's training Job is the one its own `render_training_job` makes.
- Every service has a Dockerfile (hadolint clean) for each image the manifests name.

Each problem is one line naming the overlay and the object. See deploy/k8s/README.md.
"""

from tools.deploy_check.run import check_tree

__all__ = ["check_tree"]
