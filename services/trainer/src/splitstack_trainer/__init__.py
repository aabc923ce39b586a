"""splitstack trainer: Lightning training jobs, their registration and event-driven retraining."""
