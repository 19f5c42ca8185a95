"""Building and loading the C++ CPU kernels (``csrc/``) for one instruction set.

The kernels are plain C++ with OpenMP and no torch headers, built on first use with the system
compiler and cached under ``$VISIONZOO_CACHE_DIR`` (default ``~/.cache/visionzoo``), keyed by the
sources, the flags, the compiler, the instruction set and the CPU. The instruction set is the best
this CPU executes (``avx512``, ``avx2``, ``neon``, else ``scalar``: see ``csrc/vec.h``), or the one
``VISIONZOO_NATIVE_ISA`` names (``avx512|avx2|neon|scalar``). Concurrent processes share one build:
the first takes a file lock on the cache entry and compiles, the others wait for it and load the
result. ``VISIONZOO_NATIVE=0`` turns the kernels off; ``VISIONZOO_CXX`` (or ``CXX``) picks the
compiler.

The flags are the safe ones: no ``-ffast-math``, which would let the compiler assume that no value
is NaN or infinite (the kernels must pass NaN and inf through as the reference does), only
contraction into FMAs, no errno from libm and no FP traps. Against ``-ffast-math`` they cost
nothing measurable (the vector code is explicit; exp and the float log are polynomials, not libm calls).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("block_kernels.cpp", "window_kernels.cpp", "scan_kernels.cpp", "act_kernels.cpp", "norm_kernels.cpp", "capi.cpp")
ABI_VERSION = int(re.search(r"#define VZ_ABI_VERSION (\d+)", (CSRC / "abi.h").read_text()).group(1))
ISAS = ("avx512", "avx2", "neon", "scalar")
COMPILE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno",
                 "-fno-trapping-math"]
LINK_FLAGS = ["-shared", "-fopenmp"]
# the first build, for the notice: 17 s of compiler CPU time for AVX-512 (13 s for AVX2), the two kernel
# objects compiled side by side, so about 10 s on two idle cores (a 2-core AMD EPYC); a busy machine
# takes several times longer
BUILD_SECONDS = 15

_lock = threading.Lock()
_libraries: Dict[str, ctypes.CDLL] = {}
_reasons: Dict[str, str] = {}
_selected: Optional[ctypes.CDLL] = None  # the library of selected_isa(), chosen on first use


def compiler() -> Optional[str]:
    for name in (os.environ.get("VISIONZOO_CXX"), os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


@functools.lru_cache(maxsize=None)
def machine_isa() -> str:
    """The widest instruction set of the vector layer that this CPU executes."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "neon"
    flags = set(_cpu_flags().split())
    if {"avx512f", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "scalar"


def executable_isas() -> List[str]:
    """The instruction sets whose build this CPU runs, widest first (always ending with scalar)."""
    best = machine_isa()
    ladder = ["neon", "scalar"] if best == "neon" else ["avx512", "avx2", "scalar"]
    return ladder[ladder.index(best):]


def selected_isa() -> str:
    """``VISIONZOO_NATIVE_ISA`` if set, else :func:`machine_isa`; ValueError naming the variable if
    it names an instruction set that is unknown or that this CPU cannot execute."""
    isa = os.environ.get("VISIONZOO_NATIVE_ISA", "").strip().lower()
    if not isa:
        return machine_isa()
    if isa not in ISAS:
        raise ValueError(f"VISIONZOO_NATIVE_ISA={isa!r}: expected one of {', '.join(ISAS)}")
    if isa not in executable_isas():
        raise ValueError(f"VISIONZOO_NATIVE_ISA={isa!r}: this CPU executes only {', '.join(executable_isas())}")
    return isa


def isa_flags(isa: str, tune_native: bool = True) -> List[str]:
    """Target flags of a build for ``isa``: the machine's own (``-march=native``) where it is that
    instruction set's best, else the baseline of the instruction set tuned for this CPU;
    ``tune_native=False`` for a cross build."""
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r}: expected one of {', '.join(ISAS)}")
    march = {
        "avx512": ["-march=x86-64-v4"],
        "avx2": ["-march=x86-64-v3"],
        "neon": ["-march=armv8-a"],
        "scalar": ["-march=x86-64"] if platform.machine().lower() in ("x86_64", "amd64") else [],
    }[isa]
    if tune_native:
        march = ["-march=native"] if isa == machine_isa() else march + ["-mtune=native"]
    return march + [f"-DVZ_ISA_{isa.upper()}"]


def compile_library(compiler_command: str, isa: str, target: Path, tune_native: bool = True) -> None:
    """Compiles the sources for ``isa`` into the shared library ``target`` (objects side by side,
    then one link); RuntimeError with the compiler's message on failure."""
    flags = COMPILE_FLAGS + isa_flags(isa, tune_native)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [Path(tmp) / (name[:-4] + ".o") for name in SOURCES]
        jobs = [
            (command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for command in (compiler_command.split() + flags + ["-c", str(CSRC / name), "-o", str(obj)]
                            for name, obj in zip(SOURCES, objects))
        ]
        for command, job in jobs:
            _, err = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{err[-2000:]}")
        lib = Path(tmp) / "na_cpu.so"
        command = compiler_command.split() + LINK_FLAGS + [str(o) for o in objects] + ["-o", str(lib), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(lib, target)  # atomic: a reader never sees a half-written library


def cache_dir() -> Path:
    root = os.environ.get("VISIONZOO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "visionzoo"
    )
    return Path(root) / "native"


def _target(compiler_command: str, isa: str) -> Path:
    sources = b"\0".join(p.name.encode() + b"\0" + p.read_bytes() for p in sorted(CSRC.glob("*.[ch]*")))
    version = subprocess.run(compiler_command.split() + ["--version"], capture_output=True, text=True).stdout
    flags = " ".join(COMPILE_FLAGS + LINK_FLAGS + isa_flags(isa))
    key = hashlib.sha256(b"\0".join([sources, flags.encode(), version.encode(), _cpu_flags().encode()])).hexdigest()
    return cache_dir() / f"na_cpu_{isa}_{key[:16]}.so"


def _build(compiler_command: str, isa: str) -> Path:
    target = _target(compiler_command, isa)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # another process building this entry: wait for it
        except ImportError:  # no fcntl (Windows): each process builds, the last rename wins
            pass
        if not target.exists():
            print(f"visionzoo: compiling the CPU attention kernels for {isa} (first use, ~{BUILD_SECONDS} s)...",
                  file=sys.stderr, flush=True)
            compile_library(compiler_command, isa, target)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.vz_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.vz_abi_version()}, expected {ABI_VERSION}")
    p, i, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    for suffix in ("f32", "f64"):
        getattr(lib, f"vz_na_forward_{suffix}").argtypes = [p] * 10 + [d, i]
        getattr(lib, f"vz_na_backward_{suffix}").argtypes = [p] * 14 + [d, i]
        getattr(lib, f"vz_block_forward_{suffix}").argtypes = [p] * 9 + [d, i]
        getattr(lib, f"vz_block_backward_{suffix}").argtypes = [p] * 13 + [d, i]
        getattr(lib, f"vz_scan_forward_{suffix}").argtypes = [p] * 11 + [i]
        getattr(lib, f"vz_scan_backward_{suffix}").argtypes = [p] * 19 + [i]
        getattr(lib, f"vz_gelu_tanh_forward_{suffix}").argtypes = [p] * 2 + [ctypes.c_int64, i]
        getattr(lib, f"vz_gelu_tanh_backward_{suffix}").argtypes = [p] * 3 + [ctypes.c_int64, i]
        getattr(lib, f"vz_batch_norm_act_forward_{suffix}").argtypes = [p] * 8 + [ctypes.c_int64] * 2 + [
            ctypes.c_double, i, i]
        getattr(lib, f"vz_batch_norm_act_backward_{suffix}").argtypes = [p] * 10 + [ctypes.c_int64] * 2 + [i, i]
    lib.vz_block_bias_chunks.restype = ctypes.c_int64
    lib.vz_isa.restype = ctypes.c_char_p
    lib.vector_bytes, lib.isa = lib.vz_vector_bytes(), lib.vz_isa().decode()  # read once: asked on every call
    return lib


def library(isa: Optional[str] = None) -> ctypes.CDLL:
    """The kernel library for ``isa`` (default :func:`selected_isa`, read on the first call), built on
    first call; raises RuntimeError (with the reason) when it cannot be built or is disabled."""
    global _selected
    if isa is None:
        if _selected is not None:
            return _selected
        try:
            isa = selected_isa()
        except ValueError as error:
            raise RuntimeError(f"the native CPU kernel is not available: {error}") from None
        _selected = library(isa)
        return _selected
    lib = _libraries.get(isa)
    if lib is not None:
        return lib
    with _lock:
        if isa not in _libraries and isa not in _reasons:
            command = compiler()
            if os.environ.get("VISIONZOO_NATIVE", "1") == "0":
                _reasons[isa] = "disabled by VISIONZOO_NATIVE=0"
            elif command is None:
                _reasons[isa] = "no C++ compiler found (set CXX or VISIONZOO_CXX)"
            else:
                try:
                    _libraries[isa] = _bind(_build(command, isa))
                except (OSError, RuntimeError) as error:
                    _reasons[isa] = f"building the native CPU kernel for {isa} failed: {error}"
    if isa not in _libraries:
        raise RuntimeError(f"the native CPU kernel is not available: {_reasons[isa]}")
    return _libraries[isa]


def available() -> bool:
    """Whether the native kernel of the selected instruction set can be used (builds it on first call)."""
    try:
        library()
    except RuntimeError:
        return False
    return True


def unavailable_reason() -> Optional[str]:
    try:
        library()
    except RuntimeError as error:
        return str(error).removeprefix("the native CPU kernel is not available: ")
    return None


def vector_bytes() -> int:
    """Bytes per vector of the loaded library (the lanes of its tiles, times the element size)."""
    return library().vector_bytes


def isa() -> str:
    """The instruction set of the loaded library."""
    return library().isa
