"""Facts read from compiled GPU code without a GPU: instruction counts in PTX and SASS, and the
resource usage ptxas reports (registers, spill bytes, stack) or cuobjdump dumps from a cubin/.so.

The tools are the ones that ship with Triton (``triton/backends/nvidia/bin``: ``cuobjdump``,
``nvdisasm``, ``ptxas``), so nothing beyond ``pip install triton`` is needed.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary shipped with Triton (falls back to PATH, then /usr/local/cuda/bin)."""
    import shutil

    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    return shutil.which(name) or f"/usr/local/cuda/bin/{name}"


# --------------------------------------------------------------------------------------------------
# SASS
# --------------------------------------------------------------------------------------------------

# An opcode with its modifiers, which may hold lower case: HGMMA.64x64x8.F32.TF32.
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
TENSOR_CORE_SASS = ("HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA")
# REDUX is a warp-wide reduction, not an atomic; ATOMS works on shared memory.
GLOBAL_ATOMIC_SASS = ("ATOM", "ATOMG", "RED", "REDG")


def sass_opcodes(sass: str) -> Counter:
    """Full opcodes (with modifiers, e.g. ``LDG.E.128``) of every instruction in a SASS listing."""
    return Counter(m.group(1) for m in _SASS_LINE.finditer(sass))


def _sass_width(opcode: str) -> int:
    """Bits moved per thread by an LDG/STG opcode: ``.128``/``.64`` say so, ``.U8``/``.S16`` etc.
    are narrower than the default 32."""
    for bits in (128, 64):
        if f".{bits}" in opcode:
            return bits
    for narrow, bits in ((".U8", 8), (".S8", 8), (".U16", 16), (".S16", 16)):
        if narrow in opcode:
            return bits
    return 32


def sass_facts(opcodes: Counter) -> dict:
    """Counts that matter for performance: global access widths, tensor-core, async-copy, atomic and
    local-memory (spill) instructions."""
    def count(pred):
        return sum(n for op, n in opcodes.items() if pred(op))

    base = lambda op: op.split(".")[0]  # noqa: E731
    facts = {}
    for kind, opcode in (("load", "LDG"), ("store", "STG")):
        facts[f"global_{kind}s_128"] = count(lambda op: base(op) == opcode and _sass_width(op) == 128)
        facts[f"global_{kind}s_narrower"] = count(lambda op: base(op) == opcode and _sass_width(op) < 128)
    facts["tensor_core"] = {t: opcodes_n for t in TENSOR_CORE_SASS
                            if (opcodes_n := count(lambda op, t=t: base(op) == t))}
    # TF32 tensor-core instructions (e.g. HGMMA.64x64x8.F32.TF32) and FP32 CUDA-core FMAs: which one a
    # float32 GEMM runs on.
    facts["tensor_core_tf32"] = count(lambda op: base(op) in TENSOR_CORE_SASS and ".TF32" in op)
    facts["ffma"] = count(lambda op: base(op) == "FFMA")
    facts["async_copies"] = count(lambda op: base(op) in ("LDGSTS", "UTMALDG", "UBLKCP", "UTMASTG"))
    facts["tma_loads"] = count(lambda op: base(op) == "UTMALDG")
    facts["atomics"] = count(lambda op: base(op) in GLOBAL_ATOMIC_SASS)
    facts["shared_atomics"] = count(lambda op: base(op) == "ATOMS")
    facts["local_accesses"] = count(lambda op: base(op) in ("LDL", "STL"))
    facts["instructions"] = sum(opcodes.values())
    return facts


def cubin_sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvidia_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


# --------------------------------------------------------------------------------------------------
# PTX
# --------------------------------------------------------------------------------------------------

_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9_]+)*)")
_PTX_TYPE_BITS = re.compile(r"\.[bfsu](8|16|32|64)\b")


def ptx_facts(ptx: str) -> dict:
    """Global loads/stores by width (vector length x element bits), tensor-core and atomic
    instructions in the PTX Triton generated (before ptxas, which may still merge or split them)."""
    facts = {"ptx_global_loads_128": 0, "ptx_global_loads_narrower": 0,
             "ptx_global_stores_128": 0, "ptx_global_stores_narrower": 0}
    for kind, modifiers in _PTX_ACCESS.findall(ptx):
        vector = re.search(r"\.v(\d)", modifiers)
        type_bits = _PTX_TYPE_BITS.findall(modifiers)
        bits = (int(vector.group(1)) if vector else 1) * (int(type_bits[-1]) if type_bits else 32)
        key = f"ptx_global_{'loads' if kind == 'ld' else 'stores'}_{'128' if bits >= 128 else 'narrower'}"
        facts[key] += 1
    facts["ptx_wgmma"] = len(re.findall(r"\bwgmma\.mma_async", ptx))
    facts["ptx_mma_sync"] = len(re.findall(r"\bmma\.sync", ptx))
    facts["ptx_atomics"] = len(re.findall(r"\b(?:atom|red)\.global", ptx))
    return facts


# --------------------------------------------------------------------------------------------------
# Resource usage
# --------------------------------------------------------------------------------------------------


def ptxas_resources(log: str) -> dict:
    """Registers, spill bytes and stack from a ``ptxas -v`` log (one kernel)."""
    def number(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return {"registers": number(r"Used (\d+) registers"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame")}


_RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def dump_resource_usage(path: str, arch: str) -> dict:
    """``{function: {registers, stack_bytes, shared_bytes, local_bytes}}`` for one arch of a cubin or
    fat binary (``cuobjdump --dump-resource-usage``)."""
    out = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", "-arch", arch, path],
                         capture_output=True, text=True, check=True).stdout
    return {m.group(1): {"registers": int(m.group(2)), "stack_bytes": int(m.group(3)),
                         "shared_bytes": int(m.group(4)), "local_bytes": int(m.group(5))}
            for m in _RESOURCE.finditer(out)}


def sass_by_function(sass: str) -> dict[str, str]:
    """A cuobjdump SASS listing split into ``{function: its listing}``."""
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return dict(zip(parts[1::2], parts[2::2]))
