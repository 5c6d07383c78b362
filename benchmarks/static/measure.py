"""Measured times of ``lpa-bench static``'s shape set on a GPU (``lpa-bench static --measure``), written
next to the modelled ones so the roofline model is checked against the hardware.

Each case's modelled call (its ``case.id`` calls of ``shapes.case_calls``, after its setup ran once) is
timed with ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median). The model is of an
H100 SXM: on another GPU the ratio also holds the difference in hardware (``meta.measured_on`` says which).
``measure_head_forms`` times ``head_pgd_``'s two forms side by side, against the form the model picks.
"""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def forced_head_form(class_space: bool):
    """``head_pgd_`` runs ``class_space``'s form (class space for ``add`` only) for the duration, whatever
    ``loop.use_class_space`` would choose."""
    from lpa_kernels.head_pgd import loop

    chosen = loop.use_class_space
    loop.use_class_space = lambda batch, features, classes, steps, mode, gemm, on_gpu: class_space and mode == "add"
    try:
        yield
    finally:
        loop.use_class_space = chosen


def measure_head_forms(device: str = "cuda", backend: str = "triton", sizes=None, steps: int | None = None,
                       timer=None) -> list[dict]:
    """Both ``head_pgd_`` forms timed side by side (``l2``, ``add``, a given direction, as the training step
    calls it) at issue 11's shapes where both can run (class space keeps ``(B, K)`` buffers, so not past one
    chunk), bfloat16 and float32, against the form the GPU's model picks: checks the choice itself.
    ``timer(fn) -> ms``: ``triton.testing.do_bench``'s median (short runs) by default; ``sizes`` ``[(B, D, K)]`` and
    ``steps`` default to issue 11's. One row per shape and dtype."""
    import torch

    from lpa_kernels import head_pgd_
    from lpa_kernels.head_pgd import cost, loop

    from lpa_bench.static import roofline

    if timer is None:
        import triton

        # short runs (the session's static step has a time cap): 5 ms warm-up, 20 ms of repeats
        timer = lambda fn: triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")  # noqa: E731
    steps = roofline.HEAD_TARGET_STEPS if steps is None else steps
    rows = []
    for B, D, K in roofline.HEAD_TARGET_SHAPES if sizes is None else sizes:
        if B * K > loop.CHUNK_ELEMENTS:
            continue
        for dtype in (torch.bfloat16, torch.float32):
            h = torch.randn(B, D, device=device).to(dtype)
            weight = (torch.randn(K, D, device=device) / D**0.5).to(dtype)
            bias, labels = torch.zeros(K, device=device, dtype=dtype), torch.randint(0, K, (B,), device=device)
            delta = torch.zeros(K, D, device=device, dtype=dtype)
            row = {"B": B, "D": D, "K": K, "dtype": str(dtype).removeprefix("torch."), "steps": steps,
                   "model_picks": "class space" if loop.use_class_space(B, D, K, steps, "add", dtype, True) else "rows"}
            for name, class_space in (("class_space", True), ("rows", False)):
                modelled = cost.call_seconds(class_space, B, D, K, steps, dtype.itemsize, loop.chunk_rows(B, K),
                                             loop.compacts(B, D, K))
                row[f"modelled_{name}_ms"] = modelled * 1e3
                try:
                    with forced_head_form(class_space):
                        row[f"measured_{name}_ms"] = timer(lambda: head_pgd_(h, labels, weight, bias, delta, steps, 0.1,
                                                                             1.0, 1.0, "l2", "add", backend=backend))
                except Exception as error:  # noqa: BLE001 - one form failing must not lose the other's time
                    row[f"measured_{name}_ms"], row[f"{name}_error"] = None, f"{type(error).__name__}: {error}"[:300]
            timed = [n for n in ("class_space", "rows") if row[f"measured_{n}_ms"] is not None]
            faster = min(timed, key=lambda n: row[f"measured_{n}_ms"]) if len(timed) == 2 else None
            row["measured_faster"] = None if faster is None else faster.replace("_", " ")
            row["model_agrees"] = None if faster is None else row["measured_faster"] == row["model_picks"]
            rows.append(row)
    return rows
