"""Print pip constraints that pin every dependency dymu declares to the lower end of its range.

`make lock` installs with these to write requirements/lock-oldest.txt, the environment CI tests the
oldest supported versions in (pyproject.toml: a range is declared only if CI ran both its ends).
Usage: python requirements/lower_bounds.py pyproject.toml EXTRA [EXTRA ...]
"""

import re
import sys
import tomllib

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def lower_bounds(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    pins = {}
    for line in lines:
        name, spec = REQUIREMENT.match(line).groups()
        if name == project["name"]:
            continue  # dymu[...]: the extras it names are listed on the command line
        for clause in spec.split(","):
            clause = clause.strip()
            if clause.startswith((">=", "==")):
                pins[name.lower()] = clause[2:].strip()
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


if __name__ == "__main__":
    print("\n".join(lower_bounds(sys.argv[1], sys.argv[2:])))
