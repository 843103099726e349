"""The platform a device runtime is built for and the one a flash target has: machine, Python, glibc.

    local_platform() -> Platform                      this machine (the interpreter that runs covspec)
    PROBE (a sh script) -> parse_probe(output)        a target's, read over its shell (ssh, adb, sh)
    mismatch(runtime_platform, target) -> str | None  why a runtime cannot run there, or None
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass

ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
PROBE = ('echo "machine=$(uname -m)"; echo "python=$(python3 -V 2>&1)"; '
         'echo "libc=$(getconf GNU_LIBC_VERSION 2>/dev/null)"')


@dataclass(frozen=True)
class Platform:
    machine: str
    python: str  # "3.11"; "" when there is none
    glibc: str  # "2.36"; "" when the C library is not glibc (Android's bionic, musl)

    @property
    def key(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.machine}-glibc{self.glibc or 'none'}"

    def describe(self) -> str:
        return (f"{self.machine}, {f'Python {self.python}' if self.python else 'no python3'}, "
                f"{f'glibc {self.glibc}' if self.glibc else 'no glibc'}")

    def manylinux_tags(self) -> list[str]:
        """Every manylinux tag a wheel for this machine may carry and still run here (pip takes only the
        tags it is given)."""
        major, minor = (int(x) for x in self.glibc.split(".")) if self.glibc else (2, 17)
        tags = [f"manylinux_{major}_{y}_{self.machine}" for y in range(minor, 4, -1)]
        return tags + [f"manylinux{legacy}_{self.machine}" for legacy in ("2014", "2010", "1")]


def machine_name(raw: str) -> str:
    raw = raw.strip()
    return ALIASES.get(raw.lower(), raw)


def local_platform() -> Platform:
    libc, version = platform.libc_ver()
    return Platform(machine_name(platform.machine()), f"{sys.version_info[0]}.{sys.version_info[1]}",
                    version if libc == "glibc" else "")


def parse_probe(output: str) -> Platform:
    """Platform from PROBE's output ("machine=...", "python=Python 3.11.7", "libc=glibc 2.36")."""
    fields = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    python = re.search(r"Python (\d+)\.(\d+)", fields.get("python", ""))
    glibc = re.search(r"glibc (\d+\.\d+)", fields.get("libc", ""))
    return Platform(machine_name(fields.get("machine", "")), f"{python[1]}.{python[2]}" if python else "",
                    glibc[1] if glibc else "")


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def mismatch(runtime: dict, target: Platform) -> str | None:
    """Why a runtime built for `runtime` ({"machine", "python", "glibc"}: the lowest glibc it needs)
    cannot run on `target`; None when it can."""
    problems = []
    if runtime["machine"] != target.machine:
        problems.append(f"the machine is {target.machine or 'unknown'}, not {runtime['machine']}")
    if not target.python:
        problems.append("it has no python3")
    elif runtime["python"] != target.python:
        problems.append(f"its python3 is {target.python}, not {runtime['python']}")
    if runtime.get("glibc") and not target.glibc:
        problems.append("its C library is not glibc (Android's bionic or musl)")
    elif runtime.get("glibc") and version_tuple(target.glibc) < version_tuple(runtime["glibc"]):
        problems.append(f"its glibc {target.glibc} is older than the {runtime['glibc']} the runtime needs")
    return "; ".join(problems) or None


def describe_runtime(runtime: dict) -> str:
    glibc = f"glibc >= {runtime['glibc']}" if runtime.get("glibc") else "any C library"
    return f"{runtime['machine']}, Python {runtime['python']}, {glibc}"
