"""The package layout keeps its promises: no import circles, small top level, commands independent."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder (cli/ and models/ install as onnx_saliency.cli / onnx_saliency.models)
PACKAGES = {"onnx_saliency": "onnx_saliency", "onnx_saliency.cli": "cli", "onnx_saliency.models": "models",
            "graph_passes": "graph_passes"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (at any depth in the file, lazy imports included). A package's
    __init__ is a target when named; a module importing its own parent package is not an edge."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_no_import_circle_anywhere():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_command_imports_another_command():
    graph = import_graph()
    commands = {m for m in graph if m.startswith("onnx_saliency.cli.") and m not in (
        "onnx_saliency.cli.common", "onnx_saliency.cli.main")}
    for command in commands:
        assert not graph[command] & commands, (command, graph[command] & commands)
        assert "onnx_saliency.cli.main" not in graph[command], command


def test_top_level_holds_only_the_front_door_and_cross_cutting_modules():
    top = sorted(p.stem for p in (ROOT / "onnx_saliency").glob("*.py") if p.stem != "__init__")
    assert len(top) <= 8, top
    for room in ("intake", "engine", "methods", "lrp", "evaluation", "audit", "output", "scale"):
        assert (ROOT / "onnx_saliency" / room / "__init__.py").is_file(), room


def test_documented_imports_keep_working():
    from graph_passes import append_vjp, canonicalize, lrp, vjp  # noqa: F401
    from onnx_saliency import Explainer, SaliencyError, __version__  # noqa: F401
    from onnx_saliency.audit import audit  # noqa: F401
    from onnx_saliency.engine import Engine  # noqa: F401
    from onnx_saliency.evaluation import evaluate  # noqa: F401
    from onnx_saliency.intake import load_model  # noqa: F401
    from onnx_saliency.lrp import relevance_at, rule_report  # noqa: F401
    from onnx_saliency.methods import get_method  # noqa: F401
    from onnx_saliency.output import explain_images  # noqa: F401
