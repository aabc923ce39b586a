"""Command line of the deploy check: `python -m tools.deploy_check [--root DIR] [--overlay NAME]...`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tools.deploy_check.run import check_tree, write_training_jobs


def main(argv: list[str] | None = None) -> int:
    """Print every problem (one line each) and exit 1 if there is any."""
    parser = argparse.ArgumentParser(prog="deploy-check", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository root (default: .)")
    parser.add_argument("--overlay", action="append", help="check only this overlay (repeatable)")
    parser.add_argument("--no-lint", action="store_true", help="skip hadolint on the Dockerfiles")
    parser.add_argument("--write-training-jobs", action="store_true",
                        help="rewrite each overlay's training-job.yaml from render_training_job, then check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="deploy-check: %(message)s")
    started = time.monotonic()
    if args.write_training_jobs:
        for path in write_training_jobs(args.root, args.overlay):
            print(f"deploy-check: wrote {path}")
    problems, summary = check_tree(args.root, args.overlay, lint=not args.no_lint)
    for problem in problems:
        print(f"deploy-check: {problem}", file=sys.stderr)
    took = time.monotonic() - started
    if problems:
        print(f"deploy-check: FAILED, {len(problems)} problem(s) ({took:.1f} s)", file=sys.stderr)
        return 1
    print(f"deploy-check: ok: {summary} ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
