"""Builds llama.cpp for the machine it runs on, once, and knows whether a build fits this CPU.

Why this exists: pip compiles llama-cpp-python with `-march=native`, which on Intel AMX CPUs
(Sapphire Rapids and later) compiles in ggml's AMX matmul kernels; they crash on the first batched
decode (llama.cpp issue 20824). And pip's wheel cache hands a native wheel built on one CPU to
another machine with the same package version (SIGILL on a CPU without the instructions).

So: every build is native *minus AMX* (`-mno-amx-*` after `-march=native` still wins in GCC and
Clang: an explicitly disabled ISA is never re-enabled by `-march`) and without OpenMP (`NO_OPENMP`),
the wheel is built with pip's cache off, and it is kept in a cache outside the clone under a key
made of everything that decides whether it runs here: package version, CMake arguments, the CPU's
instruction-set flags and the Python tag. A different CPU gets a different key, so it builds its
own wheel instead of reusing one.
The same flags build the `llama-server` of the benchmarks and the local cluster.

Standard library only: it runs before the package's dependencies are installed
(`python -m ktulhu.native_build install`, called by `make setup`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"

#: Appended to the C and C++ flags of every llama.cpp build: no AMX kernels.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
#: ggml's own thread pool instead of OpenMP. With libgomp, every thread that runs a llama.cpp graph
#: keeps its own team of OpenMP threads, and once the process holds more of them than the CPU has
#: cores, libgomp stops spinning at barriers and sleeps instead: a second context computing on
#: another thread (an embeddings request, a reloaded engine's new decode thread) made every later
#: decode step of the chat context 2.5x slower (docs/benchmarks.md). ggml's pools belong to contexts
#: (`engine.threadpool`), not to calling threads, so contexts on different threads no longer do that.
NO_OPENMP = "-DGGML_OPENMP=OFF"
#: Extra CMake arguments per GPU variant (`make setup GPU=cuda`).
GPU_VARIANTS: dict[str, list[str]] = {"cpu": [], "cuda": ["-DGGML_CUDA=on"]}
#: Prefixes of /proc/cpuinfo flags that name instruction sets `-march=native` may use.
ISA_PREFIXES = ("sse", "ssse", "avx", "amx", "fma", "f16c", "bmi", "popcnt", "abm", "movbe", "aes", "pclmul",
                "sha", "vaes", "vpclmul", "gfni", "adx", "rdrand", "rdseed", "xsave", "cx16", "lzcnt", "mmx",
                "prefetch", "clflush", "clwb", "serialize", "waitpkg", "movdir", "enqcmd", "avx_vnni", "vnni")
#: Written into the virtual environment next to the installed build.
MARKER_NAME = "ktulhu-llama-build.json"


class BuildError(RuntimeError):
    """A build step failed; the message says which and what to do."""


def cpu_isa_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's instruction-set flags, sorted (the first `flags` line of /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return [platform.machine(), platform.processor()]
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return sorted({flag for flag in value.split() if flag.startswith(ISA_PREFIXES)})
    return [platform.machine(), platform.processor()]


def cmake_args(gpu: str = "cpu") -> list[str]:
    """The CMake arguments of every llama.cpp build of this project."""
    if gpu not in GPU_VARIANTS:
        raise BuildError(f"unknown GPU variant {gpu!r}; use one of {', '.join(GPU_VARIANTS)}")
    return ["-DGGML_NATIVE=ON", NO_OPENMP, f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}",
            *GPU_VARIANTS[gpu]]


def build_key(gpu: str = "cpu", flags: list[str] | None = None) -> str:
    """What decides whether a build runs on this machine, hashed."""
    facts = {
        "package": LLAMA_CPP_PYTHON,
        "cmake": cmake_args(gpu),
        "cpu": cpu_isa_flags() if flags is None else flags,
        "machine": platform.machine(),
        "python": f"{sys.implementation.name}{sys.version_info.major}{sys.version_info.minor}",
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def cache_root() -> Path:
    """Where builds are kept across clones: `$KTULHU_BUILD_CACHE`, else the user's cache directory."""
    if os.environ.get("KTULHU_BUILD_CACHE"):
        return Path(os.environ["KTULHU_BUILD_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ktulhu"


def marker_path(prefix: str | None = None) -> Path:
    """The build marker of the environment `prefix` (default: this interpreter's)."""
    return Path(prefix or sys.prefix) / MARKER_NAME


def read_marker(prefix: str | None = None) -> dict | None:
    try:
        return json.loads(marker_path(prefix).read_text())
    except (OSError, ValueError):
        return None


def ensure_wheel(gpu: str = "cpu") -> Path:
    """The cached wheel for this machine, built first when missing (4-10 minutes on two cores)."""
    target = cache_root() / "wheels" / build_key(gpu)
    found = sorted(target.glob("llama_cpp_python-*.whl"))
    if found:
        return found[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        env = {**os.environ, "CMAKE_ARGS": shlex.join(cmake_args(gpu)), "FORCE_CMAKE": "1"}
        _say(f"building {LLAMA_CPP_PYTHON} for this CPU ({gpu}, AMX and OpenMP off); 4-10 minutes on two cores")
        _run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-cache-dir", "--no-deps",
              "--no-binary", "llama-cpp-python", "--wheel-dir", tmp, LLAMA_CPP_PYTHON], env=env,
             what=f"building {LLAMA_CPP_PYTHON}")
        wheel = next(Path(tmp).glob("llama_cpp_python-*.whl"))
        staged = Path(tmp) / "out"
        staged.mkdir()
        shutil.move(str(wheel), staged / wheel.name)
        os.replace(staged, target)  # atomic: a half-built wheel is never found by the next run
    return next(target.glob("llama_cpp_python-*.whl"))


def install(gpu: str = "cpu") -> bool:
    """Install the build that fits this CPU into this interpreter's environment; False when it already was."""
    key = build_key(gpu)
    marker = read_marker()
    if marker is not None and marker.get("key") == key and _installed_version() == LLAMA_CPP_PYTHON_VERSION:
        return False
    wheel = ensure_wheel(gpu)
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir",
          "--force-reinstall", "--no-deps", str(wheel)], what="installing the llama-cpp-python wheel")
    # Its own dependencies (numpy, jinja2, diskcache, typing-extensions) come from the index.
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", str(wheel)],
         what="installing llama-cpp-python's dependencies")
    marker_path().write_text(json.dumps({
        "key": key, "gpu": gpu, "package": LLAMA_CPP_PYTHON, "cmake": cmake_args(gpu), "cpu": cpu_isa_flags(),
        "wheel": str(wheel),
    }, indent=2) + "\n")
    _say(f"installed {wheel.name} (build {key})")
    return True


def fits_this_cpu(marker: dict | None) -> bool:
    """Whether an environment's recorded build was made for this CPU's instruction sets."""
    return marker is not None and marker.get("cpu") == cpu_isa_flags()


def llama_server(gpu: str = "cpu") -> Path:
    """A `llama-server` built from the llama.cpp sources inside the pinned sdist, with the same flags."""
    root = cache_root() / "llama-server" / build_key(gpu)
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    source = root / "llama.cpp"
    if not source.is_dir():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                  "--no-binary", ":all:", "--dest", tmp, LLAMA_CPP_PYTHON], what="downloading the llama.cpp sources")
            sdist = next(Path(tmp).glob("*.tar.gz"))
            with tarfile.open(sdist) as archive:
                archive.extractall(tmp, filter="data")
            os.replace(next(Path(tmp).glob("*/vendor/llama.cpp")), source)
    build = root / "build"
    _say(f"building llama-server ({gpu}, AMX and OpenMP off) into {root}")
    _run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", *cmake_args(gpu)],
         what="configuring llama-server")
    _run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{os.cpu_count() or 2}"],
         what="building llama-server")
    return binary


def _installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def _run(command: list[str], *, what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-40:])
        raise BuildError(f"{what} failed (exit {result.returncode}):\n{tail}\n"
                         "needs a C/C++ compiler and CMake >= 3.21 (Debian: apt-get install build-essential cmake)")


def _say(message: str) -> None:
    print(f"ktulhu build: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ktulhu.native_build", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["install", "key", "llama-server"])
    parser.add_argument("--gpu", choices=sorted(GPU_VARIANTS),
                        help="GPU variant (default: $GPU, else the variant installed here, else cpu)")
    args = parser.parse_args(argv)
    args.gpu = args.gpu or os.environ.get("GPU") or (read_marker() or {}).get("gpu") or "cpu"
    try:
        if args.action == "install":
            install(args.gpu)
        elif args.action == "key":
            print(build_key(args.gpu))
        else:
            print(llama_server(args.gpu))
    except BuildError as error:
        print(f"ktulhu build: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
