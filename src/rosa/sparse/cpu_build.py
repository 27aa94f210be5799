"""Build, cache and load rosa's own CPU kernels (``csrc/rosa_cpu.cpp``), or say once why they are not used.

Why this route: the kernels are plain C++ behind a C ABI, loaded with ctypes. They include no torch or Python
headers, so the build is one compiler call of a few seconds, needs no ninja, no pybind11 and no Python headers,
and the library does not depend on the torch version. Threads come from OpenMP: torch's wheels ship the same
``libgomp.so.1``, so the kernels share torch's thread pool rather than starting a second one.

The library is compiled at first use with ``-march=native`` and cached under torch's extension directory
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), named by a hash of the source, the flags, the compiler
and the CPU's feature flags: a cache shared by different machines holds one library per kind of CPU. A build
writes to a private file and renames it into place, so processes building at once (DDP ranks) do not collide.

Where no compiler is found or the build fails, the sparse ops use PyTorch's MKL kernels instead, and a single
warning says why. ``ROSA_CPU_KERNELS=0`` turns the compiled kernels off (no build, no warning);
``ROSA_SPARSE_BACKEND=cpu`` insists on them (an error when they cannot be built), ``=torch`` forces MKL.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

ABI_VERSION = 2
SOURCE = Path(__file__).resolve().parent / "csrc" / "rosa_cpu.cpp"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
DEBUG_FLAGS = ("-DROSA_BOUNDS_CHECK",)
BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_libraries: dict[bool, ctypes.CDLL | None] = {}
_errors: dict[bool, str] = {}
_warned = False


class BuildError(RuntimeError):
    """The CPU kernels could not be compiled or loaded (the message says why)."""


def enabled() -> bool:
    """False when ``ROSA_CPU_KERNELS=0`` turns the compiled kernels off."""
    return os.environ.get("ROSA_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else the first of c++, g++, clang++ on PATH."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in candidates:
        found = shutil.which(name.split()[0])
        if found:
            return found
    return None


def cache_root() -> Path:
    """torch's extension directory (``torch.utils.cpp_extension.get_default_build_root`` without importing it:
    that module pulls in setuptools)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    try:
        from torch import _appdirs

        return Path(os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions")))
    except Exception:
        return Path.home() / ".cache" / "torch_extensions"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: ``-march=native`` code is only valid on a CPU with the same ones."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("flags", "Features", "model name")]
    return platform.machine() + "\n".join(dict.fromkeys(keep))


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path(debug: bool = False, cxx: str | None = None) -> Path:
    """Where the build for this source, these flags, this compiler and this CPU lives."""
    cxx = cxx or compiler() or "none"
    flags = FLAGS + (DEBUG_FLAGS if debug else ())
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(flags), _compiler_version(cxx), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    return cache_root() / "rosa_cpu_kernels" / f"rosa_cpu_{key}{'_debug' if debug else ''}.so"


def build(debug: bool = False) -> Path:
    """Compile the kernels unless the cached library exists; returns its path. Raises BuildError."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX or install g++)")
    target = library_path(debug, cxx)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create the cache directory {target.parent}: {e}") from None
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(fd)
    command = [cxx, *FLAGS, *(DEBUG_FLAGS if debug else ()), "-o", tmp, str(SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()[:5]
            raise BuildError(f"`{' '.join(command)}` failed: " + " | ".join(detail))
        os.replace(tmp, target)  # atomic: a concurrent build of the same library just replaces it
    except subprocess.TimeoutExpired:
        raise BuildError(f"the build took longer than {BUILD_TIMEOUT_S} s") from None
    except OSError as e:
        raise BuildError(f"`{' '.join(command)}` could not run: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.rosa_cpu_abi_version.restype = i32
    lib.rosa_cpu_bounds_checked.restype = i32
    lib.rosa_spmm.restype = i32
    lib.rosa_spmm.argtypes = [ptr, i32, i64, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i32, i32, i64, i32]
    lib.rosa_sddmm.restype = i32
    lib.rosa_sddmm.argtypes = [
        ptr,
        i32,
        i64,
        i64,
        ptr,
        i32,
        i64,
        i64,
        i64,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        i32,
        i64,
        i32,
    ]
    return lib


def _load(debug: bool) -> ctypes.CDLL:
    import torch  # noqa: F401  (torch's libgomp is loaded first, so the kernels use its OpenMP runtime)

    path = build(debug)
    try:
        lib = _declare(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as e:
        raise BuildError(f"cannot load {path}: {e}") from None
    if lib.rosa_cpu_abi_version() != ABI_VERSION:
        raise BuildError(f"{path} has ABI version {lib.rosa_cpu_abi_version()}, expected {ABI_VERSION}")
    return lib


def library(debug: bool = False) -> ctypes.CDLL | None:
    """The loaded kernels, built at first call; None (after one warning per process) when they cannot be built,
    None without a warning when ``ROSA_CPU_KERNELS=0``."""
    if not enabled():
        return None
    with _lock:
        if debug not in _libraries:
            try:
                _libraries[debug] = _load(debug)
            except BuildError as e:
                _libraries[debug], _errors[debug] = None, str(e)
                _warn_once(str(e))
        return _libraries[debug]


def error(debug: bool = False) -> str | None:
    """Why the kernels are unavailable (None when they loaded or were never tried)."""
    return _errors.get(debug)


def _warn_once(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"rosa: the compiled CPU sparse kernels are unavailable ({reason}); using PyTorch's MKL sparse kernels, "
        "which are slower (set ROSA_CPU_KERNELS=0 to skip the build and this warning)",
        RuntimeWarning,
        stacklevel=4,
    )


def reset() -> None:
    """Forget the loaded library and any failure (tests): the next call tries again."""
    global _warned
    with _lock:
        _libraries.clear()
        _errors.clear()
        _warned = False
