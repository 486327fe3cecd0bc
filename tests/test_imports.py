"""The module graph of the project: no import cycles, and every pipeline error in one module.

Read with `ast`, nothing is imported: every `import x.y` / `from x.y import z` (and relative
import) of every non-test module (pipeline/**, twins/**, bench/**, scripts/**, top-level *.py) that
resolves to a module of the repo is an edge, wherever it sits: at top level, inside a function
(a lazy import), or under `if TYPE_CHECKING:`. A cycle is reported as the path that closes it.
"""

from __future__ import annotations

import ast
import builtins
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "bench", "scripts", "twins")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every non-test module of the repo."""
    files = {p.stem: p for p in sorted(root.glob("*.py"))}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The repo module `name` names: itself, else its longest prefix that is a repo module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, files: dict[str, Path]) -> set[str]:
    """The repo modules that module `name` imports anywhere in its body."""
    tree = ast.parse(files[name].read_text(encoding="utf-8"), str(files[name]))
    package = name if _is_package(name, files) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(filter(None, (_resolve(a.name, files) for a in node.names)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                target = _resolve(f"{base}.{alias.name}", files) if alias.name != "*" else None
                target = target or _resolve(base, files)
                if target:
                    found.add(target)
    found.discard(name)  # `from pipeline.weights import x` inside the package's own __init__
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, files) for name in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One closed path (first module repeated at the end) per strongly connected component of
    more than one module."""
    return [_closed_path(graph, c) for c in strongly_connected(graph)]


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The components of more than one module that import each other (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return sorted(components, key=min)


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside it)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


# ---------------------------------------------------------------------------- the tests


def test_no_import_cycle_among_non_test_modules():
    graph = import_graph()
    components = strongly_connected(graph)
    assert not components, "import cycles (lazy and TYPE_CHECKING imports count):\n" + "\n".join(
        " -> ".join(_closed_path(graph, c)) + f"   (modules in the loop: {', '.join(sorted(c))})"
        for c in components)


def test_the_graph_sees_top_level_lazy_and_type_checking_imports():
    graph = import_graph()
    assert "pipeline.weights.lock" in graph["pipeline.weights.fetch"]  # top level
    assert "pipeline.weights.lock" in graph["twins.__main__"]
    assert graph["benchmark_jobs"] == set()  # the benchmark's leaf
    assert "pipeline.schema" in graph["benchmark"]
    assert not any("tests" in name.split(".") for name in graph)


def test_a_lazy_cycle_is_found_and_named(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "a.py").write_text("from pipeline.b import B\n")
    (tmp_path / "pipeline" / "b.py").write_text(
        "def f():\n    from pipeline import c\n    return c\n")
    (tmp_path / "pipeline" / "c.py").write_text("from . import a\n")
    (tmp_path / "pipeline" / "d.py").write_text("import pipeline.a\n")
    (tmp_path / "top.py").write_text("from typing import TYPE_CHECKING\n"
                                     "if TYPE_CHECKING:\n    from pipeline.d import x\n")
    graph = import_graph(tmp_path)
    assert graph["top"] == {"pipeline.d"} and graph["pipeline.d"] == {"pipeline.a"}
    assert find_cycles(graph) == [["pipeline.a", "pipeline.b", "pipeline.c", "pipeline.a"]]


def _exception_classes(root: Path = ROOT) -> dict[str, str]:
    """Class name -> module, for every exception class defined under pipeline/: a class whose
    base is a built-in exception or (transitively) another such class of the package."""
    builtin_errors = {n for n, v in vars(builtins).items()
                      if isinstance(v, type) and issubclass(v, BaseException)}
    classes: list[tuple[str, str, set[str]]] = []
    for name, path in module_files(root).items():
        if name.split(".")[0] != "pipeline":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                         if isinstance(b, ast.Name | ast.Attribute)}
                classes.append((node.name, name, bases))
    errors: dict[str, str] = {}
    grew = True
    while grew:
        grew = False
        for cls, module, bases in classes:
            if cls not in errors and bases & (builtin_errors | set(errors)):
                errors[cls] = module
                grew = True
    return errors


def test_every_pipeline_exception_lives_in_pipeline_errors():
    errors = _exception_classes()
    assert {"PipelineError", "WeightsMissing", "LockFormatError", "FetchError", "SettingsError",
            "PickerFailure"} <= set(errors)
    elsewhere = {cls: module for cls, module in errors.items()
                 if module != "pipeline.errors" and not cls.startswith("_")}
    assert not elsewhere, f"exception classes outside pipeline/errors.py: {elsewhere}"


def test_every_pipeline_error_is_a_pipeline_error():
    from pipeline import errors

    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, Exception):
            assert issubclass(cls, errors.PipelineError), cls
    assert issubclass(errors.LockFormatError, ValueError)
    assert issubclass(errors.SettingsError, ValueError)
    assert errors.FetchError("x", retry=True).retry is True


def test_errors_and_the_weights_modules_import_without_torch():
    # The benchmark and the Docker weights stage import these with only stdlib + requests.
    blocked = ("torch", "diffusers", "transformers", "numpy", "PIL", "cv2", "insightface",
               "onnxruntime", "ultralytics", "llama_cpp")
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pipeline.errors, pipeline.weights, pipeline.weights.lock\n"
        "import pipeline.weights.fetch, pipeline.weights.__main__\n"
        "from pipeline.weights import load_lock\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ------------------------------------------------------------- what ships imports no twin

PRODUCT_ROOTS = ("predict", "runpod_adapter")


def is_product(name: str) -> bool:
    """A module the images run: the adapters and the pipeline package."""
    return name in PRODUCT_ROOTS or name.split(".")[0] == "pipeline"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def longest_import_chain(graph: dict[str, set[str]], start: str) -> list[str]:
    """The longest chain of imports among product modules from `start` (the graph has no
    cycle: `test_no_import_cycle_among_non_test_modules`)."""
    best: dict[str, list[str]] = {}

    def walk(name: str) -> list[str]:
        if name not in best:
            below = [walk(n) for n in sorted(graph[name]) if is_product(n)]
            best[name] = [name, *max(below, key=len, default=[])]
        return best[name]

    return walk(start)


def test_no_product_module_imports_a_twin():
    graph = import_graph()
    product = [name for name in graph if is_product(name)]
    assert "pipeline.twins" not in graph and not (ROOT / "pipeline" / "twins").exists()
    leaks = {name: sorted(n for n in graph[name] if n.split(".")[0] == "twins")
             for name in product}
    assert not {name: found for name, found in leaks.items() if found}
    for root in PRODUCT_ROOTS:
        assert not {n for n in reachable(graph, root) if n.split(".")[0] == "twins"}


def test_longest_product_import_chain_from_predict():
    """Issue 20's measure of layering: 11 modules at 01cd1c8 (predict -> service ->
    identities -> faceswap -> presets -> identity -> instantid -> convert -> generate ->
    prompts -> errors); 9 with one face-swap path and `LoraState` in its own leaf
    (predict -> service -> assemble -> identity -> instantid -> convert -> generate ->
    prompts -> errors). Deeper fails."""
    chain = longest_import_chain(import_graph(), "predict")
    print("longest chain:", len(chain), " -> ".join(chain))
    assert len(chain) <= 9, " -> ".join(chain)
