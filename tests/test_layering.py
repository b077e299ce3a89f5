"""The package's layers: no module imports upward, and docs/architecture.md maps the tree as it is.

``LAYERS`` lists the parts of ``mhc_megatron`` bottom-up, as docs/architecture.md draws them. A
module may import from its own layer and from the layers below it, at module level or inside a
function alike; every module must belong to a layer, so a new package has to be placed. Below
``megatron`` nothing imports megatron-core, and ``method`` and ``plan`` import no torch (checked in
the source and by importing them).
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mhc_megatron"

LAYERS = [
    ("mhc_megatron", "mhc_megatron.method", "mhc_megatron.jsonl", "mhc_megatron.world"),  # the method's constants; no torch
    ("mhc_megatron.plan",),  # the planner; no torch
    ("mhc_megatron.ops", "mhc_megatron._C"),  # the operators and their compiled kernels
    ("mhc_megatron.modules",),
    ("mhc_megatron.demo",),
    ("mhc_megatron.megatron.patching",),  # from here on megatron-core is imported
    ("mhc_megatron.megatron.fixes", "mhc_megatron.megatron.cpu", "mhc_megatron.megatron.cpu_heap"),
    ("mhc_megatron.megatron.parallel",),
    ("mhc_megatron.megatron.model",),
    ("mhc_megatron.megatron.pipeline",),
    ("mhc_megatron.megatron",),  # the package's public names
    ("mhc_megatron.data",),
    ("mhc_megatron.training",),
    ("mhc_megatron.bench", "mhc_megatron.compare", "mhc_megatron.convert", "mhc_megatron.study", "mhc_megatron.train"),
]
WITHOUT_MEGATRON = LAYERS[: LAYERS.index(("mhc_megatron.megatron.patching",))]
WITHOUT_TORCH = LAYERS[:2]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
EXTENSIONS = {f"mhc_megatron.{path.name.split('.')[0]}" for path in PACKAGE.glob("*.so")} | {"mhc_megatron._C"}


def layer_of(name: str) -> int | None:
    """Index in ``LAYERS`` of the longest prefix of ``name`` listed there (``mhc_megatron`` itself,
    the package's ``__init__``, only by its own name)."""
    best, length = None, -1
    for index, names in enumerate(LAYERS):
        for prefix in names:
            within = name.startswith(prefix + ".") and prefix != "mhc_megatron"
            if (name == prefix or within) and len(prefix) > length:
                best, length = index, len(prefix)
    return best


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``; ``from X import Y`` names ``X.Y`` where that
    is a module of the package (or its compiled extension), else ``X``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                known = candidate in MODULES or candidate in EXTENSIONS
                found.append((node.lineno, candidate if known else node.module))
    return found


def test_every_module_has_a_layer():
    assert not [name for name in MODULES if layer_of(name) is None]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_upward(name):
    own = layer_of(name)
    upward = [
        f"line {line}: {target} ({', '.join(LAYERS[layer_of(target)])})"
        for line, target in imports(MODULES[name])
        if target.startswith("mhc_megatron") and layer_of(target) > own
    ]
    assert not upward, f"{name} ({', '.join(LAYERS[own])}) imports from a higher layer: {upward}"


@pytest.mark.parametrize("layers, forbidden", [(WITHOUT_MEGATRON, "megatron"), (WITHOUT_TORCH, "torch")])
def test_the_lower_layers_import_neither_megatron_core_nor_torch(layers, forbidden):
    names = [name for name in MODULES if LAYERS[layer_of(name)] in layers]
    offending = [f"{name}: {target}" for name in names for _, target in imports(MODULES[name])
                 if target.split(".")[0] == forbidden]
    assert names and not offending


def test_the_kernel_benchmark_runs_without_megatron_core():
    """kernels/gpu-validate.sh runs it on a GPU host that may have torch and nothing else."""
    blocked = ("import importlib.abc, runpy, sys\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'megatron': raise ImportError(name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "sys.argv = ['kernels', '--help']\n"
               "runpy.run_module('mhc_megatron.bench.kernels', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "usage: mhc-bench kernels" in result.stdout, result.stderr[-3000:]


def architecture_map() -> set[str]:
    """The files and folders under ``mhc_megatron/`` that docs/architecture.md's package map names:
    entries are a name at the start of a line, indented two spaces per level."""
    text = (ROOT / "docs/architecture.md").read_text()
    block = text.split("```\n", 2)[1]
    paths, folders = set(), []
    for line in block.splitlines():
        match = re.match(r"( *)([\w.-]+/?)(\s|$)", line)
        if not match or len(match.group(1)) > 16:
            continue  # a description that goes on from the line above
        depth = len(match.group(1)) // 2
        folders = folders[:depth]
        path = "/".join([*folders, match.group(2).rstrip("/")])
        if path.split("/")[0] == "mhc_megatron":
            paths.add(path)
        if match.group(2).endswith("/"):
            folders.append(match.group(2).rstrip("/"))
    return paths


def test_docs_architecture_maps_every_module_and_folder():
    on_disk = {str(path.relative_to(ROOT)) for path in PACKAGE.rglob("*.py")
               if path.name not in ("__init__.py", "__main__.py")}
    on_disk |= {str(path.relative_to(ROOT)) for path in [PACKAGE, *PACKAGE.rglob("*")]
                if path.is_dir() and (path / "__init__.py").exists()}
    mapped = architecture_map()
    assert not on_disk - mapped, f"not in docs/architecture.md: {sorted(on_disk - mapped)}"
    assert not mapped - on_disk, f"in docs/architecture.md but not in the tree: {sorted(mapped - on_disk)}"


def test_the_method_and_the_planner_run_without_torch():
    """Imported, ``method`` and ``mhc-plan`` load neither torch nor megatron-core."""
    code = ("import sys, mhc_megatron.method, mhc_megatron.plan.cli; "
            "print(sorted(name for name in ('torch', 'megatron') if name in sys.modules))")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
