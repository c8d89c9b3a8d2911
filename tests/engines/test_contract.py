"""The engine contract (engines.base): one signature for every engine, the CLI's engine list from the registry,
no import cycle among the ONNX-side engine modules and no armor_export.pipeline import in any engine."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import engines
from engines import LOWERINGS, get_lowering

ROOT = Path(engines.__file__).parent
CONVERTED = ("torch", "onnx", "genai", "tensorrt")  # trtllm: converted on its own branch


def test_cli_engines_are_the_registry():
    from armor_export.cli import ENGINES, build_parser

    assert ENGINES == tuple(LOWERINGS)
    p = build_parser()
    for argv in (["export", "--artifact", "a", "--out", "o", "--engine"], ["--engine"]):
        for name in LOWERINGS:
            assert p.parse_args([*argv, name]) is not None


@pytest.mark.parametrize("name", CONVERTED)
def test_engine_signature(name):
    low = get_lowering(name)
    want = {"requires": ["artifact_dir", "cfg"], "lower": ["artifact_dir", "out_dir", "cfg"],
            "verify": ["artifact_dir", "engine_dir", "cfg"]}
    for meth, params in want.items():
        assert list(inspect.signature(getattr(low, meth)).parameters) == params, (name, meth)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_no_import_cycle_and_no_pipeline_import():
    mods = {p.stem: _imports(p) for p in ROOT.glob("*.py") if p.stem != "__init__"}
    onnx_side = [m for m in mods if not m.startswith(("trtllm", "hf_checkpoint"))]  # those: the trtllm branch
    for m in onnx_side:
        assert not any(i.startswith("armor_export.pipeline") for i in mods[m]), m
    graph = {m: {i.split(".")[1] for i in mods[m] if i.startswith("engines.") and i.split(".")[1] in mods}
             for m in onnx_side}

    def reach(start, seen):
        for n in graph.get(start, ()):
            if n not in seen:
                seen.add(n)
                reach(n, seen)
        return seen

    for m in onnx_side:
        assert m not in reach(m, set()), f"import cycle through engines.{m}"
