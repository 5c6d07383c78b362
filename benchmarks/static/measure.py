"""Measured times of ``lpa-bench static``'s shape set on a GPU (``lpa-bench static --measure``), written
next to the modelled ones so the roofline model is checked against the hardware.

Each case's modelled call (its ``case.id`` calls of ``shapes.case_calls``, after its setup ran once) is
timed with ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median). The model is of an
H100 SXM: on another GPU the ratio also holds the difference in hardware (``meta.measured_on`` says which).
"""

from __future__ import annotations

from lpa_bench.static import shapes


def unavailable_reason() -> str:
    """Why nothing can be measured here ("" on a CUDA GPU)."""
    import torch

    if not torch.cuda.is_available():
        return f"needs a CUDA GPU to time the kernels, and torch {torch.__version__} sees none here"
    return ""


def measure_cases(cases) -> dict[str, dict]:
    """``{case id: {"measured_ms": median ms} or {"measured_error": why}}`` for each case, on the GPU."""
    import torch
    import triton

    results = {}
    for case in cases:
        try:
            calls = shapes.case_calls(case, "cuda")
            for variant, call in calls:
                if variant == shapes.SETUP:
                    call()
            timed = [call for variant, call in calls if variant == case.id]
            results[case.id] = {"measured_ms": triton.testing.do_bench(lambda: [call() for call in timed],
                                                                       return_mode="median")}
        except Exception as error:  # noqa: BLE001 - one case failing must not lose the others' times
            results[case.id] = {"measured_error": f"{type(error).__name__}: {error}"[:500]}
        finally:
            calls = timed = None
            torch.cuda.empty_cache()
    return results


def add_measured(roofline_rows: list[dict], results: dict[str, dict]) -> None:
    """Adds ``measured_ms`` and ``measured_over_modelled`` (measured / ``modelled_kernel_ms``) to each
    roofline row (``None`` where the case was not measured; ``measured_error`` where it failed)."""
    for row in roofline_rows:
        result = results.get(row["case"], {})
        ms = result.get("measured_ms")
        row["measured_ms"] = ms
        row["measured_over_modelled"] = ms / row["modelled_kernel_ms"] if ms is not None else None
        if "measured_error" in result:
            row["measured_error"] = result["measured_error"]
