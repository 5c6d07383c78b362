"""Where one training step's device time goes: ERM vs LPA (T = 0, 1, 3) on a benchmark network.

    python -m lpa_bench.profile_step [--model mlp|resnet] [--layer NAME] [--tier gpu] [--steps 5] [--json PATH]

For each method, ``torch.profiler`` records ``--steps`` steps (after warm-up) and this prints, per step,
the number of device kernels launched, the summed device time, the host time of the step, and the
heaviest kernels by device time. On a CPU the same table lists CPU operators instead. Complements
``lpa-bench``'s step timings: those say how much slower a step is, this says which kernels cost it.
"""

from __future__ import annotations

import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lpa_bench.training import NETWORKS, STEPS, training_step
from lpa_programs.cli import Parser, check_writable, write_json_atomically, write_or_exit

TOP = 8


def _profile(name: str, steps: int | None, base, x, y, num_classes: int, layer: str, repeats: int) -> dict:
    model = copy.deepcopy(base)
    step, _ = training_step(name, steps, model, x, y, num_classes, layer)
    for _ in range(3):  # warm-up: Triton compiles, cuBLAS handles, allocator
        step()
    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            step()
        if cuda:
            torch.cuda.synchronize()
    host_ms = (time.perf_counter() - start) * 1e3 / repeats
    kernels = [e for e in prof.events() if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda]
    if not cuda:  # CPU: top-level operators stand in for kernels
        kernels = [e for e in kernels if e.cpu_parent is None]
    per_name: dict = {}
    for e in kernels:
        total, count = per_name.get(e.name, (0.0, 0))
        per_name[e.name] = (total + (e.device_time if cuda else e.cpu_time), count + 1)
    heaviest = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:TOP]
    return {
        "method": name if steps is None else f"{name} T={steps}",
        "launches_per_step": len(kernels) / repeats,
        "device_ms_per_step": sum(t for t, _ in per_name.values()) / 1e3 / repeats,
        "host_ms_per_step": host_ms,
        "heaviest": [{"name": n[:90], "ms_per_step": t / 1e3 / repeats, "calls_per_step": c / repeats}
                     for n, (t, c) in heaviest],
    }


def main(argv=None) -> None:
    p = Parser(prog="python -m lpa_bench.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(NETWORKS), default="mlp", help="the network (default: mlp)")
    p.add_argument("--layer", default=None, help="the perturbed layer (default: the network's first timed layer)")
    p.add_argument("--tier", choices=sorted(NETWORKS["mlp"].sizes), default=None,
                   help="size tier (default: gpu on a GPU, else cpu)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per method (default: 5)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: must be at least 1 (got {args.steps})")
    network = NETWORKS[args.model]
    layer = args.layer or next(iter(network.layers))
    if layer not in network.layers:
        p.error(f"--layer: {layer!r} is not one of {args.model}'s timed layers {list(network.layers)}")
    if args.json is not None and check_writable(args.json):  # before minutes of profiling
        p.error(f"argument --json: {check_writable(args.json)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = network.sizes[args.tier or ("gpu" if device.type == "cuda" else "cpu")]
    torch.manual_seed(0)
    base, input_shape = network.build(shape)
    base = base.to(device)
    x = torch.randn(*input_shape, device=device)
    y = torch.randint(0, shape["K"], (shape["B"],), device=device)
    results = []
    for name, steps in [("erm", None)] + [("lpa", t) for t in STEPS]:
        r = _profile(name, steps, base, x, y, shape["K"], layer, args.steps)
        results.append(r)
        print(f"{r['method']:>9}: {r['launches_per_step']:6.1f} launches/step, device {r['device_ms_per_step']:.3f} ms/step,"
              f" host {r['host_ms_per_step']:.3f} ms/step", flush=True)
        for k in r["heaviest"]:
            print(f"{'':>11}{k['ms_per_step']:8.3f} ms x{k['calls_per_step']:5.1f}  {k['name']}")
    if args.json:
        report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "model": args.model,
                  "layer": layer, "shape": shape, "results": results}
        write_or_exit(p, "--json", args.json, lambda: write_json_atomically(args.json, report))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
