"""The platform a device runtime is built for and the one a flash target has: machine, Python, glibc.

    local_platform() -> Platform                      this machine (the interpreter that runs covspec)
    PROBE (a sh script) -> parse_probe(output)        a target's, read over its shell (ssh, adb, sh)
    mismatch(runtime_platform, target) -> str | None  why a runtime cannot run there, or None
    from_flags("linux-aarch64", "3.10") -> Platform    a folder's (an SD card image, a rootfs), as told
    unbuildable(target) -> str | None                 why no runtime can be made for it, and the nearest fix
    check_here(runtime_json) -> None                   the launcher's check at start: refuses another platform
"""

from __future__ import annotations

import json
import platform
import re
import sys
from dataclasses import dataclass

ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
# python3 and, where python3 is too old, a newer python3.X beside it (JetPack 6's python3 is 3.10;
# Ubuntu 22.04 has python3.11 in its archive); android= is set on Android (getprop)
PROBE = ('echo "machine=$(uname -m)"; echo "python=$(python3 -V 2>&1)"; '
         'echo "libc=$(getconf GNU_LIBC_VERSION 2>/dev/null)"; '
         'for p in python3.13 python3.12 python3.11; do $p -V >/dev/null 2>&1 && echo "alt=$p"; done; '
         'echo "android=$(getprop ro.build.version.release 2>/dev/null)"')
# What a runtime can be made for: the machines PyPI has executorch/onnxruntime manylinux wheels for,
# the Pythons covspec (requires-python) and those wheels share, the lowest glibc of those wheels
MACHINES = ("x86_64", "aarch64")
PYTHONS = ("3.11", "3.12", "3.13")
MIN_GLIBC = "2.28"  # executorch's and onnxruntime's wheels are manylinux_2_28
UNKNOWN = "unknown"  # a folder target's glibc when nobody said (--platform without a probe)
SUPPORTED = f"Linux on {' or '.join(MACHINES)} with glibc >= {MIN_GLIBC} and Python {', '.join(PYTHONS)}"


@dataclass(frozen=True)
class Platform:
    machine: str
    python: str  # "3.11"; "" when there is none
    glibc: str  # "2.36"; "" when the C library is not glibc (Android's bionic, musl); UNKNOWN: not said
    python_command: str = "python3"  # the interpreter the launcher makes its venv with
    android: str = ""  # Android's release ("14") when the target is an Android device

    @property
    def key(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.machine}-glibc{self.glibc or 'none'}"

    def describe(self) -> str:
        libc = ("glibc not known" if self.glibc == UNKNOWN else f"glibc {self.glibc}" if self.glibc
                else f"Android {self.android} (bionic libc)" if self.android else "no glibc")
        python = f"Python {self.python}" if self.python else "no python3"
        if self.python and self.python_command != "python3":
            python += f" ({self.python_command})"
        return f"{self.machine}, {python}, {libc}"

    def manylinux_tags(self) -> list[str]:
        """Every manylinux tag a wheel for this machine may carry and still run here (pip takes only the
        tags it is given)."""
        known = self.glibc and self.glibc != UNKNOWN
        major, minor = (int(x) for x in (self.glibc if known else MIN_GLIBC).split("."))
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
    """Platform from PROBE's output ("machine=...", "python=Python 3.11.7", "libc=glibc 2.36",
    "alt=python3.12"...). python3 is taken when a runtime can be made for it, else the newest python3.X
    found beside it that can."""
    lines = [line.split("=", 1) for line in output.splitlines() if "=" in line]
    fields = dict(lines)
    python = re.search(r"Python (\d+)\.(\d+)", fields.get("python", ""))
    version = f"{python[1]}.{python[2]}" if python else ""
    command = "python3"
    alternatives = [value.strip() for key, value in lines if key == "alt"]
    if version not in PYTHONS and alternatives:
        command, version = alternatives[0], alternatives[0].removeprefix("python")
    glibc = re.search(r"glibc (\d+\.\d+)", fields.get("libc", ""))
    return Platform(machine_name(fields.get("machine", "")), version, glibc[1] if glibc else "",
                    command, fields.get("android", "").strip())


def from_flags(name: str, python: str, glibc: str | None = None) -> Platform:
    """A folder target's platform as given: `--platform linux-aarch64 --python 3.11 [--glibc 2.35]`."""
    os_name, _, machine = name.partition("-")
    if os_name != "linux" or not machine:
        raise ValueError(f"--platform {name}: expected linux-MACHINE (linux-aarch64, linux-x86_64); "
                         f"a runtime can be made for {SUPPORTED}")
    if not re.fullmatch(r"\d+\.\d+", python or ""):
        raise ValueError(f"--python {python}: expected the target's Python as MAJOR.MINOR (3.11)")
    if glibc is not None and not re.fullmatch(r"\d+\.\d+", glibc):
        raise ValueError(f"--glibc {glibc}: expected the target's glibc as MAJOR.MINOR (2.35)")
    return Platform(machine_name(machine), python, glibc or UNKNOWN)


def unbuildable(target: Platform) -> str | None:
    """Why no covspec device runtime can be made for `target` (naming what is supported and the nearest
    fix), or None."""
    if target.android:
        return (f"it is Android {target.android} (bionic libc, no python3): the covspec device runtime is made for "
                f"{SUPPORTED}. On Android the app runs the bundle itself: copy the bundle alone (--runtime none) "
                "and see docs/deployment.md, section Android (the .pte LlmModule loads, the wire protocol, the shim's C API)")
    if target.machine not in MACHINES:
        fix = ("install a 64-bit OS (e.g. Raspberry Pi OS 64-bit, uname -m says aarch64)"
               if target.machine.startswith("arm") else "use a device of a supported machine")
        return (f"its machine {target.machine or 'unknown'} has no executorch/onnxruntime wheels: the runtime is made "
                f"for {SUPPORTED}; {fix}")
    if not target.glibc:
        return (f"its C library is not glibc (musl or bionic): the runtime's wheels are manylinux, made for "
                f"{SUPPORTED}; use a glibc distribution (Debian, Ubuntu, Yocto with glibc)")
    if target.glibc != UNKNOWN and version_tuple(target.glibc) < version_tuple(MIN_GLIBC):
        return (f"its glibc {target.glibc} is older than {MIN_GLIBC}, the oldest the executorch and onnxruntime "
                f"wheels take: the runtime is made for {SUPPORTED}; upgrade the OS (e.g. Ubuntu 22.04, JetPack 6)")
    if target.python not in PYTHONS:
        have = f"its python3 is {target.python}" if target.python else "it has no python3"
        return (f"{have}: the runtime is made for {SUPPORTED} (covspec needs Python >= 3.11); install one beside "
                "it (Ubuntu 22.04 / JetPack 6: apt-get install python3.11 python3.11-venv) and flash again (over ssh "
                "the flash finds python3.11 by itself; for a folder, give --python 3.11)")
    return None


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
    if target.glibc == UNKNOWN:
        pass  # not known at flash time: the launcher checks at first start
    elif runtime.get("glibc") and not target.glibc:
        problems.append("its C library is not glibc (Android's bionic or musl)")
    elif runtime.get("glibc") and version_tuple(target.glibc) < version_tuple(runtime["glibc"]):
        problems.append(f"its glibc {target.glibc} is older than the {runtime['glibc']} the runtime needs")
    return "; ".join(problems) or None


def describe_runtime(runtime: dict) -> str:
    glibc = f"glibc >= {runtime['glibc']}" if runtime.get("glibc") else "any C library"
    return f"{runtime['machine']}, Python {runtime['python']}, {glibc}"


def check_here(runtime_json: str) -> None:
    """The launcher's first step: exits (status 3) naming both platforms when the runtime described by
    `runtime_json` was flashed for another machine or Python than this interpreter's."""
    with open(runtime_json) as f:
        runtime = json.load(f)["platform"]
    here = local_platform()
    problem = mismatch(runtime, here)
    if problem:
        sys.exit(f"covspec runtime: this runtime was flashed for {describe_runtime(runtime)}, but this device is "
                 f"{here.describe()} ({problem}); flash again for this device: covspec device flash --bundle B "
                 f"--to ... --platform linux-{here.machine} --python {here.python}")
