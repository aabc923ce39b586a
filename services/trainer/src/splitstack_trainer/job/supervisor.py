"""Die with the supervising trainer: the first thing a local job process does, before heavy imports.

The local executor sets `SPLITSTACK_JOB_SUPERVISOR_PID`; the process then arms PR_SET_PDEATHSIG
(SIGKILL when its parent dies) and exits at once if that parent is already gone. A trainer killed
mid-job therefore never leaves ranks that write on; its successor resumes the job from the last
checkpoint. Pods (no such variable) are supervised by Kubernetes instead.
"""

from __future__ import annotations

import ctypes
import os
import signal

from splitstack_trainer.jobconfig import SUPERVISOR_ENV

PR_SET_PDEATHSIG = 1


def follow_supervisor() -> None:
    """Arm the parent-death signal when a local executor started this process."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # Lightning's own rank processes (LOCAL_RANK > 0) have rank zero, not the trainer, as parent.
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and os.getppid() != int(supervisor):
        os._exit(1)  # the supervisor died before the signal was armed
