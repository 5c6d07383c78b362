"""Builds ``_lpa_cuda`` from ``csrc/`` as plain host C++ with the emulation in this folder (emu.h,
mma.h): in every source and header, each ``kernel<<<grid, block, smem, stream>>>(args);`` becomes
``lpa_emu::launch(grid, block, [&] { kernel(args); });`` and g++ compiles the rest unchanged. The module
also holds ``order_probe.cpp``'s C function, the witness of the block order a launch runs."""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sysconfig
from pathlib import Path

from lpa_kernels import _cuda_build

HERE = Path(__file__).resolve().parent
LAUNCH = re.compile(r"(\b[A-Za-z_][\w:]*(?:<[^;<>()]*>)?)<<<(.*?)>>>\(", re.S)


def _top_level_split(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "(<[{"
        depth -= ch in ")>]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def rewrite_launches(source: str) -> str:
    out, pos = [], 0
    for match in LAUNCH.finditer(source):
        if match.start() < pos:
            continue
        grid, block = _top_level_split(match.group(2))[:2]
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        args = source[match.end():end - 1]
        out.append(source[pos:match.start()])
        out.append(f"::lpa_emu::launch(dim3({grid}), dim3({block}), [&] {{ {match.group(1)}({args}); }})")
        pos = end
    return "".join(out) + source[pos:]


def _cuda_include() -> Path:
    roots = [os.environ.get("CUDA_HOME"), Path(_cuda_build.find_nvcc()).resolve().parent.parent, "/usr/local/cuda"]
    for root in (Path(r) for r in roots if r):
        if (root / "include" / "cuda_runtime.h").is_file():
            return root / "include"
    raise RuntimeError("CUDA headers not found (set CUDA_HOME)")


def build(build_dir: Path) -> Path:
    """The emulated module's path (``build_dir/_lpa_cuda<ext suffix>``)."""
    import pybind11

    sources = _cuda_build.csrc_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    cuda_include = _cuda_include()
    for name in _cuda_build.HEADERS:  # rewritten copies, found before csrc/ (headers may launch too)
        (build_dir / name).write_text(rewrite_launches((sources / name).read_text()))
    flags = ["g++", "-std=c++20", "-O1", "-fPIC", "-pthread", "-include", str(HERE / "emu.h"), f"-I{HERE}",
             f"-I{build_dir}", f"-I{cuda_include}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    commands, objects = [], []
    for name in _cuda_build.SOURCES:
        text = (sources / name).read_text()
        translated = build_dir / (name + ".cpp")
        translated.write_text(rewrite_launches(text) if name.endswith(".cu") else text)
        objects.append(str(build_dir / (name + ".o")))
        commands.append(flags + ["-c", str(translated), "-o", objects[-1]])
    objects.append(str(build_dir / "order_probe.o"))  # the block-order witness, not part of csrc/
    commands.append(flags + ["-c", str(HERE / "order_probe.cpp"), "-o", objects[-1]])

    def run(cmd):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)}\n{result.stderr[-4000:]}")

    with concurrent.futures.ThreadPoolExecutor(_cuda_build.parallel_jobs()) as pool:
        for future in [pool.submit(run, cmd) for cmd in commands]:
            future.result()
    output = build_dir / _cuda_build.extension_filename()
    cudart = cuda_include.parent / "lib64" / "libcudart_static.a"
    run(["g++", "-shared", "-pthread", "-o", str(output), *objects, str(cudart), "-ldl", "-lrt"])
    return output
