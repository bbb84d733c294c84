"""Prints `name==floor` for every `name>=floor` requirement of setup.py (install_requires and the
extras named on the command line), one per line: what `.ci/floors` installs."""
import re
import sys
from pathlib import Path

import setuptools

captured = {}
setuptools.setup = lambda **kwargs: captured.update(kwargs)
setup_py = Path(__file__).resolve().parent.parent / "setup.py"
exec(compile(setup_py.read_text(), str(setup_py), "exec"), {"__name__": "__main__"})
requirements = list(captured["install_requires"])
for extra in sys.argv[1:]:
    requirements += captured["extras_require"][extra]
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[^\]]+\])?)>=([^,;\s]+)", requirement.strip())
    if match:  # requirements without a floor (jax[cuda12]) are not part of the floor set
        print(f"{match.group(1)}=={match.group(2)}")
