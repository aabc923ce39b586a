"""The job process: `python -m splitstack_trainer.job --config-json '<JobConfig>'`, one per rank.

The same command runs as a local process (the local executor) and as the container of every pod
of an Indexed Job (the kubernetes executor). See run.py for what it does.
"""
