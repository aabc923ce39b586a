"""Entry point of `python -m splitstack_trainer.job`."""

from splitstack_trainer.job.supervisor import follow_supervisor

follow_supervisor()  # before torch and Lightning load: a trainer killed meanwhile takes this process along

from splitstack_trainer.job.run import main  # noqa: E402

main()
