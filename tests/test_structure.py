"""The house's rules, read from the source: storage knows no models, imports run one way, functions fit a screen,
and the seams the loop calls are typed."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdcache"
# what kdcache.cache may import besides the standard library and storage packages: itself, the errors, and the
# registry (a dependency-free class that also serves the store backends)
CACHE_MAY_IMPORT = ("kdcache.cache", "kdcache.errors", "kdcache.registry")
NEVER_IN_CACHE = ("torch", "torchvision")
MAX_FUNCTION_LINES = 60
SEAMS = ("policy", "views", "targets")  # parameters of these names are the loop's seams (or counts, typed int)
UNTYPED = ("Any", "object")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def imports(name: str) -> list[tuple[int, str]]:
    """(line, module) of every import in a module, anywhere in it (functions and TYPE_CHECKING blocks too).

    `from kdcache import distributed` names the module kdcache.distributed; `from kdcache.models import X`, the
    package kdcache.models (its __init__).
    """
    path = MODULES[name]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name if name in PACKAGES else name.rsplit(".", 1)[0]
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
                      for alias in node.names]
    return found


def kdcache_graph() -> dict[str, set[str]]:
    """Module -> the kdcache modules it imports."""
    return {name: {target for _, target in imports(name) if target in MODULES} for name in MODULES}


@pytest.mark.parametrize("name", [name for name in MODULES if name.startswith("kdcache.cache")])
def test_the_storage_layer_imports_no_models_and_no_torch(name):
    for line, target in imports(name):
        top = target.split(".")[0]
        assert top not in NEVER_IN_CACHE, f"{MODULES[name]}:{line} imports {target}: kdcache.cache is storage only"
        if top == "kdcache":
            assert target.startswith(CACHE_MAY_IMPORT), \
                f"{MODULES[name]}:{line} imports {target}: kdcache.cache may import only {', '.join(CACHE_MAY_IMPORT)}"


@pytest.mark.parametrize("name", [name for name in MODULES if name.startswith("kdcache.models")])
def test_the_models_import_no_loss(name):
    """Losses read models' outputs, never the other way: what both need (attention_map) lives in kdcache.tensors."""
    for line, target in imports(name):
        assert not target.startswith("kdcache.losses"), \
            f"{MODULES[name]}:{line} imports {target}: models import no loss"


def test_kdcache_has_no_import_circle():
    graph, state, path = kdcache_graph(), {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circle = path[path.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_package_above_it(name):
    for line, target in imports(name):
        above = target in PACKAGES and name != target and name.startswith(target + ".")
        assert not above, f"{MODULES[name]}:{line} imports {target}, a package above it: import the module itself"


def test_the_graph_reader_sees_the_imports_it_judges():
    """The checks above would pass vacuously if imports() found nothing: it finds what the source says."""
    graph = kdcache_graph()
    assert "kdcache.cache.store" in graph["kdcache.cache.backends"]
    assert "kdcache.distributed" in graph["kdcache.stages.dump"]  # `from kdcache import distributed`
    assert "kdcache.stages" in graph["kdcache.cli"]  # inside a function


def functions() -> list[tuple[str, int, ast.FunctionDef]]:
    return [(name, node.lineno, node) for name, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_a_screen():
    long = [f"{MODULES[name]}:{line} {node.name} ({node.end_lineno - line + 1} lines)"
            for name, line, node in functions() if node.end_lineno - line + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long)


def test_the_seams_the_loop_calls_are_typed_by_their_protocols():
    loose = []
    for name, line, node in functions():
        for arg in node.args.args + node.args.kwonlyargs:
            if arg.arg in SEAMS and arg.annotation is not None:
                written = ast.unparse(arg.annotation)
                if any(part.strip() in UNTYPED for part in written.split("|")):
                    loose.append(f"{MODULES[name]}:{line} {node.name}({arg.arg}: {written})")
    assert not loose, "seams typed without their Protocol: " + "; ".join(loose)


def test_every_package_is_installed():
    """pyproject lists its packages by name: a package left out would be missing from a non-editable install."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert PACKAGES - listed == set()


# the two storages of a data source and their policies' forms: only kdcache.data tells them apart (DataSource, Policy)
SOURCE_KINDS = ({"ImageData", "ImageFiles"}, {"AugmentPolicy", "FilePolicy"})
SOURCE_CLASSES = {"ImageData", "ImageFiles", "SynthesizedData", "AugmentPolicy", "FilePolicy", "FileResizedCropFlip",
                  "FileCenterCrop", "FileRandAugmented", "FileMixed", "FILE_POLICIES"}


def _names(node: ast.AST) -> set[str]:
    return {part.id if isinstance(part, ast.Name) else part.attr for part in ast.walk(node)
            if isinstance(part, (ast.Name, ast.Attribute))}


def kind_checks(name: str) -> list[str]:
    """A module's unions of both kinds (`ImageData | ImageFiles`, `AugmentPolicy | FilePolicy`) and isinstance
    checks on a source's or a policy's class."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            found += [f"line {node.lineno}: {ast.unparse(node)}" for kinds in SOURCE_KINDS if kinds <= _names(node)]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance" and len(node.args) == 2 \
                and _names(node.args[1]) & SOURCE_CLASSES:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("name", [name for name in MODULES if not name.startswith("kdcache.data")])
def test_only_the_data_sources_tell_their_kinds_apart(name):
    """Callers ask a DataSource (its policy, batches, views, description), never which kind it is."""
    assert not kind_checks(name), f"{MODULES[name]} tells data kinds apart: " + "; ".join(kind_checks(name))


def test_the_kind_check_finds_what_it_forbids(tmp_path, monkeypatch):
    """The rule above would pass vacuously if kind_checks found nothing: it finds a union and an isinstance."""
    module = tmp_path / "caller.py"
    module.write_text("def f(data: ImageData | ImageFiles, policy: 'x') -> None:\n"
                      "    if isinstance(policy, tuple(FILE_POLICIES.values())):\n        pass\n")
    monkeypatch.setitem(MODULES, "caller", module)
    assert len(kind_checks("caller")) == 2
