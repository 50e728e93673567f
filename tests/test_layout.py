"""The layout of the top-level files: libraries at the bottom, phase scripts on top. Parsed
from the sources (ast), nothing imported: each module imports only the layers below it (the
modelling modules torch alone), no phase script imports another phase script, the project's
own imports form no cycle, each phase script's main() shows its Alg. 1 lines within one
screen and holds no training loop of its own (trainer.fit is the one loop), the speed
machinery lives in speed.py, and Eq. (11) is fused in one place."""
import ast
import sys
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


# what each library module may import of the project: the modelling modules nothing, then
# evaluation and run files, the training loop, and the gate fit beside phase 3
LAYERS = {"dataset": set(), "mmd": set(), "models": set(), "speed": set(),
          "runs": {"dataset", "models"}, "evaluate": {"dataset", "models", "runs"},
          "trainer": {"dataset", "evaluate", "models", "runs", "speed"},
          "gate_fit": {"dataset", "evaluate", "models", "trainer"}}
TRAINING_SCRIPTS = ("pretrain", "align", "finetune")  # Alg. 1's three phases


def imports(name):
    """Top-level names of every module that ROOT/name.py imports."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_each_library_imports_only_the_layers_below_it():
    graph = own_imports()
    bad = {m: graph[m] - allowed for m, allowed in LAYERS.items() if graph[m] - allowed}
    assert not bad, f"imports across layers: {bad}"


def test_modelling_modules_import_torch_alone():
    """A reader can lift mmd.py, models.py, dataset.py or speed.py out with torch alone."""
    for name in ("dataset", "mmd", "models", "speed"):
        outside = {m for m in imports(name) if m not in sys.stdlib_module_names}
        assert outside == {"torch"}, f"{name}.py imports {outside}"


def phase_main(name):
    """(source lines, ast) of main() in ROOT/name.py."""
    source = (ROOT / f"{name}.py").read_text()
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    return source.splitlines()[main.lineno - 1:main.end_lineno], main


def test_each_phase_main_shows_its_algorithm_lines_within_one_screen():
    for name in TRAINING_SCRIPTS:
        lines, main = phase_main(name)
        assert len(lines) <= 45, f"{name}.main() is {len(lines)} lines"
        assert any("# --- Alg. 1 line" in line for line in lines), f"{name}.main() names no line of Alg. 1"
        calls = [ast.unparse(n.func) for n in ast.walk(main) if isinstance(n, ast.Call)]
        assert calls[:2] == ["flags", "setup"] and calls.count("fit") <= 1 and "finish" in calls


def test_no_phase_script_holds_a_training_loop():
    """Every gradient step of phases 1-3 is trainer.fit's: no phase script calls backward or an
    optimiser itself (the gate fit beside phase 3 lives in gate_fit.py)."""
    for name in TRAINING_SCRIPTS:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        steps = {ast.unparse(n.func).rsplit(".", 1)[-1] for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert not steps & {"backward", "zero_grad", "step", "Adam", "AdamW", "SGD"}, f"{name}.py trains on its own"
        assert "fit" in steps


def test_speed_machinery_enters_the_trainer_at_three_points():
    """--precision, --fast-dropout and --compile live in speed.py; trainer.fit calls its
    optimizer, compile_loss and step_context (add_speed_args adds the flags; checkpoint_replay
    redoes a chunk of the CE under the same dropout mode; setup calls reuse_freed_memory on a CPU)."""
    tree = ast.parse((ROOT / "trainer.py").read_text())
    from_speed = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "speed" for a in n.names}
    assert from_speed == {"add_speed_args", "checkpoint_replay", "compile_loss", "optimizer", "reuse_freed_memory",
                          "step_context"}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"autocast", "compile", "TorchFunctionMode"}, "speed machinery in trainer.py"


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
    """Only models.PAD.fuse multiplies gate probabilities into expert logits (or, --mix prob,
    into their distributions: mix_probabilities, which only fuse calls); everything else
    (training logits, full ranking, serving) calls fuse."""
    sources = {p.name: p.read_text() for p in ROOT.glob("*.py")}
    callers = [name for name, src in sources.items() if "self.gate(" in src or ".gate(" in src.replace("self.gate(", "")]
    assert callers == ["models.py"]
    tree = ast.parse(sources["models.py"])
    pad = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PAD")
    gate_calls = {f.name for f in pad.body if isinstance(f, ast.FunctionDef)
                  for node in ast.walk(f) if isinstance(node, ast.Call) and ast.unparse(node.func) == "self.gate"}
    assert gate_calls == {"fuse", "mix_probabilities", "gate_per_bucket"}  # gate_per_bucket reports g, it fuses nothing
    mixers = {f.name for f in pad.body if isinstance(f, ast.FunctionDef)
              for node in ast.walk(f) if isinstance(node, ast.Call) and ast.unparse(node.func) == "self.mix_probabilities"}
    assert mixers == {"fuse"}
