"""The import layers of the package: drg/ (domain) below data/ and models/, which never import each other.

Read from the source (nothing is imported), so a layer that runs back up fails here before anyone draws the graph.
Shared concepts sit below both: ``drg_llama.pretrained`` (files and tokenizer of a pretrained model),
``drg_llama.errors``.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "drg_llama"
#: What each layer may import from drg_llama (everything else of drg_llama is out of bounds).
ALLOWED = {
    "drg": ("drg_llama.drg",),
    "data": ("drg_llama.data", "drg_llama.drg", "drg_llama.errors", "drg_llama.pretrained", "drg_llama.__version__"),
    "models": ("drg_llama.models", "drg_llama.drg", "drg_llama.errors", "drg_llama.pretrained", "drg_llama.metrics"),
}


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute module names ``path`` imports (``from drg_llama import x`` counts as ``drg_llama.x``)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} if node.module != "drg_llama" else {f"drg_llama.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_lies_below_it(layer):
    wrong = {
        (layer, str(path.relative_to(PACKAGE)), name)
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in _imports(path)
        if name.startswith("drg_llama") and not any(name == ok or name.startswith(ok + ".") for ok in ALLOWED[layer])
    }
    assert wrong == set()


def test_the_domain_core_imports_no_torch():
    """Importing drg/ loads no deep-learning stack (decoders import torch only for a caller's torch tensors)."""
    for path in (PACKAGE / "drg").rglob("*.py"):
        assert not {n.split(".")[0] for n in _imports(path, top_level_only=True)} & {"torch", "lightning"}, path
