"""splitstack registry: the source of truth for datasets, models, versions, artifacts, serving choices and aliases."""
