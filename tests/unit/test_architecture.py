"""The import rules of docs/design.md ("Layout and import rules"), read from every module's AST (lazy imports in
function bodies included): one-way package imports, a leaf that imports nothing of ours, pure cores that import
no Ray, vLLM, clock or environment (transitively), and no module reaching for another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("heteroscale_ray", "common", "serving", "autoscaler", "placement", "bench")
# Which top-level packages each may import. heteroscale_ray (CLI, wiring) sits on top and nobody imports it;
# common is the leaf; bench may use autoscaler and placement only through their pure cores (PURE below).
ALLOWED = {
    "heteroscale_ray": {"common", "serving", "autoscaler", "placement", "bench"},
    "serving": {"common"},
    "autoscaler": {"common", "placement"},  # the wiring layer passes the DG deployer (serving.app.DEPLOYER)
    "placement": {"common"},
    "bench": {"common", "autoscaler", "placement"},
    "common": set(),
}
# The pure cores: no Ray, vLLM, HTTP, clock, randomness, environment or I/O, and only pure cores below them.
PURE = {"common.vocab", "common.histogram", "common.defaults", "common.wire", "autoscaler.model", "autoscaler.frozen", "autoscaler.forecast", "autoscaler.ratio", "autoscaler.pending", "autoscaler.policy", "autoscaler.gating", "autoscaler.plan", "autoscaler.fleet",
        "autoscaler.cycle", "autoscaler.port", "autoscaler.signals", "autoscaler.membership", "autoscaler.supply",
        "placement.topology", "placement.scheduler"}
IMPURE_ROOTS = {"ray", "vllm", "time", "datetime", "os", "sys", "random", "socket", "subprocess", "threading",
                "asyncio", "httpx", "aiohttp", "requests", "urllib", "pathlib", "io", "logging", "uuid"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[_module_name(path)] = path
    return out


SOURCES = _sources()


def _imports(path: Path) -> list[tuple[str, tuple[str, ...], int]]:
    """(module, imported names, line) for every import statement anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: use absolute imports")
            found.append((node.module or "", tuple(a.name for a in node.names), node.lineno))
    return found


def _is_package_module(name: str) -> bool:
    return name.split(".")[0] in PACKAGES and not name.startswith("bench.scripts")


def _resolve(module: str, names: tuple[str, ...]) -> list[str]:
    """Project modules an import statement loads (`from pkg import mod` loads pkg.mod)."""
    out = [module] if module in SOURCES else []
    out += [f"{module}.{n}" for n in names if f"{module}.{n}" in SOURCES]
    return out


def test_the_tree_was_read():
    assert {"autoscaler.cycle", "common.vocab", "bench.sim.world", "heteroscale_ray.cli"} <= set(SOURCES)
    assert len(SOURCES) > 40


def test_packages_import_only_what_the_layering_allows():
    wrong = []
    for name, path in SOURCES.items():
        if not _is_package_module(name):
            continue
        own = name.split(".")[0]
        for module, _, line in _imports(path):
            top = module.split(".")[0]
            if top in PACKAGES and top != own and top not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_no_two_packages_import_each_other():
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for name, path in SOURCES.items():
        if _is_package_module(name):
            for module, _, _ in _imports(path):
                top = module.split(".")[0]
                if top in PACKAGES and top != name.split(".")[0]:
                    edges[name.split(".")[0]].add(top)

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in edges[a])

    cycles = sorted(p for p in PACKAGES if reaches(p, p, {p}))
    assert not cycles, f"package cycle through {cycles}: {edges}"
    assert not any("heteroscale_ray" in targets for targets in edges.values())


def test_bench_uses_autoscaler_and_placement_only_through_their_pure_cores():
    wrong = []
    for name, path in SOURCES.items():
        if name.startswith("bench.") and _is_package_module(name):
            for module, names, line in _imports(path):
                for target in _resolve(module, names):
                    if target.split(".")[0] in ("autoscaler", "placement") and target not in PURE:
                        wrong.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("core", sorted(PURE))
def test_pure_cores_import_no_ray_clock_or_environment(core):
    """Transitively: a pure core imports only the standard library's pure parts and other pure cores."""
    wrong, todo, seen = [], [core], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for module, names, line in _imports(SOURCES[name]):
            if module.split(".")[0] in IMPURE_ROOTS:
                wrong.append(f"{name}:{line} imports {module}")
            for target in _resolve(module, names):
                empty_init = target in PACKAGES and not _imports(SOURCES[target])
                if target not in PURE and not empty_init:
                    wrong.append(f"{name}:{line} imports the impure module {target}")
                todo.append(target)
    assert not wrong, "\n".join(wrong)


def test_the_control_cycle_is_pure_and_the_sim_drives_it():
    cycle_imports = {m.split(".")[0] for m, _, _ in _imports(SOURCES["autoscaler.cycle"])}
    assert not cycle_imports & {"ray", "time", "os", "datetime"}
    # No observe/decide/place loop anywhere else: only the cycle calls decide() and place() (benchmark scripts
    # time each function alone; tests call them directly). The node-supply planner calls place() too, on a
    # virtual tree of the nodes the cluster autoscaler could add, after the cycle: planning, no loop; so does the
    # fleet's preemption, inside the cycle, on a copy of its tree with a victim's GPUs returned.
    callers = []
    for name, path in SOURCES.items():
        if not _is_package_module(name):
            continue
        for module, names, _ in _imports(path):
            if (module == "autoscaler.policy" and "decide" in names) or \
                    (module == "placement.scheduler" and "place" in names):
                callers.append(name)
    assert sorted(set(callers)) == ["autoscaler.cycle", "autoscaler.fleet", "autoscaler.supply"], callers
    world_imports = {m for m, _, _ in _imports(SOURCES["bench.sim.world"])}
    assert "autoscaler.port" in world_imports


def test_no_module_imports_another_modules_private_names():
    wrong = []
    scripts = {_module_name(p): p for p in (ROOT / "bench" / "scripts").glob("*.py")}
    for name, path in {**SOURCES, **scripts}.items():
        for module, names, line in _imports(path):
            if module.split(".")[0] in PACKAGES and module != name:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} {private}")
    assert not wrong, "\n".join(wrong)
