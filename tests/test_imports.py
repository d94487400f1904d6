"""The import structure: arrows point down (scripts -> ldm), no circles, no sys.path edits."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def our_modules():
    """{dotted name: path} of main.py, every module under ldm/ and every script."""
    modules = {"main": os.path.join(ROOT, "main.py")}
    for top in ("ldm", "scripts"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    modules[dotted.removesuffix(".__init__")] = path
    return modules


def imports_of(path, modules):
    """Our modules that `path` imports anywhere in its body (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph():
    modules = our_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_scripts_are_leaves_and_ldm_imports_no_script():
    edges = graph()
    for module, targets in edges.items():
        if module.startswith("scripts.") or module.startswith("ldm"):
            bad = sorted(t for t in targets if t == "main" or t.startswith("scripts"))
            assert not bad, f"{module} imports {bad}"


def test_no_sys_path_edits():
    for path in our_modules().values():
        assert "sys.path" not in open(path, encoding="utf-8").read(), path
