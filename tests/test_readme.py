"""The README's examples: every ```python block runs as written, each on its own;
the ```py blocks (they need a trained checkpoint or minutes of compilation) are
parsed, and their imports and calls into ``numpyro_glow`` checked against the
package's names and signatures."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import numpyro_glow

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(python|py)\n(.*?)^```$", re.S | re.M)


def _blocks(language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(README.read_text()) if lang == language]


def test_readme_examples_run(capsys):
    blocks = _blocks("python")
    assert blocks, "README has no python example"
    results = []
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        if "result" in namespace:
            results.append(namespace["result"])
    assert results, "no README example ran SVI"
    for result in results:
        assert result.losses[-1] < result.losses[0]
    assert "negative log-likelihood per image" in capsys.readouterr().out


def _package_names(tree: ast.Module) -> dict[str, object]:
    """The names a block imports from numpyro_glow, checked to exist."""
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("numpyro_glow"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README: {node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def _callee(func: ast.expr, names: dict[str, object]):
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        if func.value.id == "numpyro_glow":
            assert hasattr(numpyro_glow, func.attr), f"README: numpyro_glow has no {func.attr}"
            return getattr(numpyro_glow, func.attr)
        owner = names.get(func.value.id)
        if inspect.ismodule(owner):
            assert hasattr(owner, func.attr), f"README: {owner.__name__} has no {func.attr}"
            return getattr(owner, func.attr)
    return None


def test_readme_other_examples_match_the_api():
    blocks = _blocks("py")
    assert blocks, "README has no py example"
    checked = 0
    for block in blocks:
        tree = ast.parse(block, str(README))
        names = _package_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            target = _callee(node.func, names)
            if target is None or not callable(target) or inspect.ismodule(target):
                continue
            if any(isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None for k in node.keywords
            ):
                continue
            signature = inspect.signature(target)
            signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
            checked += 1
    assert checked >= 3, f"expected the py examples to call numpyro_glow, found {checked} calls"
