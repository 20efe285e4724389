"""Print the README's set-up command tagged NAME (the line after `<!-- command: NAME -->`'s fence)."""

import pathlib
import sys

name = sys.argv[1]
lines = pathlib.Path(__file__).resolve().parent.parent.joinpath("README.md").read_text().splitlines()
marker = f"<!-- command: {name} -->"
i = lines.index(marker)
if not lines[i + 1].startswith("```"):
    sys.exit(f"README.md: expected a fenced block after {marker}")
print(lines[i + 2])
