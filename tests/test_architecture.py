"""The package's import structure (docs/ARCHITECTURE.md): layers point down, no cycles."""

import ast
from pathlib import Path

import lesionkeras

PACKAGE = Path(lesionkeras.__file__).parent

# Layer of each top-level module or subpackage: a module imports only its own
# layer or lower ones (DESIGN.md, "Rules that keep it simple").
LAYERS = {
    "__init__": 0, "errors": 0, "config": 0, "config_fields": 0, "config_tables": 0,
    "shapes": 0, "console": 0, "files": 0,
    "data": 1, "models": 1, "losses": 1, "metrics": 1, "schedules": 1, "postprocess": 1,
    "training": 2, "inference": 2, "export": 2, "export_onnx": 2, "classify": 2,
    "methods": 3,
    "experiments": 4, "cli": 4, "cli_options": 4, "cli_train": 4, "cli_infer": 4, "cli_data": 4,
}
# Nothing imports `cli`. Within layer 1 the families stay apart: models read no data, data builds no model.
FORBIDDEN = {("models", "data"), ("data", "models"), ("inference", "training"),
             ("training", "inference"), ("training", "classify")}


def _module_name(path):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path):
    """Every `lesionkeras...` module `path` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lesionkeras"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if not base.startswith("lesionkeras"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _exists(candidate) else base)
    return {m for m in found if m != me}


def _exists(module):
    rel = PACKAGE.parent / Path(*module.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def _graph():
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _top(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert tops <= set(LAYERS), sorted(tops - set(LAYERS))


def test_imports_point_down():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            a, b = _top(module), _top(target)
            if target == "lesionkeras.cli" or (
                    a != b and (LAYERS[b] > LAYERS[a] or (a, b) in FORBIDDEN)):
                upward.append(f"{module} -> {target}")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_an_upward_import(tmp_path, monkeypatch):
    # The walker itself: a models module importing a method must be reported.
    fake = tmp_path / "lesionkeras"
    (fake / "models").mkdir(parents=True)
    (fake / "methods").mkdir()
    for init in (fake / "__init__.py", fake / "models" / "__init__.py",
                 fake / "methods" / "__init__.py"):
        init.write_text("")
    (fake / "models" / "net.py").write_text("def f():\n    from lesionkeras.methods import m\n")
    (fake / "methods" / "m.py").write_text("from lesionkeras.models import net\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    graph = _graph()
    assert graph["lesionkeras.models.net"] == {"lesionkeras.methods.m"}
    assert graph["lesionkeras.methods.m"] == {"lesionkeras.models.net"}
