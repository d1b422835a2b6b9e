"""The zoo table of docs/ops.md: every zoo model x format, the largest per-step difference from torch.

    python benchmarks/zoo_table.py --run     # runs the zoo tests (ORT, TF.js, TFLite; about 30 min on 2 cores),
                                             # writes docs/zoo-results.jsonl and the table in docs/ops.md
    python benchmarks/zoo_table.py           # re-renders the table from docs/zoo-results.jsonl
    python benchmarks/zoo_table.py --check   # exit 1 when docs/ops.md's table differs from the results file
    python benchmarks/zoo_table.py --smoke   # prints the table rendered from docs/zoo-results.jsonl (writes nothing)

The numbers come from the tests themselves (``tests/zoo_results.py``): ``tests/device_runtime/test_ort_zoo.py``
(ORT A | torch B | ORT C in lockstep with torch copies, 20 steps, batch 8),
``tests/splitexport/export/test_zoo_tf.py`` (image and tabular models, 20 steps, batch 4, torch's state loaded
before every step) and ``tests/splitexport/export/test_seq_ops_zoo.py`` (transformer, GRU, LSTM; 20 steps,
batch 16). A cell is the largest difference over weights, BatchNorm statistics and input gradients of A and C,
or the one-line refusal of the builtin TFLite variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.zoo import ZOO
from tests.zoo_results import ENV, FORMATS

RESULTS = ROOT / "docs" / "zoo-results.jsonl"
DOC = ROOT / "docs" / "ops.md"
BEGIN = "<!-- BEGIN ZOO TABLE: python benchmarks/zoo_table.py (do not edit by hand) -->"
END = "<!-- END ZOO TABLE -->"
TESTS = (
    "tests/device_runtime/test_ort_zoo.py",
    "tests/splitexport/export/test_zoo_tf.py",
    "tests/splitexport/export/test_seq_ops_zoo.py",
)
_HEAD = ("ONNX Runtime", "TF.js", "TFLite flex", "TFLite builtin")


def _cell(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "not measured"
    texts = [str(r["value"]) for r in rows if isinstance(r["value"], str)]
    if texts:
        return "refused: `" + texts[0].replace("|", "\\|") + "`"
    worst = max(float(r["value"]) for r in rows)  # type: ignore[arg-type]
    segs = "+".join(sorted({str(r["segment"]) for r in rows}))
    return f"{worst:.1e} ({segs})"


def render(results: list[dict[str, object]]) -> str:
    lines = ["| zoo model (`tests/zoo.py`) | " + " | ".join(_HEAD) + " |", "|---|" + "---|" * len(_HEAD)]
    for name in ZOO:
        cells = [_cell([r for r in results if r["model"] == name and r["format"] == f]) for f in FORMATS]
        notes = {str(r["note"]) for r in results if r["model"] == name and r.get("note")}
        label = name + (f" ({', '.join(sorted(notes))})" if notes else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name in ZOO:
        conv = [r for r in results if r["model"] == name and str(r["format"]).startswith("dropout_")]
        if conv:
            cells = [next((str(r["value"]) for r in conv if r["format"] == f"dropout_{f}"), "not run") for f in FORMATS]
            lines.append(f"| {name} with Dropout (convergence) | " + " | ".join(cells) + " |")
    return f"{BEGIN}\n" + "\n".join(lines) + f"\n{END}"


def section(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    return text[start:end + len(END)] if start >= 0 and end > start else ""


def load(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_tests(out: Path) -> int:
    env = {**os.environ, ENV: str(out), "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
           "TFDF_DISABLE_WELCOME_MESSAGE": "1"}
    code = 0
    for test in TESTS:  # one pytest per file (TensorFlow and ORT in one process is not needed)
        code |= subprocess.run([sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                               env=env, check=False).returncode
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="run the zoo tests first (slow) and keep their results")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--check", action="store_true", help="only check docs/ops.md against the results file")
    p.add_argument("--smoke", action="store_true", help="print the table from the results file; write nothing")
    args = p.parse_args(argv)
    if args.run:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "results.jsonl"
            if run_tests(out) != 0:
                print("zoo_table: a zoo test failed; docs left unchanged", file=sys.stderr)
                return 1
            args.results.write_text(out.read_text())
    if not args.results.exists():
        print(f"zoo_table: no results file {args.results}; run with --run", file=sys.stderr)
        return 2
    table = render(load(args.results))
    if args.smoke:
        print(table)
        return 0
    text = DOC.read_text()
    if args.check:
        if section(text) != table:
            print(f"{DOC}: the zoo table differs from {args.results}; run python benchmarks/zoo_table.py",
                  file=sys.stderr)
            return 1
        return 0
    old = section(text)
    new_text = text.replace(old, table) if old else text.rstrip("\n") + "\n\n" + table + "\n"
    DOC.write_text(new_text)
    print(f"{DOC}: zoo table {'updated' if new_text != text else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
