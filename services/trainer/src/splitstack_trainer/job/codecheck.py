"""The child process that checks a spec's model code for the trainer, which never imports it itself.

`python -I -m splitstack_trainer.job.codecheck` (started by usercode.CodeChecker, in a scratch
directory, with a scrubbed environment) reads one JSON request on stdin: the import roots to put
on its path, the module and datamodule import paths, the hyperparameters as submitted, and the
file to write its answer to. It imports both classes and binds the hyperparameters exactly as the
trainer did in-process before (specs.load_class, specs.bind_hyperparameters), then writes
`{"module_hparams": ..., "datamodule_hparams": ...}` or `{"error": "<what was wrong>"}`. It dies
with the trainer (PR_SET_PDEATHSIG, armed before anything is imported) and cannot write files
larger than `MAX_FILE_BYTES`.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

from splitstack_trainer.job.supervisor import follow_supervisor

MAX_FILE_BYTES = 64 * 1024 * 1024


def check(request: dict[str, Any]) -> dict[str, Any]:
    """Import, check and bind; the answer the trainer turns into a plan or an INVALID_ARGUMENT."""
    from splitstack.chassis.errors import DomainError
    from splitstack_trainer.specs import bind_hyperparameters, load_class

    try:
        module_cls = load_class("module", request["module"], "lightning.pytorch:LightningModule")
        datamodule_cls = load_class("datamodule", request["datamodule"], "lightning.pytorch:LightningDataModule")
    except DomainError as exc:
        return {"error": str(exc)}
    try:
        module_kw, datamodule_kw = bind_hyperparameters(request["hyperparameters"], module_cls, datamodule_cls)
    except (TypeError, ValueError) as exc:
        return {"error": f"hyperparameters: {exc}"}
    except Exception as exc:  # noqa: BLE001 - the class's own check_hyperparameters failing otherwise
        return {"error": f"hyperparameters: {type(exc).__name__} in the class's check: {exc}"}
    return {"module_hparams": module_kw, "datamodule_hparams": datamodule_kw}


def main() -> None:
    follow_supervisor()
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    request = json.loads(sys.stdin.read())
    sys.path[:0] = [str(p) for p in request["path"]]
    answer = check(request)
    try:
        text = json.dumps(answer)
    except (TypeError, ValueError) as exc:
        text = json.dumps({"error": f"hyperparameters: the bound values are not JSON: {exc}"})
    with open(request["result"], "w", encoding="utf-8") as out:
        out.write(text)


if __name__ == "__main__":
    main()
