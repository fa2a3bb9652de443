"""Writes csrc/elra_contract.h from elra/_contract.py (the one definition of the slots, codes
and kernel constants). Run after changing elra/_contract.py; tests/test_contract.py checks that
the committed header is current.

    python scripts/gen_contract.py
"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# loaded by path: the header must be writable without importing elra (and torch)
spec = importlib.util.spec_from_file_location("_contract", ROOT / "elra" / "_contract.py")
contract = importlib.util.module_from_spec(spec)
spec.loader.exec_module(contract)
(ROOT / "csrc" / "elra_contract.h").write_text(contract.header())
print(f"wrote {ROOT / 'csrc' / 'elra_contract.h'}")
