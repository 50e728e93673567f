"""The layout of the top-level files: libraries at the bottom, phase scripts on top. Parsed
from the sources (ast), nothing imported: no phase script imports another phase script, the
project's own imports form no cycle, and Eq. (11) is fused in one place."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASE_SCRIPTS = {"prepare_data", "pretrain", "align", "finetune", "baselines", "experiments"}


def own_imports():
    """{module: set of top-level project modules it imports}, for every *.py at the root."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for name in modules:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = found & modules
    return graph


def test_no_phase_script_imports_another():
    graph = own_imports()
    assert PHASE_SCRIPTS <= graph.keys()
    bad = {m: graph[m] & PHASE_SCRIPTS for m in PHASE_SCRIPTS if graph[m] & PHASE_SCRIPTS}
    assert not bad, f"phase scripts importing phase scripts: {bad}"


def test_no_import_cycle():
    graph, done, path = own_imports(), set(), []

    def visit(m):
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_eq11_fusion_is_defined_once():
    """Only models.PAD.fuse multiplies gate probabilities into expert logits; everything
    else (training logits, full ranking, serving) calls it."""
    sources = {p.name: p.read_text() for p in ROOT.glob("*.py")}
    callers = [name for name, src in sources.items() if "self.gate(" in src or ".gate(" in src.replace("self.gate(", "")]
    assert callers == ["models.py"]
    tree = ast.parse(sources["models.py"])
    pad = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PAD")
    gate_calls = {f.name for f in pad.body if isinstance(f, ast.FunctionDef)
                  for node in ast.walk(f) if isinstance(node, ast.Call) and ast.unparse(node.func) == "self.gate"}
    assert gate_calls == {"fuse", "gate_per_bucket"}  # gate_per_bucket reports g, it fuses nothing
