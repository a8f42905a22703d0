"""Write a small demo model directory: one benign pickle, one that would run a command.

    python3 scripts/demo_models.py DIR

The malicious file is written from opcodes-equivalent `pickle.dumps` of a `__reduce__`
object; its payload (`echo`) never runs here: nothing is ever unpickled.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path


class _Payload:
    def __reduce__(self):
        return os.system, ("echo this would have run on load",)


def main() -> None:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "modelscan-demo")
    target.mkdir(parents=True, exist_ok=True)
    (target / "weights.pkl").write_bytes(pickle.dumps({"layer.weight": [0.1, 0.2], "layer.bias": [0.0]}, protocol=4))
    (target / "pytorch_model.bin").write_bytes(pickle.dumps({"state": _Payload()}, protocol=2))
    (target / "README.md").write_text("demo model directory\n")
    print(f"wrote demo models to {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
