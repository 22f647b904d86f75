"""The tests that need a CUDA device: pytest node ids of every test function in ``tests/`` whose
skip condition mentions CUDA (``@pytest.mark.skipif(not torch.cuda.is_available(), ...)``, a
module-level ``pytestmark`` that does, or a ``pytest.skip(...)`` beside ``cuda.is_available`` in
the test's body), so ``bench/gpu_suite.sh`` runs exactly those on a GPU.

    python bench/cuda_tests.py            # one node id per line
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mentions_cuda(node: ast.AST, source: str) -> bool:
    text = ast.get_source_segment(source, node) or ""
    return "skip" in text and "cuda" in text.lower()


def cuda_test_ids(tests_dir: Path = ROOT / "tests") -> list[str]:
    """Node ids (``tests/test_x.py::test_name``, ``...::Class::test_name``) of the CUDA-only tests.
    The e2e folder is left out: it needs a ComfyUI checkout, not a GPU."""
    ids: list[str] = []
    for path in sorted(tests_dir.glob("test_*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        rel = path.relative_to(tests_dir.parent).as_posix()
        module_cuda = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                          and _mentions_cuda(n.value, source) for n in tree.body)

        def visit(body, prefix: str, inherited: bool) -> None:
            for n in body:
                if isinstance(n, ast.ClassDef) and n.name.startswith("Test"):
                    visit(n.body, f"{prefix}{n.name}::",
                          inherited or any(_mentions_cuda(d, source) for d in n.decorator_list))
                elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test"):
                    body = ast.get_source_segment(source, n) or ""
                    skips_inside = "pytest.skip(" in body and "cuda.is_available" in body
                    if inherited or skips_inside or any(_mentions_cuda(d, source) for d in n.decorator_list):
                        ids.append(f"{rel}::{prefix}{n.name}")

        visit(tree.body, "", module_cuda)
    return ids


if __name__ == "__main__":
    print("\n".join(cuda_test_ids()))
    sys.exit(0)
