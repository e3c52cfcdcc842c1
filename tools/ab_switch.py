"""Is a code-path switch faster? An A/B in one process, on a trained run's real batches.

    python tools/ab_switch.py ops.ONEDNN_LINEAR --load-path saved_models/test_IMDB_400_100 --data-dir data --T 30 --K 10 --betas 0 0.2 --batch_size 50 --thirdphase --fast

Sets a module-level boolean (MODULE.NAME) to False and to True in turn, round after round (the
order flipped every other round), and times the gradients of the same --batches batches in
each setting as benchmark.py computes them, with its flags (--fast, --alg, --device, --threads, ...). The
weights do not change. Both settings see the same drift of a shared machine, which two separate
benchmark.py runs do not: there a few per cent difference is lost in the noise. Prints one JSON
line: samples/s per setting (median and every round) and the ratio of the medians.
"""
import importlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark  # noqa: E402
import devices  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: tools/ab_switch.py MODULE.NAME [--rounds N] [benchmark.py flags]"
    rounds = 8
    if "--rounds" in argv:
        i = argv.index("--rounds")
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if not value.isdigit() or int(value) < 1:
            sys.exit(f"--rounds: expected a positive integer, got {value!r}\n{usage}")
        rounds = int(value)
        del argv[i:i + 2]
    if not argv or argv[0].startswith("-") or "." not in argv[0]:
        sys.exit(usage)
    module_name, name = argv[0].rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        sys.exit(f"{argv[0]}: no module {module_name!r}")
    if not isinstance(getattr(module, name, None), bool):
        sys.exit(f"{argv[0]} is not a module-level boolean")
    args = benchmark.parse_args(argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = benchmark.pick_device(args.device), devices.DTYPES[args.dtype]
    model = benchmark.build(args, device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [benchmark.random_batch(model, args, device, dtype, gen) for _ in range(args.batches)]

    def run():
        start = time.perf_counter()
        for x, y in batches:
            benchmark.gradients(model, x, y, args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    original = getattr(module, name)
    times = {False: [], True: []}
    try:
        run()  # warm-up
        for r in range(rounds):
            for value in (False, True) if r % 2 == 0 else (True, False):
                setattr(module, name, value)
                times[value].append(run())
    finally:
        setattr(module, name, original)
    n = sum(x.shape[0] for x, _ in batches)
    out = {"switch": argv[0], "default": original, "rounds": rounds, "samples": n,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "threads": torch.get_num_threads()}
    for value, ts in times.items():
        out[f"{value}_samples_per_s"] = round(n / statistics.median(ts), 2)
        out[f"{value}_rounds"] = [round(n / t, 1) for t in ts]
    out["true_over_false"] = round(statistics.median(times[False]) / statistics.median(times[True]), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
