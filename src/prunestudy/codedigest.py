"""What computes a stage, as digests: the package code its entry points reach, its notebook's code
cells and the lock file. A stage's key holds them (prunestudy.graph), so an edit of the code that
computes a stage recomputes it, and an edit elsewhere does not.

The rule, read statically from the source (nothing is imported):

- **Reached code.** From a stage's entry points (`graph.Stage.code`, e.g. `stages:run_prune`) every
  name a function, class or module-level assignment uses is followed to the package's own
  definitions: `prune.apply` -> `prune.py`'s `apply`, and on through everything it uses; a
  registry filled by module-level calls (`methods.register(...)`) is followed with its module.
  The digest of a file is that of the definitions reached in it (their syntax trees), so
  formatting, comments and code the stage never reaches do not count, while any edit of reached
  code does, docstrings included. A function moved to another module without a change of its
  callers' text is not possible, so a move of reached code recomputes; a move of unreached code
  (an unrelated helper) does not.
- **Not followed:** argument defaults (the values a stage runs with are its parameters, which are
  in the key) and the bookkeeping modules (`BOOKKEEPING`: records, the run folder's lock, keys,
  the store, progress bars) that say where and how a result is kept, not what it is; and the
  machine's facts (`machine`: cores, CPU, threads, GPUs), which say what it is computed on: its
  description is a parameter of the keys of the measurements that depend on it (timing, analysis),
  and its cores only set how many workers and threads compute a stage, which no other key holds
  (prunestudy.graph).
- **The notebook**: its code cells, not its outputs, metadata or the `parameters` cell (its values
  are the parameters). For the analysis, whose notebook is the report, the package code its cells
  call is followed too; the stage notebooks' display calls are presentation and are not.
- **The environment**: the digest of `requirements.lock` (every package's version and hashes).

Computed once per process (a kernel digests the code it imported): every stage's digest took 0.49 s
with nothing cached and 0.02 s with the parsed files' summaries cached (benchmarks/bench_keys.py).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from pathlib import Path

from . import config

PACKAGE = "prunestudy"
PACKAGE_DIR = Path(__file__).resolve().parent
LOCK = "requirements.lock"
# where and how a result is kept, the progress shown while it is computed, and the machine it is computed on
# (whose description is a parameter of the keys it defines: timing, analysis): not what it is
BOOKKEEPING = ("records", "runlock", "graph", "codedigest", "stagestore", "progress", "kernels", "machine")
# the parameter schema: defaults and descriptions, not code (a stage's values are its parameters)
NOT_FOLLOWED = (("config", "SCHEMA"),)
DIGEST_CHARS = 16
SUMMARIES = "code"       # the folder of parsed files' summaries, in the caches' folder (config.cache_root)
SUMMARY_FORMAT = 1       # of the cached summaries: bump when what a summary holds changes


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:DIGEST_CHARS]


class _Module:
    """One source file, summarised: each top-level definition's digest and the names it uses, the
    same for its module-level statements ("<module>"), and its import aliases."""

    def __init__(self, name: str, package: str, defs: dict[str, tuple[str, list]], aliases: dict):
        self.name, self.package = name, package
        self.defs = defs                   # name -> (digest, [reference, ...]); "<module>" included
        self.aliases = aliases             # local name -> (module, attr or None)

    @classmethod
    def parse(cls, name: str, source: str, is_package: bool) -> _Module:
        tree = ast.parse(source)
        package = name if is_package else name.rpartition(".")[0]
        nodes: dict[str, list[ast.AST]] = {"<module>": []}   # statements that run on import (registrations)
        body = list(tree.body)
        if body and _is_docstring(body[0]):
            body = body[1:]
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                nodes.setdefault(node.name, []).append(node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                for n in names or ["<module>"]:
                    nodes.setdefault(n, []).append(node)
            elif not isinstance(node, (ast.Import, ast.ImportFrom)):
                nodes["<module>"].append(node)
        aliases: dict[str, tuple[str, str | None]] = {}
        for node in _statements(tree.body):   # imports anywhere (lazy ones inside functions too)
            if isinstance(node, ast.ImportFrom):
                base = _absolute(package, node)
                for a in node.names:
                    aliases[a.asname or a.name] = (base, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], None)
        defs = {n: (_sha("\n".join(_normalised(x) for x in ns)), sorted(set().union(*map(_references, ns))))
                for n, ns in nodes.items()}
        return cls(name, package, defs, aliases)

    def to_json(self) -> dict:
        return {"format": SUMMARY_FORMAT, "name": self.name, "package": self.package,
                "defs": {n: [d, [list(r) for r in refs]] for n, (d, refs) in self.defs.items()},
                "aliases": {k: list(v) for k, v in self.aliases.items()}}

    @classmethod
    def from_json(cls, d: dict) -> _Module:
        if d.get("format") != SUMMARY_FORMAT:
            raise ValueError("another format")
        return cls(d["name"], d["package"], {n: (dg, [tuple(r) for r in refs]) for n, (dg, refs) in d["defs"].items()},
                   {k: (v[0], v[1]) for k, v in d["aliases"].items()})


def _absolute(package: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _statements(body: list):
    """Every statement, nested ones too (imports are statements: no expression holds one)."""
    for node in body:
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                yield from _statements(inner)


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _normalised(node: ast.AST) -> str:
    """The syntax tree without positions; docstrings stay (an edited docstring may recompute)."""
    return ast.dump(node, include_attributes=False)


def _references(node: ast.AST) -> set[tuple[str, ...]]:
    """(name, attr, attr, ...) of every name and attribute chain the node uses, argument defaults
    left out."""
    out: set[tuple[str, ...]] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Attribute):
            chain, x = [n.attr], n.value
            while isinstance(x, ast.Attribute):
                chain.append(x.attr)
                x = x.value
            if isinstance(x, ast.Name):
                chain.append(x.id)
                out.add(tuple(reversed(chain)))
            else:
                stack.append(x)
            continue
        if isinstance(n, ast.Name):
            out.add((n.id,))
            continue
        if isinstance(n, ast.arguments):   # argument defaults: the values are parameters of the key
            stack += [a.annotation for a in (*n.posonlyargs, *n.args, *n.kwonlyargs) if a.annotation]
            continue
        stack.extend(ast.iter_child_nodes(n))
    return out


class Index:
    """The package's modules, parsed once; what a set of entry points reaches."""

    def __init__(self, package_dir: Path = PACKAGE_DIR, cache: Path | None = None):
        self.dir = Path(package_dir)
        self.cache = Path(cache) if cache else None   # summaries of parsed files, by their bytes' digest
        self.sources: dict[str, tuple[Path, bool]] = {}   # module -> (file, is a package): parsed when reached
        for path in sorted(self.dir.rglob("*.py")):
            rel = path.relative_to(self.dir).with_suffix("")
            parts = [PACKAGE, *rel.parts]
            is_pkg = parts[-1] == "__init__"
            self.sources[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
        self._parsed: dict[str, _Module] = {}
        self._defs: dict[tuple[str, str], tuple[str, list]] = {}   # (module, name) -> (digest, what it reaches)

    def module(self, name: str) -> _Module:
        """A module's summary: from the summary cache when its source was summarised before (by
        the digest of its bytes), else parsed (and cached)."""
        if name not in self._parsed:
            path, is_pkg = self.sources[name]
            source = path.read_bytes()
            cached = self.cache / f"{_sha(source + name.encode())}.json" if self.cache else None
            module = None
            if cached is not None and cached.is_file():
                try:
                    module = _Module.from_json(json.loads(cached.read_text()))
                except (OSError, ValueError, KeyError, TypeError):   # damaged: dropped, parsed again
                    module = None
            if module is None:
                module = _Module.parse(name, source.decode(), is_pkg)
                if cached is not None:
                    _save(cached, module.to_json())
            self._parsed[name] = module
        return self._parsed[name]

    def _definition(self, mod: str, name: str) -> tuple[str, list]:
        """A definition's digest and the definitions it uses (resolved once)."""
        if (mod, name) not in self._defs:
            m = self.module(mod)
            digest, refs = m.defs.get(name, (_sha(""), []))
            uses = [] if name == "<module>" else [(mod, "<module>")]
            for ref in refs:
                uses += self.resolve(m, ref)
            self._defs[(mod, name)] = (digest, uses)
        return self._defs[(mod, name)]

    def _in_module(self, module: str, parts: tuple[str, ...], depth: int = 0) -> list[tuple[str, str]]:
        if not parts or module not in self.sources or depth > 20:
            return []
        head = parts[0]
        if f"{module}.{head}" in self.sources:
            return self._in_module(f"{module}.{head}", parts[1:], depth + 1)
        m = self.module(module)
        if head in m.defs:
            return [(module, head)]
        if head in m.aliases:   # a re-export (report/__init__.py), or a module imported there
            target, attr = m.aliases[head]
            if attr is None:
                return self._in_module(target, parts[1:], depth + 1)
            return self._in_module(target, (attr, *parts[1:]), depth + 1)
        return []

    def resolve(self, module: _Module, ref: tuple[str, ...]) -> list[tuple[str, str]]:
        head = ref[0]
        if head in module.defs:
            return [(module.name, head)]
        if head in module.aliases:
            target, attr = module.aliases[head]
            if attr is None:
                return self._in_module(target, ref[1:])
            return self._in_module(target, (attr, *ref[1:]))
        return []

    def reach(self, entries: list[tuple[str, str]], extra: list[_Module] = ()) -> dict[str, dict[str, str]]:
        """{module: {definition: digest}} of everything the entries (and the `extra` pseudo-modules'
        statements: a notebook's cells) reach, the bookkeeping modules left out."""
        skip = {f"{PACKAGE}.{b}" for b in BOOKKEEPING}
        not_followed = {(f"{PACKAGE}.{m}", n) for m, n in NOT_FOLLOWED}
        todo, seen, out = list(entries), set(), {}
        for pseudo in extra:
            for ref in pseudo.defs["<module>"][1]:
                todo += self.resolve(pseudo, ref)
        while todo:
            item = todo.pop()
            if item in seen or item in not_followed or item[0] in skip or item[0] not in self.sources:
                continue
            seen.add(item)
            digest, uses = self._definition(*item)
            out.setdefault(item[0], {})[item[1]] = digest
            todo += uses
        return out

    def relpath(self, module: str) -> str:
        path = self.sources[module][0]
        return f"src/{PACKAGE}/{path.relative_to(self.dir).as_posix()}"


def code_cells(path: Path) -> list[str]:
    """The source of each of a notebook's code cells, the `parameters` cell left out."""
    nb = json.loads(Path(path).read_text())
    cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"
             and "parameters" not in (c.get("metadata", {}).get("tags") or [])]
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells]


def notebook_cells(path: Path) -> str:
    """The code of a notebook's cells, the `parameters` cell left out, as one text."""
    return "\n\n".join(code_cells(path))


def assigns_literals(source: str) -> bool:
    """Whether a cell only assigns literal values to names (a parameters cell, papermill's injected
    one, `amount = 0.5` typed in a cell of its own): parameters, which the key holds, not code."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    for node in body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else None
        if not targets or not all(isinstance(t, ast.Name) for t in targets):
            return False
        try:
            ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False
    return True


def foreign_cells(notebook: Path, ran: list[str]) -> list[str]:
    """The cells a kernel ran (`ran`: IPython's input history) that are neither code cells of the
    notebook nor literal assignments: code the notebook's digest does not hold, which may have
    changed what its stage computes (an edited cell, a scratch cell, a monkeypatch)."""
    own = {c.strip() for c in code_cells(notebook)} if Path(notebook).is_file() else set()
    return [c for c in ran if c.strip() and c.strip() not in own and not assigns_literals(c)]


def ran_digest(ran: list[str]) -> str:
    """The digest a notebook's entry takes in a stage's code files when its kernel ran other code
    (`foreign_cells`): that of every cell it ran but literal assignments, in order."""
    return "ran:" + _sha("\n\n".join(c for c in ran if c.strip() and not assigns_literals(c)))


def _notebook_module(code: str) -> _Module:
    """A notebook's cells as a module whose statements all run (each name they use is followed)."""
    try:
        m = _Module.parse("__notebook__", code, False)
    except SyntaxError:   # IPython magics: nothing to follow from this notebook
        m = _Module.parse("__notebook__", "", False)
    m.defs["<module>"] = ("", sorted({r for _, refs in m.defs.values() for r in refs}))
    return m


def _save(path: Path, summary: dict) -> None:
    """Write a summary atomically; an unwritable cache folder only costs a parse next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(summary))
        os.replace(tmp, path)
    except OSError:
        pass


def files(entries: tuple[str, ...], project: Path, notebook: str | None, follow_notebook: bool,
          extra_files: tuple[str, ...] = (), index: Index | None = None) -> dict[str, str]:
    """{file: digest} of what computes a stage: each package file whose reached definitions count,
    its notebook's code cells, extra files (templates), and the lock file. `entries`: "module:name"
    (module relative to the package, e.g. "stages:run_prune")."""
    index = index or _index()
    extra, out = [], {}
    if notebook:
        path = Path(project) / "notebooks" / notebook
        code = notebook_cells(path) if path.is_file() else ""
        out[f"notebooks/{notebook}"] = _sha(code) if path.is_file() else "missing"
        if follow_notebook:
            extra.append(_notebook_module(code))
    points = []
    for entry in entries:
        module, _, name = entry.partition(":")
        points.append((f"{PACKAGE}.{module}" if module else PACKAGE, name))
    for module, defs in index.reach(points, extra).items():
        out[index.relpath(module)] = _sha(json.dumps(defs, sort_keys=True))
    for pattern in extra_files:
        for path in sorted((index.dir / pattern).rglob("*") if (index.dir / pattern).is_dir() else []):
            if path.is_file():
                out[f"src/{PACKAGE}/{path.relative_to(index.dir).as_posix()}"] = _sha(path.read_bytes())
    lock = Path(project) / LOCK
    out[LOCK] = _sha(lock.read_bytes()) if lock.is_file() else "missing"
    return dict(sorted(out.items()))


def combined(digests: dict[str, str]) -> str:
    """One digest of a stage's code files."""
    return _sha(json.dumps(digests, sort_keys=True))


@functools.cache
def _index() -> Index:
    return Index(PACKAGE_DIR, config.cache_root() / SUMMARIES)

