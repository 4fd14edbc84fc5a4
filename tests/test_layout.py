"""The package's shape: commands in cli/, stages below them, imports flowing one way, no cycles."""
import ast
import subprocess
import sys
from pathlib import Path

import hyq_tvm
from hyq_tvm.cli import COMMANDS

PACKAGE = Path(hyq_tvm.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_statements():
    """(importing module, module imported from, names imported) for every import of the package."""
    for path in PACKAGE.rglob("*.py"):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                yield name, mod, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield name, a.name, []


def _imports() -> dict[str, set[str]]:
    """hyq_tvm module -> the hyq_tvm modules it imports (at any depth of its code)."""
    modules = {_module(path) for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, mod, names in _import_statements():
        graph[name] |= {m for m in (mod, *(f"{mod}.{n}" for n in names)) if m in modules and m != name}
    return graph


def test_every_import_from_the_package_names_a_module_of_it():
    modules = {_module(path) for path in PACKAGE.rglob("*.py")}
    missing = {(name, mod) for name, mod, _ in _import_statements() if mod.startswith("hyq_tvm") and mod not in modules}
    assert not missing


def test_no_library_module_imports_a_command():
    shims = {f"hyq_tvm.{c}" for c in COMMANDS}
    for name, deps in _imports().items():
        if not name.startswith("hyq_tvm.cli") and name not in shims:
            assert not {d for d in deps if d.startswith("hyq_tvm.cli")}, name


def test_imports_have_no_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [dep])}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def _run(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)


def test_every_command_runs_as_a_module_and_as_a_subcommand():
    for name in COMMANDS:
        proc = _run("-m", f"hyq_tvm.{name}", "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr)
    console = ("-c", "from hyq_tvm.cli import main; main()")
    proc = _run(*console, "integer-report", "--help")
    assert proc.returncode == 0 and "--reports" in proc.stdout, proc.stderr
    proc = _run(*console)
    assert proc.returncode == 2 and all(n.replace("_", "-") in proc.stdout for n in COMMANDS)
    proc = _run(*console, "frobnicate")
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown command 'frobnicate'")


def test_the_import_graph_is_read():
    graph = _imports()
    assert "hyq_tvm.relax.pipeline" in graph["hyq_tvm.build"] and "hyq_tvm.quant.plan" in graph["hyq_tvm.build"]
