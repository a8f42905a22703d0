"""Write modelscan_core/scanners/known_chat_templates.txt: digests of published chat templates
the analyser finds clean.

A GGUF file usually carries its model's published chat template byte for byte (llama.cpp's
converter copies it from tokenizer_config.json). Knowing those texts clean lets a scan of
such a file skip importing Jinja2 and parsing the template at all; any other text (one
byte changed) is analysed as usual. The texts are the test corpus
(tests/modelscan_core/data/chat_templates*.json); a template the analyser would flag is
refused here, so the list can never vouch for one. Run it after changing the corpus or the
analyser:

    python scripts/gen_known_templates.py            # rewrite the list
    python scripts/gen_known_templates.py --check    # exit 1 if the list is not what it would write
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "modelscan_core" / "scanners" / "known_chat_templates.txt"
CORPUS = [ROOT / "tests" / "modelscan_core" / "data" / name for name in ("chat_templates.json", "chat_templates_corpus.json")]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def expected() -> str:
    sys.path.insert(0, str(ROOT))
    from modelscan_core.scanners.jinja_template import analyse

    digests = set()
    for path in CORPUS:
        for name, text in json.loads(path.read_text(encoding="utf-8")).items():
            if name.startswith("_"):
                continue
            issues = analyse(text, trust_known=False)
            if issues:
                raise SystemExit(f"{path.name}: {name} is not clean: {issues}")
            digests.add(digest(text))
    head = ("# sha256 of published chat templates the analyser finds clean (scripts/gen_known_templates.py);\n"
            "# a template with one of these digests is not parsed again\n")
    return head + "".join(d + "\n" for d in sorted(digests))


def main() -> None:
    text = expected()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            raise SystemExit(f"{OUT} is out of date: run scripts/gen_known_templates.py")
        return
    OUT.write_text(text, encoding="utf-8")
    print(f"{OUT}: {text.count(chr(10)) - 2} digests")


if __name__ == "__main__":
    main()
