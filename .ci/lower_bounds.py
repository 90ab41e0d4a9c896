"""Prints pip constraints pinning every dependency in pyproject.toml to its lower bound.

CI installs its oldest environment (Python 3.11) with these, so each lower bound that
pyproject states is a version the suite has run on.
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
for requirement in requirements:
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", requirement)
    if match is None:
        sys.exit(f"{requirement!r} states no lower bound (name>=version); every dependency must.")
    print(f"{match.group(1)}=={match.group(2)}")
