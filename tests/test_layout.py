"""docs/layout.md lists every module of the package once, layer by layer; imports follow the layers
(a module imports only from its own layer and the ones listed before it), the engine's modules
import only those listed before them, and there is no circle of imports anywhere (lazy imports
inside functions count: they hide a circle, they do not remove it)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "prunestudy"
LAYOUT = ROOT / "docs" / "layout.md"
ENGINE = "Engine"


def documented() -> list[tuple[str, list[str]]]:
    """[(layer, [module, ...])] in the order of docs/layout.md's package section."""
    text = LAYOUT.read_text()
    text = text[text.index("## The package, layer by layer"):text.index("## The report package")]
    layers: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        head = re.match(r"\*\*([^*]+)\*\*", line)
        if head:
            layers.append((head.group(1), []))
        row = re.match(r"\| `([^`]+)` \|", line)
        if row and layers:
            layers[-1][1].append(row.group(1))
    return layers


def module_name(entry: str) -> str:
    if entry == "__init__.py":
        return "prunestudy"
    return "prunestudy." + entry.rstrip("/").removesuffix(".py").replace("/", ".")


def imports() -> dict[str, set[str]]:
    """{module: the package's modules it imports, anywhere in its code}; report.* counted as report."""
    found = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                             or (PKG.parent / sub.replace(".", "/")).is_dir() else target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prunestudy"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("prunestudy"))
        found[name] = {d for d in deps if d != name}
    return found


def _group(name: str) -> str:
    return "prunestudy.report" if name.startswith("prunestudy.report") else name


def test_the_layout_page_lists_every_module_once():
    listed = [m for _, mods in documented() for m in mods]
    assert len(listed) == len(set(listed)), "a module listed twice"
    on_disk = {p.relative_to(PKG).as_posix() for p in PKG.glob("*.py")} | {"report/", "templates/"}
    assert set(listed) == on_disk, (sorted(on_disk - set(listed)), sorted(set(listed) - on_disk))


def test_no_module_imports_a_later_layer_and_the_engine_runs_one_way():
    layers = documented()
    rank = {}
    for i, (_, mods) in enumerate(layers):
        for m in mods:
            if m.endswith(".py") or m == "report/":
                rank[module_name(m)] = i
    engine = next(mods for layer, mods in layers if layer.startswith(ENGINE))
    order = [module_name(m) for m in engine]
    problems = []
    for mod, deps in imports().items():
        here = _group(mod)
        for dep in map(_group, deps):
            if dep == here or dep not in rank:
                continue
            if rank[dep] > rank[here]:
                problems.append(f"{mod} imports {dep}, a later layer")
            elif here in order and dep in order and order.index(dep) > order.index(here):
                problems.append(f"{mod} imports {dep}, listed after it in the engine")
    assert not problems, "\n".join(problems)


def test_no_circle_of_imports_in_the_package():
    edges = imports()
    seen, stack, circles = set(), [], []

    def visit(m):
        if m in stack:
            circles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            visit(d)
        stack.pop()

    for m in sorted(edges):
        visit(m)
    assert not circles, circles
