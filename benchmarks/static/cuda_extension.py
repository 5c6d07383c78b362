"""Resource usage and SASS facts of the built CUDA C++ extension (``lpa_kernels/_lpa_cuda*.so``), per
kernel and arch, read with the ``cuobjdump`` that ships with Triton: registers, stack and local
memory (ptxas's spills land in local memory), shared memory, and the instruction counts of
``machine_code.sass_facts``. No GPU needed; nothing is rebuilt (the .so present is what is read).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from lpa_bench.static import machine_code

PACKAGE = Path(__file__).resolve().parents[2] / "lpa_kernels"


def extension_path() -> Path | None:
    found = sorted(PACKAGE.glob("_lpa_cuda*.so"))
    return found[0] if found else None


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, out.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def template_arguments(kernel: str) -> tuple[str, list[str]]:
    """``("lpa::perturb_forward_kernel", ["float", "float", "4"])`` from a demangled kernel signature
    (``void lpa::perturb_forward_kernel<float, float, 4>(float*, ...)``): its name and top-level
    template arguments."""
    head = kernel.removeprefix("void ").split("(", 1)[0]
    name, _, rest = head.partition("<")
    arguments, depth, current = [], 0, ""
    for char in rest.rstrip().removesuffix(">"):
        if char == "," and depth == 0:
            arguments.append(current.strip())
            current = ""
            continue
        depth += (char == "<") - (char == ">")
        current += char
    if current.strip():
        arguments.append(current.strip())
    return name, arguments


def cuda_kernel_rows(archs=("sm_90a", "sm_80")) -> tuple[list[dict], str]:
    """``(rows, note)``: one row per kernel and arch; ``note`` says why there are none."""
    path = extension_path()
    if path is None:
        return [], "the CUDA extension is not built (no lpa_kernels/_lpa_cuda*.so)"
    rows = []
    for arch in archs:
        try:
            usage = machine_code.dump_resource_usage(str(path), arch)
            sass = subprocess.run([machine_code.nvidia_tool("cuobjdump"), "-sass", "-arch", arch, str(path)],
                                  capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as error:
            return rows, f"cuobjdump failed on {path.name} for {arch}: {error}"
        listings = machine_code.sass_by_function(sass)
        names = _demangle(list(usage))
        for mangled, resources in usage.items():
            facts = machine_code.sass_facts(machine_code.sass_opcodes(listings.get(mangled, "")))
            rows.append({"kernel": names[mangled], "mangled": mangled, "arch": arch, **resources, **facts})
    return rows, ""
