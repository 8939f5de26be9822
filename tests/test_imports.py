"""The import graph of src/equiopt: no cycle, and no import of an equiopt module inside a
function (the way a cycle is usually hidden). Read from the source with ast."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "equiopt"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if not base.startswith("equiopt"):
        return []
    if node.module is None:  # from . import a, b
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def graph():
    edges, inner = {}, []
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in tree.body:  # module level (incl. try/if blocks)
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    break
                if isinstance(sub, ast.ImportFrom):
                    deps |= {d for d in resolve(mod, is_pkg, sub) if d in modules or d.rsplit(".", 1)[0] in modules}
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for sub in ast.walk(fn):
                if isinstance(sub, ast.ImportFrom) and resolve(mod, is_pkg, sub):
                    inner.append(f"{mod}.{fn.name}: line {sub.lineno}")
        edges[mod] = {d if d in modules else d.rsplit(".", 1)[0] for d in deps} - {mod}
    return edges, inner


def find_cycle(edges):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle():
    edges, _ = graph()
    # a package's __init__ imports its submodules; the submodules import each other, not it
    edges = {m: {d for d in ds if not (m.startswith(d + ".") and d in edges)} for m, ds in edges.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_no_function_level_import_of_equiopt_modules():
    _, inner = graph()
    assert inner == [], inner


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
