"""No code outside the policies and the registry branches on a policy's name: it asks its traits.

Callers ask :func:`sglang_xshare.select.traits.policy_traits` what a policy is and needs
(``uses_placement``, ``plain_topk``, ...), so a new policy is one registry entry and one trait row.
This test parses every module of the package (``sglang_xshare/``, and ``kernels/`` / ``launch/``,
installed as ``sglang_xshare.kernels`` / ``sglang_xshare.launch``) and fails on a comparison with a
policy-name string constant: ``p == "xshare_ep"``, ``p != "xshare_spec"``, ``p in ("xshare", "oea")``,
``case "topk":`` and ``p.startswith("xshare_")`` / ``p.endswith("_ep")``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

from sglang_xshare.config import POLICY_NAMES

ROOT = Path(__file__).resolve().parents[1]
#: The package's source folders (pyproject's ``package-dir``).
SCANNED = ("sglang_xshare", "kernels", "launch")
#: Where a policy's name is its identity: the implementations, the registry and the trait table.
OWNERS = ("sglang_xshare/select/policies/", "sglang_xshare/select/registry.py", "sglang_xshare/select/traits.py")
#: Fields whose values share a spelling with a policy name but are not policies, with the reason.
NOT_POLICY_FIELDS = {
    "mass_source": "its values 'topk' / 'full' name what the aggregated mass sums, not a policy",
}


def _strings(node: ast.AST) -> Iterator[str]:
    """String constants of ``node``: itself, or the elements of a tuple / list / set display."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for elt in node.elts:
            yield from _strings(elt)


def _field(node: ast.AST) -> str | None:
    """The name an operand reads (``x`` or ``a.b.x`` -> ``"x"``), else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_affix(s: str, attr: str) -> bool:
    """``s`` is a policy name, or (``startswith`` / ``endswith``, 3+ characters) a prefix / suffix of one."""
    if s in POLICY_NAMES:
        return True
    if len(s) < 3:
        return False
    return any(n.startswith(s) if attr == "startswith" else n.endswith(s) for n in POLICY_NAMES)


def name_comparisons(source: str) -> Iterator[tuple[int, str, str | None]]:
    """``(line, expression, field)`` for each comparison of ``source`` with a policy-name string;
    ``field`` is what the other side reads (for :data:`NOT_POLICY_FIELDS`)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            named = [o for o in operands if any(s in POLICY_NAMES for s in _strings(o))]
            if named:
                others = [_field(o) for o in operands if o not in named]
                yield node.lineno, ast.unparse(node), others[0] if len(set(others)) == 1 else None
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("startswith", "endswith"):
            if any(_is_affix(s, node.func.attr) for a in node.args for s in _strings(a)):
                yield node.lineno, ast.unparse(node), _field(node.func.value)
        elif isinstance(node, ast.match_case):
            values = [p.value for p in ast.walk(node.pattern) if isinstance(p, ast.MatchValue)]
            if any(s in POLICY_NAMES for v in values for s in _strings(v)):
                yield node.pattern.lineno, "case " + ast.unparse(node.pattern), None


def _package_files() -> list[Path]:
    files = [p for top in SCANNED for p in sorted((ROOT / top).rglob("*.py"))]
    return [p for p in files if not p.relative_to(ROOT).as_posix().startswith(OWNERS)]


def test_no_policy_name_comparison_outside_the_policies_and_the_registry():
    found, exempt_used = [], set()
    for path in _package_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, expr, field in name_comparisons(path.read_text()):
            if field in NOT_POLICY_FIELDS:
                exempt_used.add(field)
            else:
                found.append(f"{rel}:{line}: {expr}")
    assert not found, ("compare policy traits, not names (sglang_xshare.select.traits.policy_traits):\n  "
                       + "\n  ".join(found))
    # an exemption nothing needs any more goes
    assert exempt_used == set(NOT_POLICY_FIELDS), set(NOT_POLICY_FIELDS) - exempt_used


@pytest.mark.parametrize("source", [
    'if cfg.policy == "xshare_ep": pass',
    'ok = name != "xshare_spec"',
    'ok = policy in ("xshare", "oea")',
    'ok = policy not in ["topk"]',
    'ok = "cap" == policy',
    'ok = policy.startswith("xshare_")',
    'ok = policy.endswith("_ep")',
    'match policy:\n    case "oea_simple":\n        pass',
    'match policy:\n    case "topk" | "cap":\n        pass',
])
def test_the_scan_sees_each_form_of_name_comparison(source):
    assert list(name_comparisons(source)), source


@pytest.mark.parametrize("source", [
    'ok = cfg.mass_source == "topk"',
    'ok = mode in ("exact", "padded")',
    'ok = policy_traits(name).uses_placement',
    'f(policy="xshare")',
    'names = ["topk", "cap", "oea"]',
    'ok = s.startswith("--")',
])
def test_the_scan_leaves_other_strings_alone(source):
    assert all(field in NOT_POLICY_FIELDS for _, _, field in name_comparisons(source)), source

