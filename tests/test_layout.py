"""The package's shape: every module imports only modules of its own layer or
the layers below it (read from the source, function-level imports included),
the training layer imports in one direction, and no module of
``numpyro_glow/train`` is over 500 lines."""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "numpyro_glow"

# Lowest first. A module may import modules of its own layer or of a lower one, never
# of a higher one. A pattern ending in ".*" covers a package's modules (not the package).
LAYERS: list[tuple[str, ...]] = [
    ("numpyro_glow._version", "numpyro_glow.options", "numpyro_glow.parallel"),
    ("numpyro_glow.data", "numpyro_glow.stream", "numpyro_glow.prepare"),
    ("numpyro_glow.transforms.*",),  # the layers, importing one another
    ("numpyro_glow.transforms",),
    ("numpyro_glow.nets", "numpyro_glow.checkpoint"),
    ("numpyro_glow.distribution",),
    ("numpyro_glow.plate_guide",),  # AutoGlow's members of a plate
    ("numpyro_glow.glow", "numpyro_glow.autoguide"),
    # the training layer, one job per module
    ("numpyro_glow.train.config",),
    ("numpyro_glow.train.model",),
    ("numpyro_glow.train.density",),
    ("numpyro_glow.train.checkpoints",),  # a checkpoint back into a density
    ("numpyro_glow.prior", "numpyro_glow.train.trainer"),  # both build on the one above
    ("numpyro_glow.train.report",),
    ("numpyro_glow.train.run",),
    ("numpyro_glow.train",),  # the public names of the training layer
    ("numpyro_glow", "numpyro_glow.cli"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _layer(module: str) -> int:
    matches = [
        i
        for i, layer in enumerate(LAYERS)
        for pattern in layer
        if module == pattern or (pattern.endswith(".*") and fnmatch.fnmatch(module, pattern))
    ]
    assert matches, f"{module} is in no layer of tests/test_layout.py: add it where it belongs"
    return min(matches)


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``module`` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # ``from . import data`` imports the module numpyro_glow.data
            names = [
                f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                for a in node.names
            ]
        else:
            continue
        found |= {n for n in names if n == "numpyro_glow" or n.startswith("numpyro_glow.")}
    return found - {module}


def test_no_module_imports_one_above_it():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        for target in sorted(_imports(module, path, modules)):
            assert target in modules, f"{module} imports {target}, not a module of the package"
            if _layer(target) > _layer(module):
                upward.append(f"{module} imports {target}")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_the_training_layer_has_one_module_per_job():
    modules = _modules()
    train = sorted(m for m in modules if m.startswith("numpyro_glow.train."))
    assert {m.rsplit(".", 1)[1] for m in train} >= {
        "config",
        "model",
        "density",
        "checkpoints",
        "trainer",
        "report",
        "run",
    }
    # one module per layer: the order above is a strict one
    assert len({_layer(m) for m in train}) == len(train)
    long = {m: n for m in train if (n := len(modules[m].read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"


def test_loading_a_checkpoint_does_not_import_the_trainer():
    """``load_glow`` (numpyro_glow.prior) reaches only below itself."""
    code = (
        "import sys, numpyro_glow; "
        "from numpyro_glow.train import load_model; "
        "print(sorted(m for m in sys.modules if m.startswith('numpyro_glow.train')))"
    )
    path = os.pathsep.join(filter(None, [str(PACKAGE.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's package
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    loaded = ast.literal_eval(out)
    assert "numpyro_glow.train.checkpoints" in loaded
    assert not {"numpyro_glow.train.trainer", "numpyro_glow.train.run"} & set(loaded)


def test_the_public_names_of_the_training_layer():
    import numpyro_glow.train as T

    for name in T.__all__:
        assert getattr(T, name) is not None, name
    assert T.train.__module__ == "numpyro_glow.train.run"
    assert T.load_model.__module__ == "numpyro_glow.train.checkpoints"
    assert set(T.__all__) <= set(dir(T))
