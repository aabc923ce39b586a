"""Trainer benchmark: Lightning vs a plain PyTorch loop, and 32-true vs bf16-mixed vs bf16-true, side by side.

For both built-in recipe networks (the 64-1024-1024-10 MLP and the tiny CNN) this trains on the same
data — scikit-learn's digits training split, tiled to `--rows` rows — with the training profile's
batch size (1024) and the recipe's optimizer, and measures steady-state training throughput
(samples/s of the median epoch after a warm-up epoch; best of five interleaved rounds, so that other
work on a shared machine disturbs the comparison as little as possible):

1. the recipe's LightningModule under `lightning.Trainer` vs the same module in a hand-written loop
   (zero_grad / forward / cross-entropy / backward / step over the same DataLoader), both FP32;
2. `lightning.Trainer` with precision 32-true, bf16-mixed and bf16-true, plus the held-out accuracy
   each run reaches (BF16 must still train).

On a machine with CUDA the same runs are repeated on the GPU (and 16-mixed is added). The report
goes to docs/bench/trainer.md (and stdout).

Run: `make bench` (or `.venv/bin/python services/trainer/bench/bench_trainer.py [--out PATH]`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from splitstack_trainer.recipes.digits import DigitsClassifier, DigitsCNN, DigitsMLP

ROOT = Path(__file__).resolve().parents[3]
MODELS = {"MLP 64-1024-1024-10": DigitsMLP, "tiny CNN (2 conv + linear)": DigitsCNN}
CPU_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
GPU_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
HELD_OUT = 360


@dataclass(frozen=True)
class Data:
    train: TensorDataset
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass(frozen=True)
class Run:
    samples_per_second: float
    wall_seconds: float
    accuracy: float


def digits(rows: int) -> Data:
    data = load_digits()
    x = torch.from_numpy((data.data / 16.0).astype(np.float32))
    y = torch.from_numpy(data.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    x, y = x[order], y[order]
    train_x, train_y = x[HELD_OUT:], y[HELD_OUT:]
    repeats = -(-rows // len(train_x))
    return Data(TensorDataset(train_x.repeat(repeats, 1)[:rows], train_y.repeat(repeats)[:rows]),
                x[:HELD_OUT], y[:HELD_OUT])


def loader(data: Data, batch: int) -> DataLoader:
    return DataLoader(data.train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))


def accuracy(module: nn.Module, data: Data, device: torch.device) -> float:
    module.eval()
    with torch.no_grad():
        logits = module.float().to(device)(data.test_x.to(device))
    return float((logits.argmax(dim=1).cpu() == data.test_y).float().mean())


class EpochClock(L.Callback):
    """Seconds per training epoch."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync()
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync()
        self.epochs.append(time.perf_counter() - self._started)

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def steady_rate(epoch_seconds: list[float], rows: int) -> float:
    """Samples/s of the median epoch after the first (warm-up) epoch."""
    return rows / statistics.median(epoch_seconds[1:])


def lightning_run(model_cls: type[DigitsClassifier], data: Data, args: argparse.Namespace, precision: str,
                  accelerator: str) -> Run:
    torch.manual_seed(0)
    module = model_cls()
    clock = EpochClock()
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_epochs=args.epochs + 1,
                        callbacks=[clock], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader(data, args.batch))
    wall = time.perf_counter() - started
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    return Run(steady_rate(clock.epochs, len(data.train)), wall, accuracy(module, data, device))


def plain_run(model_cls: type[DigitsClassifier], data: Data, args: argparse.Namespace, device: torch.device) -> Run:
    """The same module, optimizer and batches in a hand-written FP32 loop."""
    torch.manual_seed(0)
    module = model_cls().to(device)
    optimizer = module.configure_optimizers()
    batches = loader(data, args.batch)
    epochs: list[float] = []
    started = time.perf_counter()
    for _ in range(args.epochs + 1):
        module.train()
        EpochClock._sync()
        epoch_started = time.perf_counter()
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(module(x), y)
            loss.backward()
            optimizer.step()
        EpochClock._sync()
        epochs.append(time.perf_counter() - epoch_started)
    wall = time.perf_counter() - started
    return Run(steady_rate(epochs, len(data.train)), wall, accuracy(module, data, device))


def bench_device(accelerator: str, data: Data, args: argparse.Namespace) -> dict[str, dict[str, list[Run]]]:
    """Every configuration `args.rounds` times, interleaved (so that other work on the machine disturbs
    all of them alike); the report shows each one's best round and the range over the rounds."""
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    precisions = GPU_PRECISIONS if accelerator == "gpu" else CPU_PRECISIONS
    results: dict[str, dict[str, list[Run]]] = {label: {} for label in MODELS}
    for round_number in range(1, args.rounds + 1):
        for label, model_cls in MODELS.items():
            runs = {"plain loop 32-true": lambda m=model_cls: plain_run(m, data, args, device)}
            runs.update({f"Lightning {p}": lambda m=model_cls, p=p: lightning_run(m, data, args, p, accelerator)
                         for p in precisions})
            for name, measure in runs.items():
                run = measure()
                results[label].setdefault(name, []).append(run)
                print(f"  round {round_number} {accelerator} {label}: {name}: {run.samples_per_second:,.0f} samples/s",
                      flush=True)
    return results


def best(runs: list[Run]) -> Run:
    return max(runs, key=lambda run: run.samples_per_second)


def cell(runs: list[Run]) -> str:
    """Best samples/s, and the range over the rounds."""
    rates = [run.samples_per_second for run in runs]
    return f"{max(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"


def machine(accelerator: str) -> str:
    if accelerator == "gpu":
        return f"GPU {torch.cuda.get_device_name(0)}"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"CPU {model}, {torch.get_num_threads()} torch threads"


def section(accelerator: str, results: dict[str, dict[str, list[Run]]]) -> list[str]:
    lines = [f"## {machine(accelerator)}", "",
             "Cells: best round's samples/s (range over the rounds).", "",
             "### Lightning vs a plain PyTorch loop (FP32, same module, optimizer and batches)", "",
             "| model | plain loop | Lightning | Lightning / plain (best rounds) | fit wall time plain / Lightning (s) |",
             "|---|---:|---:|---:|---:|"]
    for label, runs in results.items():
        plain, light = best(runs["plain loop 32-true"]), best(runs["Lightning 32-true"])
        lines.append(f"| {label} | {cell(runs['plain loop 32-true'])} | {cell(runs['Lightning 32-true'])} | "
                     f"{light.samples_per_second / plain.samples_per_second:.2f}x | "
                     f"{plain.wall_seconds:.1f} / {light.wall_seconds:.1f} |")
    precisions = [name.removeprefix("Lightning ") for name in next(iter(results.values())) if name.startswith("Lightning")]
    lines += ["", "### Lightning precision", "",
              "| model | " + " | ".join(precisions) + " | " +
              " | ".join(f"{p} vs 32-true" for p in precisions[1:]) + " | held-out accuracy " +
              " / ".join(precisions) + " |",
              "|---|" + "---:|" * (2 * len(precisions))]
    for label, runs in results.items():
        rates = [best(runs[f"Lightning {p}"]).samples_per_second for p in precisions]
        accs = " / ".join(f"{best(runs[f'Lightning {p}']).accuracy:.3f}" for p in precisions)
        lines.append(f"| {label} | " + " | ".join(cell(runs[f"Lightning {p}"]) for p in precisions) + " | " +
                     " | ".join(f"{r / rates[0]:.2f}x" for r in rates[1:]) + f" | {accs} |")
    return lines + [""]


def report(sections: dict[str, dict[str, dict[str, list[Run]]]], args: argparse.Namespace,
           load: tuple[float, float]) -> str:
    lines = ["# Trainer benchmark: Lightning vs plain PyTorch, and training precision", "",
             f"Generated by `make bench` (services/trainer/bench/bench_trainer.py) on "
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
             f"- Python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}",
             f"- data: scikit-learn digits training split ({1797 - HELD_OUT} rows) tiled to {args.rows:,} rows; "
             f"batch {args.batch} (the training profiles' batch size); Adam as the recipe configures it",
             f"- throughput: samples/s of the median of {args.epochs} epochs after one warm-up epoch, best of "
             f"{args.rounds} interleaved rounds; fit wall time (of that round) includes set-up and the warm-up epoch",
             f"- machine load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores "
             "(other work on a shared machine lowers the figures; compare within one report)",
             f"- held-out accuracy: top-1 on {HELD_OUT} digits rows never trained on, after the "
             f"{args.epochs + 1} epochs", ""]
    for accelerator, results in sections.items():
        lines += section(accelerator, results)
    if "gpu" not in sections:
        lines += ["No CUDA device here: GPU figures (where bf16-mixed is expected to pay off) are recorded when the",
                  "same script runs on a machine with one.", ""]
    lines += ["## Reading", ""] + [f"- {line}" for line in findings(sections)] + [
        "- The shipped CPU profiles train in 32-true, the reference precision; a `profile_override` (or a profile",
        "  file) with bf16-true is the faster BF16 choice on a CPU with BF16 instructions, and bf16-mixed is what",
        "  the GPU profile (a100-bf16) uses. Measure per model before switching (the lines above).", ""]
    return "\n".join(lines)


def findings(sections: dict[str, dict[str, dict[str, list[Run]]]]) -> list[str]:
    """One line per device and model: Lightning's cost over the plain loop, the fastest precision."""
    lines = []
    for accelerator, results in sections.items():
        for label, runs in results.items():
            plain, base = best(runs["plain loop 32-true"]), best(runs["Lightning 32-true"])
            precision = {name.removeprefix("Lightning "): best(found).samples_per_second
                         for name, found in runs.items() if name.startswith("Lightning")}
            fastest = max(precision, key=precision.get)
            lines.append(f"{accelerator} {label}: Lightning runs at {base.samples_per_second / plain.samples_per_second:.2f}x "
                         f"the plain loop's rate; fastest precision {fastest} "
                         f"({precision[fastest] / precision['32-true']:.2f}x 32-true)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "trainer.md")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up epoch)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions; the best one is reported")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    data = digits(args.rows)
    load_before = os.getloadavg()[0]
    sections = {"cpu": bench_device("cpu", data, args)}
    if torch.cuda.is_available():
        sections["gpu"] = bench_device("gpu", data, args)
    text = report(sections, args, (load_before, os.getloadavg()[0]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
