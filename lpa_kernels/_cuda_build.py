"""Builds the CUDA C++ extension ``_lpa_cuda`` from ``csrc/`` with nvcc (no torch, no setuptools).

Used by ``setup.py`` at install time and by ``_cuda_ext`` for the just-in-time build, so it imports
only the standard library (and pybind11 for its headers): it runs in pip's isolated build
environment, where torch is not installed.

Switches (environment):
- ``LPA_CUDA_ARCH``: compute capabilities to compile for, e.g. ``"90"``, ``"80;90"`` or ``"90a"``.
  Default: SASS for sm_80, sm_90 and sm_90a plus sm_90 PTX (which the driver JIT-compiles for newer
  GPUs); archs this nvcc does not know are left out.
- ``LPA_BUILD_JOBS``: parallel nvcc processes (default: CPUs, capped by memory at ~1.5 GB a job).
- ``CUDA_HOME`` / ``CUDA_PATH``: where to look for ``bin/nvcc`` before ``PATH``.
- ``LPA_BUILD_NINJA=0``: compile with a thread pool instead of ninja (ninja, when found, rebuilds
  only what changed, following header dependencies).
- ``LPA_CUTLASS_INCLUDE``: a CUTLASS ``include/`` folder to use instead of the installed
  ``nvidia-cutlass`` wheel's (the build requirement pinned in pyproject.toml).

The CUTLASS GEMMs of ``linear_perturb`` need the CUTLASS headers of version ``CUTLASS_VERSION``:
``linear_perturb_sm90.cu`` (TMA + WGMMA) is compiled for sm_90a alone when sm_90 or sm_90a is among the
archs, ``linear_perturb_sm80.cu`` (cp.async + mma.sync) for sm_80 when an sm_8x arch is, and for sm_90
when sm_90 is (where the GPU tests can reach it). Otherwise a file compiles to a stub whose
``linear_sm90_missing()`` / ``linear_sm80_missing()`` gives the reason code (``CUTLASS_GEMM_REASONS``),
and ``linear_perturb`` runs the wmma GEMM of ``linear_perturb.cu`` there.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SOURCES = ("perturb.cu", "pgd.cu", "head_pgd.cu", "head_pgd_fused.cu", "linear_perturb.cu", "linear_perturb_sm90.cu",
           "linear_perturb_sm80.cu", "class_reduce.cu", "step_update.cu", "bindings.cpp")
HEADERS = ("common.cuh", "class_reduce.cuh", "pgd_row.cuh", "row_softmax.cuh", "linear_epilogue.cuh", "linear_cutlass.cuh",
           "kernels.h")
DEFAULT_ARCHS = ("80", "90", "90a")
MEMORY_PER_JOB = 1.5 * 2**30
CUTLASS_SOURCES = ("linear_perturb_sm90.cu", "linear_perturb_sm80.cu")
CUTLASS_VERSION = (4, 2)  # major, minor of the nvidia-cutlass wheel pinned in pyproject.toml (4.2.0.0)
# Why the extension lacks a CUTLASS GEMM: the code compiled into that file's stub.
CUTLASS_GEMM_REASONS = {
    1: "the CUTLASS headers were not found at build time (pip install nvidia-cutlass==4.2.0.0, or set "
       "LPA_CUTLASS_INCLUDE, and rebuild)",
    2: "the extension was built without an arch this kernel is for (LPA_CUDA_ARCH)",
    3: "the nvcc that built the extension cannot compile for this kernel's arch",
    4: "the CUTLASS headers found at build time are not version 4.2 (pip install nvidia-cutlass==4.2.0.0)",
}


def find_nvcc() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def csrc_dir() -> Path | None:
    """``csrc/`` of a source checkout or editable install (a wheel does not ship it)."""
    candidate = Path(__file__).resolve().parent.parent / "csrc"
    return candidate if (candidate / SOURCES[0]).is_file() else None


def _supported_archs(nvcc: str) -> set[str]:
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=False).stdout
    return {line.strip().removeprefix("compute_") for line in out.split() if line.startswith("compute_")}


def gencode_flags(nvcc: str) -> list[str]:
    archs = _requested_archs()
    supported = _supported_archs(nvcc)
    usable = [a for a in archs if not supported or a.rstrip("af") in supported]
    if not usable:
        raise RuntimeError(f"nvcc at {nvcc} supports none of the requested archs {archs} (it has {sorted(supported)})")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in usable]
    ptx = max((a for a in usable if a.isdigit()), key=int, default=None)
    if ptx:  # PTX of the newest plain arch, so newer GPUs can still run the module
        flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def _requested_archs() -> list[str]:
    requested = os.environ.get("LPA_CUDA_ARCH", "").replace(",", ";").split(";")
    requested = [a.strip().removeprefix("sm_").replace(".", "") for a in requested if a.strip()]
    return requested or list(DEFAULT_ARCHS)


def cutlass_include() -> Path | None:
    """The CUTLASS ``include/`` folder: ``LPA_CUTLASS_INCLUDE``, else the installed ``nvidia-cutlass``
    wheel's (``cutlass_library/source/include``, located without importing the package)."""
    if os.environ.get("LPA_CUTLASS_INCLUDE"):
        folder = Path(os.environ["LPA_CUTLASS_INCLUDE"])
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(next(iter(spec.submodule_search_locations))) / "source" / "include"
    return folder if (folder / "cutlass" / "version.h").is_file() else None


def cutlass_version(include: Path) -> tuple[int, int]:
    text = (include / "cutlass" / "version.h").read_text()
    major, minor = (re.search(rf"#define CUTLASS_{part} (\d+)", text) for part in ("MAJOR", "MINOR"))
    return (int(major.group(1)), int(minor.group(1))) if major and minor else (0, 0)


def cutlass_gemm_flags(nvcc: str, source: str) -> tuple[list[str], int]:
    """(nvcc flags for the CUTLASS GEMM file ``source``, 0) when it can be built, else ([], reason code of
    ``CUTLASS_GEMM_REASONS``)."""
    archs = {a.rstrip("af") for a in _requested_archs()}
    if source == "linear_perturb_sm90.cu":  # wgmma and TMA exist on sm_90a alone
        targets = ["90a"] if "90" in archs else []
    else:  # sm_80 SASS also runs on sm_86/sm_89
        targets = (["80"] if any(a.startswith("8") for a in archs) else []) + (["90"] if "90" in archs else [])
    if not targets:
        return [], 2
    supported = _supported_archs(nvcc)
    if supported and any(t.rstrip("a") not in supported for t in targets):  # nvcc lists compute_90, not 90a
        return [], 3
    include = cutlass_include()
    if include is None:
        return [], 1
    if cutlass_version(include) != CUTLASS_VERSION:
        return [], 4
    gencode = [f"-gencode=arch=compute_{t},code=sm_{t}" for t in targets]
    return gencode + [f"-I{include}", "--expt-relaxed-constexpr", "-DNDEBUG", "-DLPA_WITH_CUTLASS"], 0


def parallel_jobs() -> int:
    if os.environ.get("LPA_BUILD_JOBS"):
        return max(1, int(os.environ["LPA_BUILD_JOBS"]))
    jobs = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
        jobs = min(jobs, max(1, int(available // MEMORY_PER_JOB)))
    except (OSError, KeyError, ValueError):
        pass
    return max(1, min(jobs, len(SOURCES)))


def _include_flags() -> list[str]:
    import pybind11

    return [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]


def compile_commands(nvcc: str, sources: Path, build_dir: Path, output: Path) -> tuple[list[list[str]], list[str]]:
    """(one nvcc command per source, the link command)."""
    common = [nvcc, "-std=c++17", "-O3", "-lineinfo", "-Xcompiler=-fPIC,-fvisibility=hidden", f"-I{sources}"]
    compile_cmds, objects = [], []
    for name in SOURCES:
        obj = build_dir / (name + ".o")
        extra = gencode_flags(nvcc) if name.endswith(".cu") else _include_flags()
        if name in CUTLASS_SOURCES:
            flags, missing = cutlass_gemm_flags(nvcc, name)
            extra = flags or extra + [f"-DLPA_CUTLASS_MISSING={missing}"]
        compile_cmds.append(common + extra + ["-c", str(sources / name), "-o", str(obj)])
        objects.append(str(obj))
    link = [nvcc, "-shared", "-cudart=static", "-o", str(output)] + objects
    return compile_cmds, link


def build_key(nvcc: str, sources: Path) -> str:
    """Hash of the sources, the compiler and the switches: a JIT cache entry is reused only when equal."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + (sources / name).read_bytes())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update(version.encode() + " ".join(gencode_flags(nvcc)).encode() + sys.version.encode())
    digest.update(" ".join(str(cutlass_gemm_flags(nvcc, name)) for name in CUTLASS_SOURCES).encode())
    return digest.hexdigest()[:16]


def build(output: Path, build_dir: Path, sources: Path | None = None, log=print) -> Path:
    """Compiles ``csrc/`` into the extension module ``output`` (objects in ``build_dir``)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    sources = sources or csrc_dir()
    if sources is None:
        raise RuntimeError("the CUDA sources (csrc/) are not available; build from a source checkout")
    # Absolute: ninja runs in build_dir, where relative paths (setup.py's build_temp) would nest.
    output, build_dir = Path(output).resolve(), Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    compile_cmds, link = compile_commands(nvcc, Path(sources), Path(build_dir), Path(output))
    jobs = parallel_jobs()
    log(f"lpa_kernels: compiling the CUDA extension with {nvcc} ({jobs} parallel jobs): {' '.join(gencode_flags(nvcc))}")
    for name in CUTLASS_SOURCES:
        missing = cutlass_gemm_flags(nvcc, name)[1]
        log(f"lpa_kernels: linear_perturb's CUTLASS GEMM {name}: " +
            (f"built (CUTLASS headers {cutlass_include()})" if not missing else f"NOT built: {CUTLASS_GEMM_REASONS[missing]}"))

    ninja = find_ninja()
    if ninja is not None:  # incremental: ninja rebuilds only what changed (header dependencies from nvcc -MD)
        write_ninja_file(Path(build_dir) / "build.ninja", compile_cmds, link)
        _run([ninja, "-C", str(build_dir), "-j", str(jobs)])
        return output
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(_run, cmd) for cmd in compile_cmds]:
            future.result()
    _run(link)
    return output


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"command failed: {' '.join(cmd)}\n{result.stdout}{result.stderr}")


def find_ninja() -> str | None:
    """The ninja binary (PATH, or the PyPI ``ninja`` package's); None builds with a thread pool instead."""
    if os.environ.get("LPA_BUILD_NINJA", "1") == "0":
        return None
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja as ninja_package
    except ImportError:
        return None
    candidate = Path(ninja_package.BIN_DIR) / "ninja"
    return str(candidate) if candidate.is_file() else None


def write_ninja_file(path: Path, compile_cmds: list[list[str]], link: list[str]) -> None:
    """A ``build.ninja`` with one compile edge per source (``-c SRC -o OBJ`` end each command) and the link."""
    lines = [
        "ninja_required_version = 1.3",
        "rule compile",
        "  command = $cmd -MD -MF $out.d",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule link",
        "  command = $cmd",
        "  description = link $out",
    ]
    escape = lambda p: p.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")  # noqa: E731
    for cmd in compile_cmds:
        source, obj = cmd[-3], cmd[-1]
        lines += [f"build {escape(obj)}: compile {escape(source)}", f"  cmd = {shlex.join(cmd)}"]
    objects = " ".join(escape(o) for o in link[5:])
    lines += [f"build {escape(link[4])}: link {objects}", f"  cmd = {shlex.join(link)}"]
    path.write_text("\n".join(lines) + "\n")


def extension_filename(name: str = "_lpa_cuda") -> str:
    return name + sysconfig.get_config_var("EXT_SUFFIX")
