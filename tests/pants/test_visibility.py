"""Pants' visibility rules reject exactly the imports the architecture forbids.

Each case copies the repo to a tmp folder, adds one module with a forbidden import, and asserts that
`pants dependencies` fails naming the rule and both ends; the untouched copy passes the same check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pants_tree import CHECKED, copy_repo, run_pants

pytestmark = pytest.mark.timeout(1800)

# (where the offending module goes, what it imports, the rule that must deny it, the target it hits)
VIOLATIONS = {
    "service imports another service": (
        "services/serving/src/splitstack_serving/zz_violation.py", "splitstack_registry.main",
        "services/serving/src/BUILD[!//services/**]", "services/registry/src/splitstack_registry/main.py"),
    "lib imports a service": (
        "libs/chassis/src/splitstack/chassis/zz_violation.py", "splitstack_trainer.main",
        "libs/chassis/src/BUILD[!//services/**]", "services/trainer/src/splitstack_trainer/main.py"),
    "client imports the chassis": (
        "libs/client/src/splitstack/client/zz_violation.py", "splitstack.chassis.config",
        "libs/client/src/BUILD[!//libs/chassis/src/**]", "libs/chassis/src/splitstack/chassis/config.py"),
}


def test_the_untouched_tree_passes_the_rules(untouched):
    _, run = untouched
    assert run.returncode == 0, run.output
    assert "libs/contracts/src/splitstack/contracts" in run.output  # services depend on the contracts


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_a_forbidden_import_fails_naming_the_rule(case, pants_ready, tmp_path):
    module, imported, rule, target = VIOLATIONS[case]
    tree = copy_repo(tmp_path / "repo")
    assert (tree / target).is_file(), f"{target} is gone: update VIOLATIONS"
    (tree / module).write_text(f'"""Deliberate violation: {case}."""\n\nimport {imported}  # noqa: F401\n')
    run = run_pants(tree, "dependencies", *CHECKED)
    assert run.returncode != 0, f"{case}: Pants accepted it:\n{run.output}"
    assert "DependencyRuleActionDeniedError" in run.output, run.output
    assert rule in run.output and module in run.output and target in run.output, run.output
