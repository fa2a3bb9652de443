"""The contract between the engine and its kernels has one definition, and the house rules hold.

elra/_contract.py defines every slot, code and kernel constant; csrc/elra_contract.h is generated
from it (scripts/gen_contract.py) and must be current; nothing else may define them again
(Python in elra/ and tests/, C++ in csrc/).
"""

import ast
import re
from pathlib import Path

from elra import _contract

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "elra_contract.h"


def contract_names() -> set[str]:
    names = {n for n, _ in _contract.SLOTS + _contract.STATUSES + _contract.MODES +
             _contract.KINDS}
    names |= {n for n, _, _ in _contract.CONSTANTS}
    return names | {"NUM_SLOTS", "MAX_SEGMENTS", "RED_WIDTH"}


def test_generated_header_is_current():
    assert HEADER.read_text() == _contract.header(), \
        "csrc/elra_contract.h is stale: run python scripts/gen_contract.py"


def test_the_header_numbers_are_the_contracts():
    text = HEADER.read_text()
    for name in contract_names():
        value = getattr(_contract, name)
        if isinstance(value, int):
            assert re.search(rf"\b{name} = {value},", text) or \
                re.search(rf"constexpr int {name} = {value};", text), name
        else:
            m = re.search(rf"constexpr double {name} = ([^;]+);", text)
            assert m and float(m.group(1)) == value, name


def _python_assignments(path: Path) -> set[str]:
    """Names assigned at module level (also by tuple unpacking) in a Python file."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    out.add(n.id)
    return out


def test_each_contract_name_is_defined_once():
    names = contract_names()
    for path in sorted((ROOT / "elra").glob("*.py")) + sorted((ROOT / "tests").rglob("*.py")):
        if path.name == "_contract.py":
            continue
        again = names & _python_assignments(path)
        assert not again, f"{path.relative_to(ROOT)} defines {sorted(again)} again"
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix not in (".h", ".cpp", ".cu") or path == HEADER:
            continue
        text = path.read_text()
        for name in names:
            assert not re.search(rf"(constexpr [a-z0-9_ ]+ {name}\s*=|^\s*{name}\s*=\s*\d)",
                                 text, re.M), f"{path.relative_to(ROOT)} defines {name} again"


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_house_rules():
    """A thin optimizer class; no function of the package over 60 lines."""
    optimizer = ROOT / "elra" / "optimizer.py"
    assert len(optimizer.read_text().splitlines()) <= 350
    long = []
    for path in sorted((ROOT / "elra").glob("*.py")):
        for fn in _functions(ast.parse(path.read_text())):
            if fn.end_lineno - fn.lineno + 1 > 60:
                long.append(f"{path.name}:{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)")
    assert not long, long
