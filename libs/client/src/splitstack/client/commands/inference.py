"""`predict`: rows through serving's Open Inference Protocol endpoint.

Inputs come from a `.npy` file (one array: the model's only input), a `.npz` file (arrays by input
name) or a `.json` file (a list of rows for the only input, or {input name: rows}); JSON numbers
are sent as FP32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from splitstack.client.commands.common import CommandError, json_option, platform_options, print_json, session


def read_inputs(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """The request's inputs from a .npy, .npz or .json file; an unreadable file is a CommandError."""
    if not path.is_file():
        raise CommandError(f"--input {path}: no such file")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                return {name: arrays[name] for name in arrays.files}
        if path.suffix == ".json":
            doc = json.loads(path.read_text())
            if isinstance(doc, dict):
                return {name: np.asarray(rows, dtype=np.float32) for name, rows in doc.items()}
            return np.asarray(doc, dtype=np.float32)
    except (ValueError, OSError) as exc:
        raise CommandError(f"--input {path}: {exc}") from None
    raise CommandError(f"--input {path}: expected a .npy, .npz or .json file")


def outputs_table(outputs: dict[str, np.ndarray]) -> Table:
    """Per row: the predicted class (argmax) of every 2-D output, and the output's leading values."""
    table = Table("row", *(f"{name} argmax" for name in outputs), *(f"{name} (first values)" for name in outputs))
    rows = max((len(a) for a in outputs.values() if a.ndim), default=0)
    for row in range(rows):
        classes = [str(int(np.argmax(a[row]))) if a.ndim == 2 else "-" for a in outputs.values()]
        values = [np.array2string(np.ravel(a[row])[:4], precision=3, suppress_small=True) for a in outputs.values()]
        table.add_row(str(row), *classes, *values)
    return table


def _predict(args: argparse.Namespace, out: Console) -> int:
    inputs = read_inputs(Path(args.input))
    with session(args) as platform:
        outputs = platform.predict(args.model, inputs, target=args.target, version=args.version)
    if args.json:
        print_json({name: array for name, array in outputs.items()})
    else:
        out.print(outputs_table(outputs))
    return 0


def add_inference_commands(commands: argparse._SubParsersAction) -> None:
    """`predict MODEL --input FILE`."""
    predict = commands.add_parser("predict", parents=[platform_options()],
                                  help="run rows through the served model (Open Inference Protocol)")
    predict.add_argument("model")
    predict.add_argument("--input", required=True, metavar="FILE", help=".npy, .npz or .json")
    predict.add_argument("--target", default="cpu", help="which serving target (default %(default)s)")
    predict.add_argument("--version", type=int, help="a loaded version (default: the current one)")
    json_option(predict)
    predict.set_defaults(handler=_predict)
