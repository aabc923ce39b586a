"""Code execution is the operator's decision: what a JobSpec may make the trainer and its jobs run.

The stack here has model code of its own on the trainer's PYTHONPATH: `acme_models` (allowed by
SPLITSTACK_TRAINER_ALLOWED_MODULE_PREFIXES) and `evil_models` / `acme_modelsx` (not allowed). Each of
their modules leaves a marker file named after the importing process's pid when imported, so
the tests see exactly which process ran which code:

- a module outside the allow-list is refused (INVALID_ARGUMENT naming the module and the knob)
  on every path that checks a spec (SubmitJob, SetRetrainPolicy's template), and never imported
  by any process;
- allowed code is imported only in the short-lived checking child, never in the trainer; its
  problems (a failed import, a crash, a class of the wrong kind, bad hyperparameters) come back as
  INVALID_ARGUMENT; a hanging import is killed after the time limit (FAILED_PRECONDITION) while
  the trainer keeps serving;
- a profile_override past any operator limit is refused naming the field and the limit;
- a running job that writes `planted_probe.py` into every job directory it can reach does not get
  it imported by another job (PYTHONSAFEPATH=1, per-job working directory), and that other job,
  of allowed code, trains to a registered version.
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from trainer_support import (
    SMALL_MLP, RegistryApi, TrainerApi, TrainerLauncher, digits_npz, job_processes, name, open_channel, spec,
    start_registry,
)

from splitstack.chassis.config import ConfigError
from splitstack.chassis.errors import InvalidArgument
from splitstack.chassis.testing.fixtures import SERVICE_LOGS
from splitstack.chassis.testing.servers import start_nats
from splitstack.common.v1 import common_pb2
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer.config import load_trainer_settings
from splitstack_trainer.executors.local import LocalExecutor
from splitstack_trainer.jobconfig import JobConfig
from splitstack_trainer.overrides import parse_quantity
from splitstack_trainer.usercode import CodeChecker, import_roots, is_under, split_import_path

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
KNOB = "SPLITSTACK_TRAINER_ALLOWED_MODULE_PREFIXES"
CHECK_TIMEOUT_SECONDS = 120.0       # a check imports torch + lightning: 20-40 s on a busy 2-core machine
DIGITS_DATA = "splitstack_trainer.recipes.digits:DigitsDataModule"

MARK = """\
import os as _os, pathlib as _pathlib
_pathlib.Path({markers!r}, "{tag}-" + str(_os.getpid())).write_text(_os.getcwd())
"""
USER_CODE = {
    "acme_models/__init__.py": MARK.replace("{tag}", "acme"),
    "acme_models/nets.py": '''
        from splitstack_trainer.recipes.digits import DigitsDataModule, DigitsMLP

        class TinyNet(DigitsMLP):
            """The digits MLP under another name: code an operator allowed."""

        class TinyData(DigitsDataModule):
            """The digits data module under another name."""

        class NotAModel:
            """Not a LightningModule."""
    ''',
    "acme_models/hang.py": MARK.replace("{tag}", "hang") + "import time\nwhile True:\n    time.sleep(1)\n",
    "acme_models/crash.py": "import os\nos._exit(3)\n",
    "acme_models/planter.py": '''
        """A job that writes planted_probe.py into every job directory it can reach, for as long as it runs."""
        import os, pathlib, threading, time
        from splitstack_trainer.recipes.digits import DigitsMLP

        PROBE = "import os, pathlib\\npathlib.Path({markers!r}, 'planted-imported-' + str(os.getpid())).write_text(os.getcwd())\\n"

        def _plant_forever():
            jobs = pathlib.Path.cwd().parent
            while True:
                for directory in [pathlib.Path.cwd(), jobs, jobs.parent, *jobs.iterdir()]:
                    if directory.is_dir():
                        (directory / "planted_probe.py").write_text(PROBE)
                time.sleep(0.05)

        if pathlib.Path.cwd().parent.name == "jobs":   # a job process, not the checking child
            threading.Thread(target=_plant_forever, daemon=True).start()

        class PlanterNet(DigitsMLP):
            def on_train_epoch_end(self):
                time.sleep(0.5)   # keeps running (and planting) until cancelled
    ''',
    "acme_models/victim.py": '''
        import os, pathlib
        try:
            import planted_probe  # noqa: F401 - what another job may have planted
            seen = "imported"
        except ImportError:
            seen = "absent"
        if pathlib.Path.cwd().parent.name == "jobs":
            pathlib.Path({markers!r}, "victim-" + str(os.getpid())).write_text(
                seen + " " + os.getcwd() + " " + os.environ.get("PYTHONSAFEPATH", "-"))
        from splitstack_trainer.recipes.digits import DigitsMLP

        class VictimNet(DigitsMLP):
            """Allowed code that would import whatever another job planted on its path."""
    ''',
    "evil_models/__init__.py": MARK.replace("{tag}", "evil"),
    "evil_models/nets.py": MARK.replace("{tag}", "evil-nets"),
    "acme_modelsx/__init__.py": MARK.replace("{tag}", "lookalike"),
    "acme_modelsx/nets.py": MARK.replace("{tag}", "lookalike-nets"),
}


def write_user_code(code_dir: Path, markers: Path) -> None:
    markers.mkdir(parents=True)
    for relative, text in USER_CODE.items():
        path = code_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).replace("{markers!r}", repr(str(markers))))


def marked(markers: Path, tag: str) -> dict[int, str]:
    """pid -> working directory of every process that imported the code tagged `tag`."""
    found = {}
    for path in markers.glob(f"{tag}-*"):
        prefix, _, pid = path.name.rpartition("-")
        if prefix == tag and pid.isdigit():
            found[int(pid)] = path.read_text()
    return found


class CodeStack:
    """NATS, a registry and one trainer that allows `acme_models`, with user code on its PYTHONPATH."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.code = root / "code"
        self.markers = root / "markers"
        write_user_code(self.code, self.markers)
        self.nats = start_nats(root / "nats")
        self.registry = start_registry(root / "registry", self.nats.url)
        self.trainers = TrainerLauncher(root / "trainer", self.nats.url, self.registry.address, {
            "PYTHONPATH": str(self.code), KNOB: "acme_models",
            "SPLITSTACK_TRAINER_CODE_CHECK_TIMEOUT_SECONDS": str(CHECK_TIMEOUT_SECONDS),
            "SPLITSTACK_TRAINER_MAX_LOCAL_JOBS": "2"})
        self.trainer = self.trainers.start()

    @property
    def jobs_dir(self) -> Path:
        return self.trainers.root / "work" / "jobs"

    def marked(self, tag: str) -> dict[int, str]:
        return marked(self.markers, tag)

    def log_files(self) -> list[tuple[str, Path]]:
        return [("registry", self.registry.log_path), *self.trainers.log_files()]

    def stop(self) -> None:
        self.trainers.stop_all()
        self.registry.stop()
        self.nats.stop()


@pytest.fixture(scope="module")
def code_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CodeStack]:
    stack = CodeStack(tmp_path_factory.mktemp("untrusted"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
async def api(code_stack: CodeStack, request: pytest.FixtureRequest):  # noqa: ANN201
    assert code_stack.trainer.proc.poll() is None, f"the trainer died:\n{code_stack.trainer.log()}"
    request.node.stash.setdefault(SERVICE_LOGS, []).append(code_stack)
    channel = grpc.aio.insecure_channel(code_stack.trainer.address)
    try:
        yield TrainerApi(channel)
    finally:
        await asyncio.wait_for(channel.close(), 10)


@pytest.fixture(scope="module")
def dataset(code_stack: CodeStack) -> str:
    async def upload() -> str:
        dataset_name = name("digits")
        async with open_channel(code_stack.registry.address) as channel:
            await RegistryApi(channel).dataset(dataset_name, [digits_npz()])
        return dataset_name

    return asyncio.run(upload())


def user_spec(model: str, dataset_name: str, module: str, datamodule: str = DIGITS_DATA, **fields) -> pb.JobSpec:  # noqa: ANN003
    return spec(model, dataset_name, recipe="", module=module, datamodule=datamodule,
                hyperparameters=fields.pop("hyperparameters", SMALL_MLP), **fields)


async def checked_submit(api: TrainerApi, job: pb.JobSpec) -> pb.Job:
    """SubmitJob with a deadline past the code check's own time limit (a check imports torch + lightning)."""
    return await api.stub.SubmitJob(pb.SubmitJobRequest(spec=job), timeout=CHECK_TIMEOUT_SECONDS + 60)


# ---- the rules, without processes -------------------------------------------------------------------

def test_module_paths_and_prefixes_follow_dotted_rules() -> None:
    assert is_under("foo", "foo") and is_under("foo.bar", "foo") and not is_under("foobar", "foo")
    assert not is_under("foo", "foo.bar") and not is_under("xfoo.bar", "foo")
    assert split_import_path("module", "acme.nets:Net") == ("acme.nets", "Net")
    assert split_import_path("module", "acme.nets:Outer.Inner") == ("acme.nets", "Outer.Inner")
    for odd in (".acme.nets:Net", "acme..nets:Net", "acme.nets.:Net", "acme/nets:Net", "acme.nets:Ne t",
                "acme.nets:", ":Net", "acme.nets", "acme.nets:Net:X", "acme.nets:.Net", "ａcme.nets:Net",
                "acme.nets:Net\n", "1acme:Net", "acme-nets:Net", "acme.nets:" + "N" * 300):
        with pytest.raises(InvalidArgument, match="import path"):
            split_import_path("module", odd)
    checker = CodeChecker(("acme", "team.models."))
    assert checker.allowed_prefixes == ("acme", "team.models")
    for allowed in ("acme:Net", "acme.nets:Net", "team.models.mlp:Net", "splitstack_trainer.recipes.digits:DigitsMLP"):
        checker.ensure_allowed("module", allowed)
    for refused in ("acmex.nets:Net", "team.modelsx:Net", "team:Net", "os:system", "splitstack_trainer.job.run:main",
                    "splitstack_trainer.recipesx:Net"):
        with pytest.raises(InvalidArgument, match=KNOB):
            checker.ensure_allowed("module", refused)


def test_configuration_refuses_bad_prefixes_and_limits() -> None:
    base = {"SPLITSTACK_REGISTRY_ADDR": "127.0.0.1:1"}
    settings = load_trainer_settings({**base, KNOB: "acme.models, team"})
    assert settings.allowed_module_prefixes == ("acme.models", "team")
    assert load_trainer_settings(base).allowed_module_prefixes == ()
    for key, value in ((KNOB, "acme/models"), (KNOB, ".relative"), (KNOB, "a..b"),
                       ("SPLITSTACK_TRAINER_OVERRIDE_MAX_CPU", "lots"), ("SPLITSTACK_TRAINER_OVERRIDE_MAX_MEMORY", "-1Gi"),
                       ("SPLITSTACK_TRAINER_OVERRIDE_MAX_NODES", "0"), ("SPLITSTACK_TRAINER_CODE_CHECK_TIMEOUT_SECONDS", "0")):
        with pytest.raises(ConfigError, match=key):
            load_trainer_settings({**base, key: value})
    assert parse_quantity("500m") == Decimal("0.5") and parse_quantity("64Gi") == 64 * 2 ** 30
    assert parse_quantity("1e3") == 1000 and parse_quantity("2E") == 2 * 10 ** 18 and parse_quantity(".5") == Decimal("0.5")
    for bad in ("", "1.5.5", "Gi", "1 Gi", "1gi", "-1", "1e999"):
        with pytest.raises(ValueError):
            parse_quantity(bad)


def test_local_ranks_get_a_safe_path_and_their_own_working_directory(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    work = tmp_path / "work"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["", ".", "relative/dir", "/opt/models", str(work / "jobs" / "x")]))
    settings = load_trainer_settings({"SPLITSTACK_REGISTRY_ADDR": "127.0.0.1:1", "SPLITSTACK_TRAINER_WORK_DIR": str(work)})
    executor = LocalExecutor(settings)
    config = JobConfig(job_id="job-1", model="m", module="a:B", datamodule="a:C", module_hparams={},
                       datamodule_hparams={}, profile={"nodes": 1, "devices": 1}, max_epochs=1, seed=0, dataset="d",
                       dataset_version=1, dataset_sha256="0" * 64, dataset_size=1, dataset_path="/x",
                       work_dir=str(executor.job_paths("job-1", "0" * 64)[0]), required_targets=["cpu"],
                       primary_metric={}, promotion_policy=None, parent_version=0, code_version="t")
    env = executor._environment(config, 0, 0)
    assert env["PYTHONSAFEPATH"] == "1" and env["PYTHONPATH"] == "/opt/models"
    assert Path(config.work_dir) == work.resolve() / "jobs" / "job-1"
    assert import_roots("", None) == [] and import_roots("/a:b:/c", None) == ["/a", "/c"]


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for the interpreter of the checking child."""
    script = tmp_path / f"python-{uuid.uuid4().hex[:6]}"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def test_the_checking_child_is_isolated_bounded_and_killed_on_time(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("SPLITSTACK_NATS_PASSWORD", "secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    seen = tmp_path / "seen"
    spy = fake_python(tmp_path, f'echo "$@" > {seen}.args; env > {seen}.env; pwd > {seen}.cwd; cat > {seen}.in\n'
                                'echo "the last words"; exit 3\n')
    checker = CodeChecker(("acme",), timeout_seconds=60, python=spy, path=("/opt/models",))
    with pytest.raises(InvalidArgument, match="exited with status 3 without an answer: the last words"):
        checker.check_in_child("acme.nets:Net", "acme.nets:Data", {"hidden": 4})
    assert Path(f"{seen}.args").read_text().split() == ["-I", "-m", "splitstack_trainer.job.codecheck"]
    env = dict(line.split("=", 1) for line in Path(f"{seen}.env").read_text().splitlines() if "=" in line)
    assert env["PYTHONSAFEPATH"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert not [k for k in env if k.startswith(("SPLITSTACK_NATS", "SPLITSTACK_TRAINER", "AWS_", "PYTHONPATH"))]
    cwd = Path(Path(f"{seen}.cwd").read_text().strip())
    assert cwd.name == "cwd" and env["HOME"] == str(cwd.parent) and not cwd.exists()   # scratch removed after
    request = json.loads(Path(f"{seen}.in").read_text())
    assert request["path"] == ["/opt/models"] and request["module"] == "acme.nets:Net"
    assert request["hyperparameters"] == {"hidden": 4}

    # A child that never answers is killed with its whole process group; one check runs, one waits, more are refused.
    grandchild = tmp_path / "grandchild.pid"
    sleeper = fake_python(tmp_path, f"sleep 300 &\necho $! > {grandchild}\nsleep 300\n")
    slow = CodeChecker((), timeout_seconds=3, max_concurrent=1, python=sleeper)
    outcomes: list[str] = []

    def check() -> None:
        try:
            slow.check_in_child("acme.nets:Net", "acme.nets:Data", {})
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
            outcomes.append(type(exc).__name__ + ": " + str(exc))

    threads = [threading.Thread(target=check) for _ in range(3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    for thread in threads:
        thread.join(60)
    assert time.monotonic() - started < 30
    assert sorted(o.split(":")[0] for o in outcomes) == ["FailedPrecondition", "FailedPrecondition", "Unavailable"], outcomes
    assert all("did not finish within 3 s" in o for o in outcomes if o.startswith("FailedPrecondition"))
    pid = int(grandchild.read_text())
    assert not Path(f"/proc/{pid}").exists() or ") Z " in Path(f"/proc/{pid}/stat").read_text()


# ---- against a running trainer ----------------------------------------------------------------------

async def test_code_outside_the_allow_list_is_refused_before_anything_imports_it(code_stack, api, dataset) -> None:  # noqa: ANN001
    model = name("evil")
    refused = [
        user_spec(model, dataset, "evil_models.nets:Net"),
        user_spec(model, dataset, "evil_models:Net"),
        user_spec(model, dataset, "acme_models.nets:TinyNet", datamodule="evil_models.nets:Data"),
        user_spec(model, dataset, "acme_modelsx.nets:Net"),            # a prefix is a whole dotted name
    ]
    for bad in refused:
        where = bad.module if bad.module.startswith(("evil", "acme_modelsx")) else bad.datamodule
        await api.fails(api.submit(bad), INVALID, where.partition(":")[0], KNOB, "not allowed")
    for odd in (".evil_models:Net", "acme_models..nets:TinyNet", "acme_models/nets:TinyNet", "acme_models.nets: TinyNet"):
        await api.fails(api.submit(user_spec(model, dataset, odd)), INVALID, "import path")
    # The policy path checks its template the same way, before anything is imported.
    policy = pb.RetrainPolicy(name=name("evil-policy"), model=model, dataset=dataset, debounce_seconds=1, enabled=True,
                              template=user_spec(model, dataset, "evil_models.nets:Net"))
    await api.fails(api.stub.SetRetrainPolicy(pb.SetRetrainPolicyRequest(policy=policy), timeout=60),
                    INVALID, "evil_models.nets", KNOB)
    assert await api.jobs(model=model) == []
    for tag in ("evil", "evil-nets", "lookalike", "lookalike-nets"):
        assert code_stack.marked(tag) == {}, f"{tag} code was imported: {code_stack.marked(tag)}"


@pytest.mark.timeout(600)
async def test_allowed_code_is_checked_in_a_child_process_never_in_the_trainer(code_stack, api, dataset) -> None:  # noqa: ANN001
    model = name("acme")
    cases = [
        (user_spec(model, dataset, "acme_models.missing:Net"), ("acme_models.missing", "cannot be imported")),
        (user_spec(model, dataset, "acme_models.nets:NotAModel"), ("acme_models.nets:NotAModel", "not a LightningModule")),
        (user_spec(model, dataset, "acme_models.nets:TinyNet", hyperparameters={"hiddn": 3}), ("hiddn", "TinyNet")),
        (user_spec(model, dataset, "acme_models.crash:Net"), ("acme_models.crash", "exited with status 3")),
    ]
    for bad, words in cases:
        await api.fails(checked_submit(api, bad), INVALID, *words)
    assert await api.jobs(model=model) == []
    accepted = await checked_submit(api, user_spec(model, dataset, "acme_models.nets:TinyNet",
                                                   datamodule="acme_models.nets:TinyData"))
    assert accepted.state in (pb.QUEUED, pb.RUNNING)
    await api.cancel(accepted.id, "only the check mattered")
    importers = code_stack.marked("acme")
    assert importers, "the allowed code was never imported by a checking child"
    assert code_stack.trainer.proc.pid not in importers, "the trainer imported user code itself"
    assert all(Path(cwd).name == "cwd" and "splitstack-codecheck-" in cwd for cwd in importers.values()
               if "jobs" not in Path(cwd).parts), importers


HANG_TIMEOUT_SECONDS = 20.0   # a trainer of its own: the hanging module is imported before torch loads


@pytest.mark.timeout(600)
async def test_a_hanging_import_is_killed_and_the_trainer_keeps_serving(fresh_stack, tmp_path) -> None:  # noqa: ANN001
    markers = tmp_path / "markers"
    write_user_code(tmp_path / "code", markers)
    dataset_name, _ = await fresh_stack.upload_digits()
    trainer = fresh_stack.trainers.start(PYTHONPATH=str(tmp_path / "code"), **{
        KNOB: "acme_models", "SPLITSTACK_TRAINER_CODE_CHECK_TIMEOUT_SECONDS": str(HANG_TIMEOUT_SECONDS)})
    model = name("hang")
    async with fresh_stack.clients() as clients:
        api = clients.trainer
        started = time.monotonic()
        hanging = asyncio.ensure_future(checked_submit(api, user_spec(model, dataset_name, "acme_models.hang:Net")))
        deadline = time.monotonic() + HANG_TIMEOUT_SECONDS
        while not marked(markers, "hang") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert marked(markers, "hang"), "the hanging module was never imported by a checking child"
        quick = time.monotonic()   # while the child hangs, the trainer answers other calls
        profiles = await api.stub.ListProfiles(pb.ListProfilesRequest(), timeout=10)
        assert profiles.profiles and time.monotonic() - quick < 10
        assert not hanging.done()
        await api.fails(hanging, PRECONDITION, "acme_models.hang", "did not finish within",
                        "CODE_CHECK_TIMEOUT_SECONDS")
        assert time.monotonic() - started < HANG_TIMEOUT_SECONDS + 30
        for pid in marked(markers, "hang"):
            assert not Path(f"/proc/{pid}").exists() or ") Z " in Path(f"/proc/{pid}/stat").read_text(), \
                f"the hanging checker {pid} was left running"
        assert trainer.proc.poll() is None and trainer.proc.pid not in marked(markers, "acme")
        job = await api.submit(spec(name("after-hang"), dataset_name))     # built-in recipe: still accepted
        assert (await api.get(job.id)).state in (pb.QUEUED, pb.RUNNING, pb.SUCCEEDED)
        await api.cancel(job.id, "only acceptance mattered")
        assert await api.jobs(model=model) == []


def override(**fields) -> common_pb2.TrainingProfile:  # noqa: ANN003
    resources = fields.pop("resources", {})
    node_selector = fields.pop("node_selector", {})
    tolerations = fields.pop("tolerations", [])
    profile = common_pb2.TrainingProfile(**{"name": "tiny", "accelerator": common_pb2.CPU, "precision": "32-true",
                                            "batch_size": 256, "devices": 1, "nodes": 1, **fields})
    profile.resources.update(resources)
    profile.node_selector.update(node_selector)
    profile.tolerations.extend(common_pb2.Toleration(**t) for t in tolerations)
    return profile


async def test_profile_override_past_any_operator_limit_is_refused(api, dataset) -> None:  # noqa: ANN001
    model = name("override")
    cases = [
        (override(nodes=3), ("profile_override.nodes", "at most 2", "OVERRIDE_MAX_NODES")),
        (override(devices=9), ("profile_override.devices", "at most 8", "OVERRIDE_MAX_DEVICES")),
        (override(resources={"cpu": "17"}), ("profile_override.resources['cpu']", "16", "OVERRIDE_MAX_CPU")),
        (override(resources={"cpu": "16001m"}), ("'cpu'", "16", "OVERRIDE_MAX_CPU")),
        (override(resources={"memory": "65Gi"}), ("'memory'", "64Gi", "OVERRIDE_MAX_MEMORY")),
        (override(resources={"nvidia.com/gpu": "9"}), ("nvidia.com/gpu", "8", "OVERRIDE_MAX_GPUS")),
        (override(resources={"nvidia.com/gpu": "500m"}), ("nvidia.com/gpu", "whole number")),
        (override(resources={"hugepages-2Mi": "1Gi"}), ("hugepages-2Mi", "cpu, memory, nvidia.com/gpu")),
        (override(resources={"cpu": "lots"}), ("'cpu'", "quantity")),
        (override(node_selector={"kubernetes.io/hostname": "control-plane-0"}), ("node_selector", "named profile")),
        (override(tolerations=[{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
                                "effect": "NoSchedule"}]), ("tolerations", "named profile")),
        (override(batch_size=1 << 24), ("profile_override.batch_size", "at most")),
        (override(description="x" * 5000), ("profile_override.description",)),
        (override(precision="fp4"), ("profile_override.precision",)),
    ]
    for bad, words in cases:
        await api.fails(api.submit(spec(model, dataset, profile_override=bad)), INVALID, *words)
    assert await api.jobs(model=model) == []
    within = override(resources={"cpu": "2", "memory": "2Gi"})
    job = await api.submit(spec(model, dataset, profile_override=within))
    assert job.state in (pb.QUEUED, pb.RUNNING)
    await api.cancel(job.id, "only acceptance mattered")


@pytest.mark.timeout(900)
async def test_one_job_cannot_plant_a_module_that_another_job_imports(code_stack, api, dataset) -> None:  # noqa: ANN001
    planter = await checked_submit(api, user_spec(name("planter"), dataset, "acme_models.planter:PlanterNet", max_epochs=1000))
    await api.wait(planter.id, [pb.RUNNING])
    planted = code_stack.jobs_dir / planter.id / "planted_probe.py"
    deadline = time.monotonic() + 300
    while not planted.exists():
        assert time.monotonic() < deadline, "the planting job never planted"
        assert (await api.get(planter.id)).state == pb.RUNNING, await api.get(planter.id)
        await asyncio.sleep(0.2)
    for pid in job_processes(planter.id):   # the rank runs with a safe path in its own directory
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"PYTHONSAFEPATH=1" in environ
        assert Path(os.readlink(f"/proc/{pid}/cwd")) == code_stack.jobs_dir / planter.id
    try:
        victim = await checked_submit(api, user_spec(name("victim"), dataset, "acme_models.victim:VictimNet", max_epochs=2))
        done = await api.wait(victim.id, timeout=480)
        assert done.state == pb.SUCCEEDED and done.model_version == 1, done
        assert (code_stack.jobs_dir / victim.id / "planted_probe.py").exists(), "the plant never reached the victim"
        assert code_stack.marked("planted-imported") == {}, "a planted module was imported"
        seen = list(code_stack.marked("victim").values())
        assert seen and all(s.startswith("absent ") and s.endswith(" 1") for s in seen), seen
        assert (await api.get(planter.id)).state == pb.RUNNING
    finally:
        await api.cancel(planter.id, "planting test over")
