"""The package layering, read from the source with `ast` (every import statement, also the lazy
ones inside functions, since those run too):

- no import cycle between files;
- `convert/` stands on the framework-free core only, and the core on nothing above it;
- each engine imports only its own framework, and the toolkit reaches engines only through
  `mlx_clip/engine/protocol.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlx_clip", "torch_backend", "convert", "benchmarks")  # the repository's folders of code
# Installed (and imported) inside mlx_clip: as top-level packages two of them collided with PyPI's.
INSTALLED_AS = {"convert": "mlx_clip.convert", "torch_backend": "mlx_clip.torch_backend",
                "benchmarks": "mlx_clip.benchmarks"}

# Framework-free modules with no dependency above themselves: what `convert/` may stand on.
# mlx_clip.model.interpolate: numpy maths of the position-embedding resize, which convert/resolution
# applies to checkpoints and the MLX model at run time.
# model.naflex: NaFlex's packed image batch is part of what the engines take (`naflex.pack`).
CORE = {"mlx_clip.errors", "mlx_clip.version", "mlx_clip.model.config", "mlx_clip.engine.policy", "mlx_clip.model.tokenizer",
        "mlx_clip.model.siglip_tokenizer", "mlx_clip.model.image_processing", "mlx_clip.model.interpolate", "mlx_clip.outputs",
        "mlx_clip.model.naflex"}
# What an engine may use of the toolkit besides the core and `convert/`: policy decided once for
# both engines (LoRA sites, schedule constants), numpy maths, the built-in random initialisation.
# engine.base: the orchestration both engines share (state file, phases, loading, timing).
ENGINE_SUPPORT = {"mlx_clip.engine.lora_sites", "mlx_clip.model.interpolate", "mlx_clip.model.builtin",
                  "mlx_clip.engine.blas", "mlx_clip.engine.distributed",  # the world, its timeout, its errors
                  "mlx_clip.engine.base"}
ENGINES = {"mlx": "mlx_clip.mlx_backend", "torch": "mlx_clip.torch_backend"}
FRAMEWORKS = {"mlx": "mlx", "torch": "torch", "transformers": "torch", "timm": "torch"}  # import -> engine
# torch's unpickler with weights_only=True is the one safe reader of `.bin` files (lazy import);
# timm, on the meta device, is the architecture of a timm trunk outside the converter's table (lazy).
FRAMEWORK_EXCEPTIONS = {("mlx_clip.convert.pickle_weights", "torch"), ("mlx_clip.convert.timm_siglip", "timm")}
BOUNDARY = "mlx_clip.engine.protocol"
# The op-by-op profiles time the engines' own functions (the training step's ops, and each tower's
# forward by ablation of its parts), so they look inside them.
INSIDE_VIEWS = {"mlx_clip.benchmarks.ops", "mlx_clip.benchmarks.forward_profile"}

# The rooms of mlx_clip/ and the rooms each may import: the architecture as the folders show it.
# Every room may use the top-level core (errors, version, outputs); the verbs at the top (cli, api,
# finetune, ...) compose the rooms and are not listed. A new arrow between rooms fails here: add it
# only with a reason beside it.
TOP_CORE = {"mlx_clip.errors", "mlx_clip.version", "mlx_clip.outputs"}
ROOMS = {
    # builtin writes its random checkpoints with convert's writer; the built-in SigLIP tokenizer is
    # trained on the demo domain's words (data.demo, data.templates).
    "mlx_clip.model": {"mlx_clip.convert", "mlx_clip.data"},
    "mlx_clip.data": {"mlx_clip.model"},
    # protocol.load_backend is the one door to the engines.
    "mlx_clip.engine": {"mlx_clip.model", "mlx_clip.mlx_backend", "mlx_clip.torch_backend"},
    "mlx_clip.mlx_backend": {"mlx_clip.engine", "mlx_clip.model", "mlx_clip.convert"},
    "mlx_clip.torch_backend": {"mlx_clip.engine", "mlx_clip.model", "mlx_clip.convert"},
    # trainer: the checkpoint's header (mlx_clip.convert.safetensors_io); run_report draws with evaluation's
    # figure helpers; memory_budget's probe process imports the package first, for the BLAS.
    "mlx_clip.training": {"mlx_clip.engine", "mlx_clip.data", "mlx_clip.model", "mlx_clip.evaluation",
                          "mlx_clip.convert", "mlx_clip"},
    "mlx_clip.evaluation": {"mlx_clip.data", "mlx_clip.model", "mlx_clip.api"},  # api: load a model by name
    "mlx_clip.robust": {"mlx_clip.training", "mlx_clip.evaluation", "mlx_clip.data", "mlx_clip.model", "mlx_clip.convert",
                        "mlx_clip.api", "mlx_clip.finetune"},  # the domain-shift case runs fine-tunes
    "mlx_clip.serve": {"mlx_clip.data", "mlx_clip.model", "mlx_clip.evaluation", "mlx_clip.api", "mlx_clip.index"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    parts[0] = INSTALLED_AS.get(parts[0], parts[0])
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(our modules it imports, top-level names of the other packages it imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, others = set(), set()

    def add(target: str) -> None:
        if target in known:
            ours.add(target)
        elif target.split(".")[0] != "mlx_clip":  # a bare `convert` lands here: see the test below
            others.add(target.split(".")[0])

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in known else base)
    return ours, others


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = our_modules()
    graph, external = {}, {}
    for name, path in modules.items():
        graph[name], external[name] = imports_of(name, path, set(modules))
    return graph, external


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None (iterative DFS, 3 colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def engine_of(module: str) -> str | None:
    return next((engine for engine, prefix in ENGINES.items()
                 if module == prefix or module.startswith(prefix + ".")), None)


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_walker_sees_lazy_imports_and_the_detector_finds_cycles(graph):
    ours, _ = graph
    assert "mlx_clip.engine.protocol" in ours["mlx_clip.api"]  # module level
    assert "mlx_clip.mlx_backend.backend" in ours["mlx_clip.engine.protocol"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle(graph):
    ours, _ = graph
    cycle = find_cycle(ours)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_convert_and_the_core_stand_on_the_core_only(graph):
    ours, _ = graph
    for module, targets in ours.items():
        if module.startswith("mlx_clip.convert"):
            above = {t for t in targets if not t.startswith("mlx_clip.convert") and t not in CORE}
            assert not above, f"{module} imports {sorted(above)}, above the core"
        if module in CORE:
            above = targets - CORE
            assert not above, f"core module {module} imports {sorted(above)}"


def test_each_engine_imports_only_its_own_framework(graph):
    _, external = graph
    for module, packages in external.items():
        engine = engine_of(module)
        for package in packages & set(FRAMEWORKS):
            if (module, package) in FRAMEWORK_EXCEPTIONS or module.startswith("mlx_clip.benchmarks"):
                continue
            assert engine == FRAMEWORKS[package], f"{module} imports {package}"


def test_engines_stand_on_core_convert_and_shared_policy(graph):
    ours, _ = graph
    for module, targets in ours.items():
        engine = engine_of(module)
        if engine is None:
            continue
        for target in targets:
            allowed = (engine_of(target) == engine or target.startswith("mlx_clip.convert") or target in CORE
                       or target in ENGINE_SUPPORT)
            assert allowed, f"engine module {module} imports {target}"


def room_of(module: str) -> str | None:
    """The room (a folder of mlx_clip/, or an engine or convert) holding `module`, or None for the
    verbs at the top."""
    for room in sorted(ROOMS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    if module == "mlx_clip.convert" or module.startswith("mlx_clip.convert."):
        return "mlx_clip.convert"
    return "mlx_clip" if module == "mlx_clip" else None


def test_each_room_imports_only_the_rooms_it_stands_on(graph):
    ours, _ = graph
    for module, targets in ours.items():
        room = room_of(module)
        if room not in ROOMS:
            continue
        for target in targets - TOP_CORE:
            other = room_of(target) or target
            assert other == room or other in ROOMS[room], f"{module} ({room}/) imports {target} ({other})"


def test_the_toolkit_reaches_engines_only_through_the_boundary(graph):
    ours, _ = graph
    for module, targets in ours.items():
        if engine_of(module) or module == BOUNDARY or module in INSIDE_VIEWS:
            continue
        reached = {t for t in targets if engine_of(t)}
        assert not reached, f"{module} imports {sorted(reached)}; go through {BOUNDARY}"


def test_the_repository_folders_are_imported_only_under_mlx_clip(graph):
    """`import convert` would find PyPI's unrelated package of that name once installed."""
    _, external = graph
    for module, packages in external.items():
        bare = packages & set(INSTALLED_AS)
        assert not bare, f"{module} imports {sorted(bare)}; import {[INSTALLED_AS[b] for b in sorted(bare)]}"


def test_pyproject_installs_every_package_under_mlx_clip():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {module_name(p.parent) if p.parent != ROOT else "" for package in PACKAGES
               for p in (ROOT / package).rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders
    assert setuptools["package-dir"] == {installed: folder for folder, installed in INSTALLED_AS.items()}
