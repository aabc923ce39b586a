"""`splitstack demo` (`make demo`): the whole platform on this machine, step by step, with measured numbers.

It runs its own embedded stack in its own state dir (wiped at start, stopped at the end even on
Ctrl-C): `environment` (state dir, stack file, up/down), `data` (the digits dataset versions),
`story` (the steps, through the SDK only), `traffic` (the client predicting during the hot swap),
`report` (the summary table and `summary.json`).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from splitstack.client.demo.report import Summary


def run_demo(out: Console, state_dir: Path, project_stack_file: Path) -> Summary:
    """Run the demo on a fresh stack in `state_dir`; return what it measured."""
    from splitstack.client.demo.story import Story
    return Story(out, state_dir, project_stack_file).run()
