"""The generated part of ``docs/ops.md``: the op table as Markdown."""

from __future__ import annotations

from pathlib import Path

from ._registry import REGISTRY, Registry

BEGIN = "<!-- BEGIN GENERATED: python -m splitexport.export.ops (do not edit by hand) -->"
END = "<!-- END GENERATED -->"
DOC = Path(__file__).resolve().parents[3] / "docs" / "ops.md"


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(registry: Registry = REGISTRY) -> str:
    """One row per op: torch forms, ONNX, TF.js, TFLite flex, TFLite builtin, restrictions."""
    rows = [
        "| op | torch forms | ONNX Runtime | TF.js (tf_keras layer) | TFLite flex | TFLite builtin | restrictions |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in registry.ops:
        cells = [op.name, ", ".join(f"`{f}`" for f in op.torch_forms()), op.onnx.cell(), op.tfjs.cell(),
                 op.tflite_flex.cell(), op.tflite_builtin.cell(), op.restrictions or "-"]
        rows.append("| " + " | ".join(_esc(c) for c in cells) + " |")
    return "\n".join(rows) + "\n"


def render_section(registry: Registry = REGISTRY) -> str:
    return f"{BEGIN}\n{render_table(registry)}{END}"


def generated_section(text: str) -> str:
    """The generated section of a doc (markers included), or ``""`` when it has none."""
    start, end = text.find(BEGIN), text.find(END)
    return text[start:end + len(END)] if start >= 0 and end > start else ""


def update(doc: Path = DOC) -> bool:
    """Rewrite the generated section of ``doc`` (appended when missing); returns whether it changed."""
    text = doc.read_text() if doc.exists() else "# Op support\n\n"
    old = generated_section(text)
    new = render_section()
    updated = text.replace(old, new) if old else text.rstrip("\n") + "\n\n" + new + "\n"
    if updated != text:
        doc.write_text(updated)
    return updated != text
