"""How much to fuzz (bounded in `make test`, longer in `make fuzz`), what was seen, and the report.

Settings, from the environment:
- `SPLITSTACK_FUZZ_EXAMPLES` — examples per RPC (and 3 x that many poison events per consumer); default 8:
  the bounded run of `make test`; `make fuzz` sets 500 unless told otherwise.
- `SPLITSTACK_FUZZ_REPORT` — where to write the markdown report (unset: none; `make fuzz`: docs/fuzz.md).
- `SPLITSTACK_FUZZ_SHRINK` — 1 to minimise a failing input with hypothesis' shrinker (default: on when a
  report is written, off in the bounded run to keep it short).

Every run is reproducible: hypothesis is derandomized (the same inputs each run) and keeps no example
database.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

BOUNDED_EXAMPLES = 8
EXAMPLES = int(os.environ.get("SPLITSTACK_FUZZ_EXAMPLES", BOUNDED_EXAMPLES))
REPORT = os.environ.get("SPLITSTACK_FUZZ_REPORT", "")
SHRINK = os.environ.get("SPLITSTACK_FUZZ_SHRINK", "1" if REPORT else "0") == "1"
SECONDS_PER_EXAMPLE = 3.0     # the pytest timeout of a fuzz test grows with the examples asked for


def fuzz_settings(examples: int = EXAMPLES) -> settings:
    """Hypothesis settings of every fuzz property: reproducible, no deadline, no database."""
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, phases=phases,
                    suppress_health_check=list(HealthCheck), report_multiple_bugs=False, print_blob=False)


def timeout_for(calls: int) -> float:
    """A pytest timeout for a test that makes `calls` fuzzed calls (plus the stack's own checks)."""
    return 300.0 + calls * EXAMPLES * SECONDS_PER_EXAMPLE


@dataclass
class Finding:
    """Something the fuzzer showed: an RPC or consumer, what went wrong, and the (minimal) input."""

    where: str            # registry.SetAlias, consumer trainer, stack
    problem: str          # e.g. "INTERNAL: Exception calling application: ..."
    reproducer: str = ""  # the request (abbreviated) or payload that showed it

    def line(self) -> str:
        text = f"{self.where}: {self.problem}"
        return text + (f"\n    input: {self.reproducer}" if self.reproducer else "")


@dataclass(frozen=True)
class Triaged:
    """A finding of an earlier run, minimised and followed up (fixed, or routed to whoever owns the code)."""

    where: str
    status: str           # what the fuzzer saw
    reproducer: str
    outcome: str          # fixed where / by what, or who has it


# Findings of earlier runs (kept in the report so docs/fuzz.md says what fuzzing found and what became of it).
TRIAGED = (
    Triaged("every RPC of every service (chassis gRPC runtime)",
            "UNKNOWN: Unexpected <class 'google.protobuf.message.DecodeError'>: Error parsing message with type ...",
            "request bytes that are not the request message: b'\\x0a\\x02\\xc3\\x28' (field 1, invalid UTF-8), "
            "b'\\xff\\xff\\xff', or a JobSpec.hyperparameters Struct nested 99+ deep (protobuf's recursion limit)",
            "fixed: the chassis wraps every method's request deserializer (libs/chassis decoding.py); such a request "
            "gets INVALID_ARGUMENT \"the request is not a valid <Method> request message: ...\" "
            "(libs/chassis/tests/test_server.py, tests/fuzz raw payloads)"),
)


@dataclass
class FuzzLog:
    """Cases and statuses per RPC (or consumer), and the findings of the session."""

    cases: Counter = field(default_factory=Counter)
    statuses: defaultdict = field(default_factory=lambda: defaultdict(Counter))
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def record(self, where: str, status: str) -> None:
        self.cases[where] += 1
        self.statuses[where][status] += 1

    def find(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        return finding

    def markdown(self, seconds: float) -> str:
        """The report: settings, cases and statuses per RPC / consumer, findings."""
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = ["# Fuzzing report", "",
                 f"Written by `make fuzz` ({now}): {EXAMPLES} examples per RPC, {3 * EXAMPLES} poison events per consumer, "
                 f"shrinking {'on' if SHRINK else 'off'}, {seconds:.0f} s. See `tests/fuzz/README.md` for what is "
                 "fuzzed and which invariants are checked.", "",
                 "## Findings", ""]
        lines += [f"- {f.line()}" for f in self.findings] or ["- none: no INTERNAL/UNKNOWN status, no hang, no dead "
                                                              "process, no half-stored record, events still flow."]
        lines += [*(f"- note: {n}" for n in self.notes), "", "## Findings of earlier runs", "",
                  "| where | status seen | input | outcome |", "|---|---|---|---|"]
        lines += [f"| {t.where} | `{t.status}` | {t.reproducer} | {t.outcome} |" for t in TRIAGED]
        lines += ["", "## Cases per RPC and consumer", "",
                  "| RPC / consumer | cases | statuses seen |", "|---|---:|---|"]
        for where in sorted(self.cases):
            seen = ", ".join(f"{status} {count}" for status, count in self.statuses[where].most_common())
            lines.append(f"| `{where}` | {self.cases[where]} | {seen} |")
        lines += ["", f"Total: {sum(self.cases.values())} cases over {len(self.cases)} RPCs and consumers.", ""]
        return "\n".join(lines)

    def write(self, path: Path, seconds: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.markdown(seconds))
