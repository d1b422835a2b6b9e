"""The op table: docs/ops.md is generated from it, every op maps to registered kinds, lookups are unique."""

from __future__ import annotations

import subprocess
import sys

import pytest

from splitexport.export.ops import REGISTRY, LayerKind, OpSpec, Registry, native
from splitexport.export.ops._docs import DOC, generated_section, render_section


def test_docs_ops_md_equals_the_registry() -> None:
    assert generated_section(DOC.read_text()) == render_section(), (
        "docs/ops.md is out of date: run `python -m splitexport.export.ops`"
    )


def test_the_check_command_fails_on_drift(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from splitexport.export.ops import __main__ as cli

    stale = tmp_path / "ops.md"
    stale.write_text(DOC.read_text().replace("| ReLU |", "| ReLU6 |"))
    monkeypatch.setattr(cli, "DOC", stale)
    assert cli.main(["--check"]) == 1
    assert cli.main([]) == 0 and cli.main(["--check"]) == 0
    assert generated_section(stale.read_text()) == render_section()


def test_every_op_names_its_formats_and_registered_kinds() -> None:
    assert REGISTRY.ops
    for op in REGISTRY.ops:
        assert op.build_module or op.build_function, op.name
        assert op.modules or op.functions or op.methods, op.name
        for kind in op.kinds:
            assert kind in REGISTRY.kinds, (op.name, kind)
        for support in (op.onnx, op.tfjs, op.tflite_flex, op.tflite_builtin):
            assert support.status in ("native", "decomposed", "refused")


def test_a_torch_form_cannot_be_claimed_twice() -> None:
    reg = Registry()
    def build(b, node, m, x):  # type: ignore[no-untyped-def]
        return None
    spec = OpSpec("A", "t", native(), native(), native(), native(), modules=("Foo",), build_module=build)
    reg.register(spec)
    with pytest.raises(ValueError, match="claimed by both"):
        reg.register(OpSpec("B", "t", native(), native(), native(), native(), modules=("Foo",), build_module=build))
    kind = LayerKind("k", lambda c, l, i: None, lambda *a: (None, {}), lambda *a: [])
    reg.register(kind)
    with pytest.raises(ValueError, match="twice"):
        reg.register(kind)


def test_module_entry_point_checks_the_committed_doc() -> None:
    proc = subprocess.run([sys.executable, "-m", "splitexport.export.ops", "--check"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_zoo_table_equals_its_results_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """docs/ops.md's zoo table is benchmarks/zoo_table.py's rendering of docs/zoo-results.jsonl; a change is caught."""
    script = DOC.parents[1] / "benchmarks" / "zoo_table.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    results = DOC.parent / "zoo-results.jsonl"
    rows = results.read_text().splitlines()
    changed = tmp_path / "results.jsonl"
    changed.write_text("\n".join(rows[1:]) + "\n")  # one measurement fewer
    proc = subprocess.run([sys.executable, str(script), "--check", "--results", str(changed)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 1 and "differs" in proc.stderr


def test_every_aten_key_is_a_torch_op_the_lookup_finds() -> None:
    """``aten`` keys match the ``torch.ops.aten`` calls of a TorchScript segment read as fx: each names a real op (or
    overload), every overload it covers is found by ``for_aten``, and ``aten_args`` fits one of their schemas."""
    import torch

    keyed = [op for op in REGISTRY.ops if op.aten]
    assert keyed
    for op in keyed:
        assert op.aten_args, op.name
        for key in op.aten:
            namespace, name, *overload = key.split(".")
            assert namespace == "aten" and len(overload) <= 1, key
            packet = getattr(torch.ops.aten, name)
            overloads = [getattr(packet, o) for o in (overload or packet.overloads())]
            assert all(REGISTRY.for_aten(o) is op for o in overloads), key
            assert any(len(o._schema.arguments) >= len(op.aten_args) for o in overloads), key
    assert REGISTRY.for_aten(torch.ops.aten.arange.start) is None  # only the overloads a key names
    assert REGISTRY.for_aten(torch.ops.aten.softplus.default) is None
