"""The shape of the code: data flows one way between packages (the command line on top, nothing
importing it), no import circle between packages or between modules, no module too large, no
ImportError fallbacks, and the ledger speaks the protobuf's job states."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the layers, top first: the command line (service/cli.py) imports them all and nothing imports it
PACKAGES = ("service.cli", "service.api", "service.jobs", "service.volume", "service.engine", "connector")
GENERATED = os.path.join("service", "api", "gen")  # protoc output (service.api.codegen)
MAX_LINES = 500


def _modules(top: str):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
        rel = os.path.relpath(dirpath, ROOT)
        if rel == GENERATED or rel.startswith(GENERATED + os.sep) or "__pycache__" in dirpath:
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield mod, path


def _imports(mod: str, path: str) -> set[str]:
    """Every module name ``mod`` imports, at the top or inside a function (``from a import b``
    gives ``a`` and ``a.b``)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    pkg = mod.rsplit(".", 1)[0] if not path.endswith("__init__.py") else mod
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return out


def _module_graph() -> dict[str, set[str]]:
    """Module → the modules of ``service`` and ``connector`` it imports, at the top or inside a
    function (a package is its ``__init__``; ``from pkg import mod`` is an edge to ``mod``)."""
    paths = {}
    for top in ("service", "connector"):
        for mod, path in _modules(top):
            paths[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path

    def module_of(name: str) -> str | None:  # the longest prefix that is a module
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in paths.items():
        pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                edges.update(module_of(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                for a in node.names:
                    edges.add(f"{base}.{a.name}" if f"{base}.{a.name}" in paths else module_of(base))
        graph[mod] = {e for e in edges if e and e != mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a → … → a), or None."""
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            return stack[stack.index(n):] + [n]
        if n in seen:
            return None
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            found = visit(m)
            if found:
                return found
        stack.pop()
        seen.add(n)
        return None

    for n in sorted(graph):
        found = visit(n)
        if found:
            return found
    return None


def _package(name: str) -> str | None:
    for p in PACKAGES:
        if name == p or name.startswith(p + "."):
            return p
    return None


def test_service_never_imports_connector():
    offenders = [(m, i) for top in ("service",) for m, p in _modules(top) for i in _imports(m, p)
                 if i == "connector" or i.startswith("connector.")]
    assert offenders == []


def _package_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for top in ("service", "connector"):
        for mod, path in _modules(top):
            src = _package(mod)
            if src is None:
                continue
            for name in _imports(mod, path):
                dst = _package(name)
                if dst and dst != src:
                    edges[src].add(dst)
    return edges


def test_no_import_cycle_between_packages():
    edges = _package_graph()
    found = _cycle(edges)
    assert found is None, f"import cycle: {' → '.join(found)}"
    # the direction of the data flow
    assert "service.api" not in edges["service.jobs"] and "service.jobs" not in edges["service.volume"]
    # the command line is the top layer: it reaches every layer below it, and nothing imports it
    assert {"service.api", "service.jobs", "service.engine", "service.volume"} <= edges["service.cli"]
    assert [p for p in PACKAGES if "service.cli" in edges[p]] == []


def test_no_import_cycle_between_modules():
    """Issue 22: no circle between modules either (e.g. engine.restore ↔ engine.training, or a
    forked worker's module importing the command line that starts it)."""
    graph = _module_graph()
    assert {"service.cli", "service.commandline", "service.jobs.processes", "service.engine.training"} <= set(graph)
    found = _cycle(graph)
    assert found is None, f"import cycle: {' → '.join(found)}"


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_torch_where_requests_are_checked():
    """The request checks (jobs/spec.py) and the command tree import no torch at module level:
    a client command, the bridge or a worker's argument error stays light."""
    import subprocess
    import sys
    code = ("import sys, service.jobs.spec, service.commandline, service.jobs.worker_main, service.api.commands; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_no_module_over_500_lines_in_service_and_connector():
    """Issue 10: every module of ``service`` and ``connector`` but the generated code
    (``service/api/gen/``) has at most MAX_LINES lines."""
    big = []
    for top in ("service", "connector"):
        for mod, path in _modules(top):
            n = sum(1 for _ in open(path, encoding="utf-8"))
            if n > MAX_LINES:
                big.append((mod, n))
    assert big == [], f"split these modules (at most {MAX_LINES} lines each): {big}"


def test_size_check_sees_every_package_but_the_generated_code():
    mods = {m for top in ("service", "connector") for m, _ in _modules(top)}
    assert {"service.cli", "service.engine.restore", "service.jobs.kube.manifest", "connector.bridge",
            "connector.neuroglancer_view"} <= mods
    assert not any(m.startswith("service.api.gen") for m in mods)


def test_entry_points_in_pyproject_resolve():
    """The plug-in entry points name objects that exist (the service finds the connectors only
    through them)."""
    import tomllib
    from importlib.metadata import EntryPoint

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    groups = dict(project.get("entry-points", {}), scripts=project.get("scripts", {}))
    for group, eps in groups.items():
        for name, value in eps.items():
            assert callable(EntryPoint(name, value, group).load()), f"{group}: {name} = {value}"


def test_no_import_error_fallbacks():
    found = []
    for top in ("service",):
        for mod, path in _modules(top):
            if mod.endswith((".kube", ".codegen")):
                continue  # kube: the deploy helper's split (issue 11); codegen: a developer tool
            tree = ast.parse(open(path, encoding="utf-8").read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ExceptHandler) and node.type is not None:
                    names = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                    if names & {"ImportError", "ModuleNotFoundError"}:
                        found.append(mod)
    assert found == []


def test_ledger_states_are_the_protobuf_enum():
    from service.api.gen import emrestore_pb2 as pb
    from service.jobs.records import STATES, TERMINAL_STATES
    assert STATES == tuple(n for n in pb.Job.State.keys() if n != "STATE_UNSPECIFIED")
    assert TERMINAL_STATES == {"SUCCEEDED", "FAILED", "CANCELLED"}


def test_status_of_needs_no_imports_and_reads_codes():
    from service.engine.model import ModelNotFound
    from service.errors import EmrestoreError, status_of
    from service.jobs.ledger import IllegalTransition, JobNotFound
    from service.volume.stores import PermissionDenied, StoreUnreachable
    assert status_of(EmrestoreError("region", "bad", "RESOURCE_EXHAUSTED")) == ("RESOURCE_EXHAUSTED", "region: bad")
    assert status_of(JobNotFound("x"))[0] == "NOT_FOUND"
    assert status_of(IllegalTransition("state: no"))[0] == "FAILED_PRECONDITION"
    assert status_of(ModelNotFound("model: none"))[0] == "NOT_FOUND"
    assert status_of(StoreUnreachable("source", "down"))[0] == "UNAVAILABLE"
    assert status_of(PermissionDenied("source", "no"))[0] == "PERMISSION_DENIED"
    assert status_of(RuntimeError("boom"))[0] == "INTERNAL"
    src = open(os.path.join(ROOT, "service", "errors.py"), encoding="utf-8").read()
    assert "import" not in src.split("def status_of", 1)[1]


def test_a_forked_worker_loads_neither_the_client_commands_nor_the_connectors(tmp_path):
    """Issue 22: a local worker forked from the warm template runs its own entry point
    (service.jobs.worker_main), not the command line: the modules it has loaded after a task hold
    no client command, no client, no server and no connector."""
    import json

    import pytest

    from service.jobs import processes
    from tests import worker_probe
    if processes.start_method() != "fork":
        pytest.skip("no forkserver on this platform")
    args = ["worker", "--ledger", f"file://{tmp_path}/ledger", "--job", "01arz3ndektsv4rrffq69g5fav", "--task-index", "0"]
    out = tmp_path / "modules.json"
    p = processes._forkserver().Process(target=worker_probe.run, daemon=True,
                                        args=(args, processes.worker_env({}, 1), str(tmp_path / "log"), str(out)))
    p.start()
    p.join(120)
    got = json.loads(out.read_text())
    log = (tmp_path / "log").read_text()
    assert got["code"] == 2 and "NOT_FOUND" in log, log  # the task ran: its job does not exist
    mods = set(got["modules"])
    assert {"service.jobs.worker_main", "service.jobs.worker", "service.jobs.ledger"} <= mods
    loaded = sorted(m for m in mods if m == "connector" or m.startswith("connector.")
                    or m in ("service.cli", "service.api.commands", "service.api.serving", "service.api.client",
                             "service.api.servicer", "service.api.server"))
    assert loaded == []
