"""The device runtime `covspec device flash` installs beside the bundle, made on this machine for the
target's platform (its own, or another: linux-aarch64 from an x86_64 workstation) and cached in
~/.cache/covspec/device-runtime/<platform>/ (COVSPEC_CACHE moves ~/.cache/covspec).

For another platform the wheels are `pip download`ed for its tags and Python, and the native shim is
cross-compiled (`aarch64-linux-gnu-g++`) against that platform's executorch wheel's headers and libraries,
downloaded once into the cache. Cross-compiling rather than compiling on the device at first start: the
executorch wheel the compile needs pulls in torch (2 GB) on the device, Yocto and most Jetson images carry
no g++, and a library built here is checked here (`file`, its glibc symbols) and sha256-verified on the
target like every other file; the price is one Debian package on the workstation.

A payload is a folder laid out as the flash target is (paths relative to the target's root):

    bin/covspec-device            the launcher (POSIX sh): `covspec-device` from runtime/venv, made on first
                                  use, with the native shim found and --bundle defaulting to ../bundle
    runtime/install.sh            makes runtime/venv offline from runtime/wheels (nothing to do when done)
    runtime/wheels/*.whl          covspec (this tree) and the pinned core + `device` extra for the platform
    runtime/lib/libcovspec_et.so  the native ExecuTorch shim (RUNPATH $ORIGIN) and the libexecutorch*.so it links
    runtime/runtime.json          the platform it runs on and every file's sha256 (the runtime manifest)

    build_payload(cache=None, target=None) -> Path   the payload for `target` (default: this machine),
                                                     rebuilt only where its inputs changed
    load_payload(folder) -> Payload         a payload folder, its files checked against runtime.json
    python -m covspec.device_runtime.runtime_payload build [--cache DIR] [--platform linux-aarch64 --python 3.11]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from covspec.bundles.manifest import sha256_file
from covspec.device_runtime.platforms import Platform, local_platform
from covspec.errors import CovspecError

RUNTIME_MANIFEST = "runtime/runtime.json"
LAUNCHER = "bin/covspec-device"
INSTALLER = "runtime/install.sh"
EXECUTABLES = (LAUNCHER, INSTALLER)
FORMAT = 1
DEMO_WEIGHTS = Path("covspec/demo/weights")  # not in the device's covspec wheel (16.6 MB it never reads)
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01: the covspec wheel's zip timestamps, so a rebuild is byte-identical
REPO = Path(__file__).resolve().parent.parent


class PayloadError(CovspecError):
    """The runtime payload cannot be built or is not intact; the message says the fix."""


@dataclass
class Payload:
    folder: Path
    manifest: dict

    @property
    def platform(self) -> dict:
        return self.manifest["platform"]

    def files(self) -> dict[str, str]:
        """Target-relative name -> sha256, the runtime manifest itself left out."""
        return {name: entry["sha256"] for name, entry in self.manifest["files"].items()}


def cache_root() -> Path:
    return Path(os.environ.get("COVSPEC_CACHE") or Path.home() / ".cache" / "covspec") / "device-runtime"


def load_payload(folder: str | Path) -> Payload:
    """Reads runtime/runtime.json and checks every file it lists (size and sha256)."""
    folder = Path(folder)
    path = folder / RUNTIME_MANIFEST
    if not path.is_file():
        raise PayloadError(f"{folder}: no {RUNTIME_MANIFEST}; --runtime takes a folder made by "
                           "`python -m covspec.device_runtime.runtime_payload build`")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        manifest["platform"]["machine"], manifest["platform"]["python"]  # noqa: B018 (required keys)
    except (ValueError, KeyError, TypeError) as err:
        raise PayloadError(f"{path}: not a runtime manifest ({err}); rebuild the runtime") from None
    bad = [name for name, entry in files.items()
           if not (folder / name).is_file() or sha256_file(folder / name) != entry["sha256"]]
    if bad:
        raise PayloadError(f"{folder}: {', '.join(bad)} missing or not matching {RUNTIME_MANIFEST}; rebuild the "
                           "runtime (`python -m covspec.device_runtime.runtime_payload build`)")
    return Payload(folder, manifest)


# --- building ----------------------------------------------------------------------------------------
def build_payload(cache: str | Path | None = None, log=print, target: Platform | None = None) -> Path:
    """The payload for `target` (default: this machine), in `cache` (default cache_root()/<platform>): the
    covspec wheel, the dependency wheels and the native shim are each rebuilt only when their inputs changed."""
    here = local_platform()
    target = target or here
    folder = Path(cache) if cache else cache_root() / target.key
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".lock"):
        changed = build_covspec_wheel(folder, log)
        covspec_wheel = next((folder / "runtime/wheels").glob("covspec-*.whl"))
        changed |= download_dependencies(folder, covspec_wheel, target, log)
        changed |= build_native(folder, log, None if target.machine == here.machine else target)
        write_scripts(folder, target)
        write_runtime_manifest(folder, target)
        if changed:
            log(f"runtime for {target.describe()} built in {folder}")
    return folder


@contextmanager
def locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fresh(folder: Path, step: str, key: str) -> bool:
    """Whether `step` was last built from `key`."""
    stamp = folder / f".{step}.key"
    return stamp.is_file() and stamp.read_text() == key


def stamp(folder: Path, step: str, key: str) -> None:
    (folder / f".{step}.key").write_text(key)


def source_tree() -> tuple[Path, list[Path]]:
    """The tree this covspec runs from and the files its wheel is built from (pyproject's package dirs, less
    the demo pair's weights: a device runs its bundle, and `covspec demo` runs from a checkout)."""
    pyproject = REPO / "pyproject.toml"
    if not pyproject.is_file():
        raise PayloadError(f"covspec runs from {REPO}, not a source tree (no pyproject.toml): build the runtime in "
                           "a checkout of covspec, or give --runtime PATH with a runtime built there")
    config = tomllib.loads(pyproject.read_text())
    roots = sorted(set(config["tool"]["setuptools"]["package-dir"].values()))
    files = [pyproject, REPO / "README.md"]
    for root in roots:
        files += sorted(p for p in (REPO / root).rglob("*") if p.is_file() and not ignored(p.relative_to(REPO))
                        and not p.relative_to(REPO).is_relative_to(DEMO_WEIGHTS))
    return REPO, files


def ignored(rel: Path) -> bool:
    return any(part in ("__pycache__", "build") for part in rel.parts) or rel.suffix in (".pyc", ".so")


def tree_key(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(REPO)}\0{sha256_file(path)}\0".encode())
    return digest.hexdigest()


def build_covspec_wheel(folder: Path, log) -> bool:
    """`pip wheel --no-deps` of this tree, copied to a scratch folder first (no build/ left in the tree)."""
    repo, files = source_tree()
    key = tree_key(files)
    wheels = folder / "runtime" / "wheels"
    if fresh(folder, "covspec", key) and any(wheels.glob("covspec-*.whl")):
        return False
    log("building the covspec wheel of this tree")
    with tempfile.TemporaryDirectory(prefix="covspec-wheel-") as scratch:
        src = Path(scratch) / "src"
        for path in files:
            (src / path.relative_to(repo)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / path.relative_to(repo))
        isolation = ["--no-build-isolation"] if has_module("setuptools") else []
        pip(["wheel", "--no-deps", *isolation, "-w", str(Path(scratch) / "out"), str(src)],
            env={"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}, what="building the covspec wheel")
        built = next((Path(scratch) / "out").glob("covspec-*.whl"))
        wheels.mkdir(parents=True, exist_ok=True)
        for old in wheels.glob("covspec-*.whl"):
            old.unlink()
        shutil.copy2(built, wheels / built.name)
    stamp(folder, "covspec", key)
    return True


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def pip(args: list[str], what: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, check=False)
    if done.returncode != 0:
        raise PayloadError(f"{what} failed (pip {args[0]}):\n{done.stderr.strip()[-2000:]}")
    return done.stdout


def requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines for the core and the `device` extra."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return sorted(r for r in reqs if "extra ==" not in r or 'extra == "device"' in r)


def download_dependencies(folder: Path, covspec_wheel: Path, here: Platform, log) -> bool:
    """`pip download --only-binary=:all:` of covspec[device]'s dependencies for the platform's tags."""
    reqs = requirements(covspec_wheel)
    key = json.dumps({"requires": reqs, "platform": here.key})
    wheels = folder / "runtime" / "wheels"
    if fresh(folder, "dependencies", key):
        return False
    log(f"downloading {len(reqs)} pinned dependencies (core + device) for {here.describe()}")
    for old in wheels.glob("*.whl"):
        if old != covspec_wheel:
            old.unlink()
    tags = [arg for tag in here.manylinux_tags() for arg in ("--platform", tag)]
    pip(["download", "--only-binary=:all:", *tags, "--python-version", here.python, "--implementation", "cp",
         "-d", str(wheels), f"covspec[device] @ {covspec_wheel.as_uri()}"], what="downloading the dependencies")
    stamp(folder, "dependencies", key)
    return True


CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++", "x86_64": "x86_64-linux-gnu-g++"}
CROSS_PACKAGES = {"aarch64": "g++-aarch64-linux-gnu", "x86_64": "g++-x86-64-linux-gnu"}


def executorch_pin() -> str:
    """The executorch version this tree exports with (pyproject's `export` extra)."""
    text = (REPO / "pyproject.toml").read_text()
    found = re.search(r'"executorch==([^"]+)"', text)
    if not found:
        raise PayloadError("pyproject.toml pins no executorch==VERSION: cannot pick the target's executorch wheel")
    return found[1]


def target_executorch(target: Platform, log) -> Path:
    """The target's executorch wheel's include/ and lib/, unpacked once into the cache (no torch: --no-deps,
    and only those two folders are taken). Returns the unpacked `executorch` folder."""
    import zipfile

    version = executorch_pin()
    root = cache_root() / "executorch" / f"{version}-{target.machine}"
    if (root / "executorch" / "lib").is_dir() and (root / "executorch" / "include").is_dir():
        return root / "executorch"
    log(f"downloading the executorch {version} wheel for {target.machine} (its headers and libraries, once)")
    with tempfile.TemporaryDirectory(prefix="covspec-et-") as scratch:
        tags = [arg for tag in target.manylinux_tags() for arg in ("--platform", tag)]
        pip(["download", "--no-deps", "--only-binary=:all:", *tags, "--python-version", target.python,
             "--implementation", "cp", "-d", scratch, f"executorch=={version}"],
            what=f"downloading executorch {version} for {target.machine}")
        wheel = next(Path(scratch).glob("executorch-*.whl"))
        unpack = Path(scratch) / "unpacked"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpack, [n for n in z.namelist() if n.startswith(("executorch/include/", "executorch/lib/"))])
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unpack), root)
    return root / "executorch"


def build_native(folder: Path, log, target: Platform | None = None) -> bool:
    """The shim, linked with RUNPATH $ORIGIN, beside copies of the executorch wheel's libraries it needs:
    against this machine's wheel with g++, or for a `target` of another machine against its wheel
    (downloaded) with its cross g++. Skipped, said so, where there is no executorch wheel or no compiler
    (the runtime then runs ONNX bundles only)."""
    from covspec.device_runtime import et_native

    lib = folder / "runtime" / "lib"

    def skip(why: str) -> bool:
        log(f"note: the runtime carries no native ExecuTorch shim (.pte bundles will not run; ONNX ones will): {why}")
        shutil.rmtree(lib, ignore_errors=True)
        return False

    if target is None:
        compiler, package = "g++", "g++"
        try:
            root = et_native.executorch_root()
        except et_native.NativeRuntimeError as err:
            return skip(str(err))
    else:
        compiler = CROSS_COMPILERS.get(target.machine, "")
        package = CROSS_PACKAGES.get(target.machine, "a cross g++")
        if not compiler or shutil.which(compiler) is None:
            return skip(f"no {compiler or 'cross compiler'} here: apt-get install {package} and flash again")
        root = target_executorch(target, log)
    needed = [root / "lib" / f"lib{name}.so" for name in et_native.ET_LIBS]
    key = tree_key_of([*et_native.SOURCES, *needed]) + compiler
    if fresh(folder, "native", key) and (lib / et_native.LIBRARY_NAME).is_file():
        return False
    machine = target.machine if target else "this machine"
    log(f"building the native ExecuTorch shim for {machine} ({compiler}, RUNPATH $ORIGIN)")
    shutil.rmtree(lib, ignore_errors=True)
    lib.mkdir(parents=True)
    command = [compiler if i == 0 else ("-Wl,-rpath,$ORIGIN" if arg.startswith("-Wl,-rpath,") else arg)
               for i, arg in enumerate(et_native.compile_command(lib / et_native.LIBRARY_NAME, root))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return skip(f"no {compiler} here: apt-get install {package} and flash again")
    if done.returncode != 0:
        raise PayloadError(f"building the native shim for {machine} failed:\n{done.stderr.strip()[-2000:]}")
    for path in needed:
        shutil.copy2(path, lib / path.name)
    stamp(folder, "native", key)
    return True


def tree_key_of(paths: list[Path]) -> str:
    return hashlib.sha256("".join(f"{p.name}\0{sha256_file(p)}\0" for p in paths).encode()).hexdigest()


# --- the scripts and the manifest ---------------------------------------------------------------------
INSTALL_SH = r"""#!/bin/sh
# Written by `covspec device flash`: makes runtime/venv from runtime/wheels without any index, then copies
# runtime.json into it; nothing to do when the venv was made from this very runtime.json.
rt=$(cd "$(dirname "$0")" && pwd) || exit 1
venv="$rt/venv"
cmp -s "$rt/runtime.json" "$venv/covspec-runtime.json" 2>/dev/null && exit 0
python=${COVSPEC_PYTHON:-@COMMAND@}
fail() { echo "covspec runtime: $*" >&2; rm -rf "$venv.new"; exit 3; }
command -v "$python" >/dev/null 2>&1 || fail "no $python here: install Python @PYTHON@ (e.g. apt-get install python@PYTHON@ python@PYTHON@-venv)"
here=$("$python" -c 'import platform, sys; print(platform.machine(), "%d.%d" % sys.version_info[:2])') ||
  fail "$python does not run here"
case "$here" in
  "@MACHINE@ @PYTHON@") ;;
  "@MACHINE@ "*) fail "$python is Python ${here#* }, this runtime's wheels are for @PYTHON@: set COVSPEC_PYTHON to a Python @PYTHON@, or flash a runtime built with one" ;;
  *) fail "this runtime was flashed for @MACHINE@, Python @PYTHON@, but this device is ${here% *}, Python ${here#* } ($python): flash again for this device (covspec device flash --bundle B --to ... --platform linux-${here% *} --python ${here#* })" ;;
esac
echo "covspec runtime: installing into $venv (once)" >&2
rm -rf "$venv.new"
"$python" -m venv "$venv.new" >&2 || fail "$python -m venv failed: install the venv module (e.g. apt-get install python3-venv)"
PIP_CONFIG_FILE=/dev/null "$venv.new/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
  --find-links "$rt/wheels" "covspec[device]" >&2 || fail "installing the wheels of $rt/wheels failed (see above)"
rm -rf "$venv" && mv "$venv.new" "$venv" && cp "$rt/runtime.json" "$venv/covspec-runtime.json"
"""

LAUNCHER_SH = r"""#!/bin/sh
# Written by `covspec device flash`: `covspec-device ...` from runtime/venv (made on first use), torch-free,
# with the native ExecuTorch shim of runtime/lib and `run --bundle` defaulting to the flashed bundle.
#   covspec-device run --edge tcp://HOST:PORT --image IMAGE --prompt "..." [--mode covspec]
here=$(cd "$(dirname "$0")/.." && pwd) || exit 1
rt="$here/runtime"
sh "$rt/install.sh" || exit $?
if [ -f "$rt/lib/libcovspec_et.so" ]; then
  COVSPEC_ET_NATIVE=${COVSPEC_ET_NATIVE:-$rt/lib/libcovspec_et.so}
  LD_LIBRARY_PATH="$rt/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export COVSPEC_ET_NATIVE LD_LIBRARY_PATH
fi
# the runtime's own child processes (the native shim's probe load: python -m ...) must not import a
# `covspec` folder from the working directory either (this python itself runs isolated, -I)
PYTHONSAFEPATH=1
export PYTHONSAFEPATH
if [ "$1" = run ]; then
  given=no
  for arg in "$@"; do case $arg in --bundle|--bundle=*|--model|--model=*) given=yes ;; esac; done
  if [ $given = no ]; then shift; set -- run --bundle "$here/bundle" "$@"; fi
fi
COVSPEC_RUNTIME_JSON="$rt/runtime.json"
export COVSPEC_RUNTIME_JSON
exec "$rt/venv/bin/python" -I -c 'import os, sys
from covspec.device_runtime.platforms import check_here
check_here(os.environ["COVSPEC_RUNTIME_JSON"])
from covspec.cli import device_main
sys.exit(device_main())' "$@"
"""


def write_scripts(folder: Path, here: Platform) -> None:
    installer = (INSTALL_SH.replace("@PYTHON@", here.python).replace("@MACHINE@", here.machine)
                 .replace("@COMMAND@", here.python_command))
    for name, text in ((INSTALLER, installer), (LAUNCHER, LAUNCHER_SH)):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        path.chmod(0o755)


def write_runtime_manifest(folder: Path, here: Platform) -> None:
    """runtime.json: the platform (machine, Python, the lowest glibc its wheels and libraries accept)."""
    names = sorted(str(p.relative_to(folder)) for sub in ("bin", "runtime/wheels", "runtime/lib", "runtime")
                   for p in (folder / sub).glob("*") if p.is_file() and p.name != "runtime.json")
    files = {name: {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size} for name in names}
    binaries = [folder / n for n in names if n.startswith("runtime/lib/")]
    wheels = [folder / n for n in names if n.endswith(".whl")]
    manifest = {
        "format": FORMAT, "kind": "covspec-device-runtime",
        "platform": {"machine": here.machine, "python": here.python,
                     "glibc": glibc_needed(binaries, [w.name for w in wheels])},
        "built_on": local_platform().describe(), "native_shim": any(n.endswith("libcovspec_et.so") for n in names),
        "files": files,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    path = folder / RUNTIME_MANIFEST
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


GLIBC_SYMBOL = re.compile(rb"GLIBC_(\d+)\.(\d+)")
MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_|manylinux(2014|2010|1)_")
LEGACY = {"2014": (2, 17), "2010": (2, 12), "1": (2, 5)}


def glibc_needed(binaries: list[Path], wheel_names: list[str]) -> str:
    """The newest glibc symbol version the shipped libraries use, or the newest of the wheels' lowest
    manylinux tags, whichever is higher ("" when nothing needs glibc)."""
    versions = [(int(a), int(b)) for path in binaries for a, b in GLIBC_SYMBOL.findall(path.read_bytes())]
    for name in wheel_names:
        tags = [(int(m[0]), int(m[1])) if m[0] else LEGACY[m[2]] for m in MANYLINUX.findall(name)]
        if tags:
            versions.append(min(tags))
    if not versions:
        return ""
    major, minor = max(versions)
    return f"{major}.{minor}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covspec.device_runtime.runtime_payload",
                                     description="build this machine's device runtime for `covspec device flash`")
    parser.add_argument("action", choices=["build"])
    parser.add_argument("--cache", help="payload folder (default ~/.cache/covspec/device-runtime/<platform>)")
    parser.add_argument("--platform", help="another target platform (linux-aarch64; default: this machine's)")
    parser.add_argument("--python", help="the target's Python (MAJOR.MINOR) with --platform")
    parser.add_argument("--glibc", help="the target's glibc (MAJOR.MINOR) with --platform, where known")
    args = parser.parse_args(argv)
    try:
        target = None
        if args.platform:
            from covspec.device_runtime.platforms import from_flags, unbuildable

            target = from_flags(args.platform, args.python or "", args.glibc)
            problem = unbuildable(target)
            if problem:
                raise PayloadError(f"{target.describe()}: {problem}")
        folder = build_payload(args.cache, log=lambda line: print(line, file=sys.stderr), target=target)
    except (PayloadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
