"""The house rules: stages stand on the core and never import each other.

Every import of this package's modules is read from the source (AST), function-local
imports included, so a lazy import cannot hide a dependency.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ezsasrec_ray"
STAGES = {"prepare", "train", "tune", "evaluate", "score", "serve", "export"}
ORCHESTRATORS = {"cli", "pipeline", "easy", "demo", "synth"}


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imported_modules(name: str) -> set[str]:
    """Modules of this package that ``name`` imports anywhere in its source."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(alias.name for alias in node.names)
            elif (node.module or "").startswith("ezsasrec_ray."):
                found.add(node.module.split(".")[1])
            elif node.module == "ezsasrec_ray":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ezsasrec_ray."):
                    found.add(alias.name.split(".")[1])
    return found & set(modules())


def test_layers_are_known():
    core = set(modules()) - STAGES - ORCHESTRATORS
    assert STAGES <= set(modules()) and ORCHESTRATORS <= set(modules())
    assert {"dataset", "vocab", "model", "encoder", "topk", "topk_device", "losses", "fit",
            "outputs", "model_io", "runtime"} <= core


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_imports_no_other_stage_or_orchestrator(name):
    bad = imported_modules(name) & (STAGES | ORCHESTRATORS) - {name}
    assert not bad, f"stage {name} imports {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(set(modules()) - STAGES - ORCHESTRATORS))
def test_core_imports_only_core(name):
    bad = imported_modules(name) & (STAGES | ORCHESTRATORS)
    assert not bad, f"core module {name} imports {sorted(bad)}"


def test_the_check_sees_function_local_imports(tmp_path, monkeypatch):
    (tmp_path / "score.py").write_text("def f():\n    from .train import x\n")
    (tmp_path / "train.py").write_text("import ezsasrec_ray.score\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path)
    assert imported_modules("score") == {"train"}
    assert imported_modules("train") == {"score"}
