"""Speed of EP (or BPTT) training steps on random inputs of a given shape, without data.

    python benchmark.py --dataset IMDB --seqLen 100 --embed-dim 300 --fc_layers 1000 40 2 \\
        --T 50 --K 25 --batch_size 100 --thirdphase --roofline
    python benchmark.py --dataset SNLI --seqLen 25 --fc_layers 400 3 --T 60 --K 30 \\
        --batch_size 200 --thirdphase --compare --roofline

Prints ONE JSON line. Times are the best of `--batches` timed batches after one warm-up
(the machines are shared, so the best batch is the least disturbed one); the median is there
too. `--reference` times the original implementation's cost instead of the fast path: Φ
recomputed and differentiated with autograd at every step, float32, fixed T and K.
`--compare` times both, alternating batch by batch, the fast path with the speed options
given (`--tol`, `--fast`, `--anderson`, `--tol-nudged`, `--bf16`, `--compile`) against that reference, and adds `reference` and
`speedup_vs_reference`. `--load-path RUN` times on real data: the run's trained weights and
its training samples (`--tol` steps depend on both), e.g.

    python benchmark.py --load-path results/RUN --data-dir data --T 50 --K 25 \
        --betas 0 0.2 --batch_size 100 --thirdphase --tol 1e-3 --compare

`--roofline`
also times `torch.matmul` on the shapes one step multiplies (each FC layer forward
[B, n_in]x[n_in, n_out], its transpose feedback [B, n_out]x[n_out, n_in], and the two
attention bmm) back to back, between the batches, and reports the useful matmul GFLOP/s of
the training step against it (`roofline_fraction`); `kernel_roofline_*` is the same with the
kernel the fast path calls (model_utils.linear: oneDNN on CPU, about twice MKL on AMD).
`--bf16` runs the free phase in bfloat16 (ep_gradients' free_dtype) and reports the relative
error of each parameter's EP gradient against float32 (`bf16_grad_rel_err`); `--tol` stops
each phase early (`free_steps`, `nudged_steps`: steps used on average). `--compile`
compiles the step with torch.compile (the first batch pays the compile). BPTT:
`--bptt-checkpoint C` recomputes the K recorded steps in segments of C (peak memory).
Bad flags or values: one line on stderr, exit code 2.

`peak_mem_mb` is the peak RSS on CPU. glibc keeps freed blocks of up to 32 MB in its heap, so
for memory comparisons run with MALLOC_MMAP_THRESHOLD_=1048576 (RSS then follows the live
tensors); it is `max_memory_allocated` on CUDA.

On a shared machine run it (and main.py) with OMP_WAIT_POLICY=PASSIVE: with other busy
processes, OpenMP threads spinning at every barrier halve the throughput of 2 threads.
"""
import argparse
import json
import os
import resource
import statistics
import sys

import torch

import devices
import flags
import loops
import model_utils as mu
import ops
import registry



def defaults(dataset):
    """The benchmark's default shape of a dataset: its registry entry's benchmark shape, else the
    paper's configuration."""
    spec = registry.get(dataset)
    keys = ("seqLen", "fc_layers", "T", "K", "batch_size", "betas")
    return spec.benchmark or {k: spec.paper[k] for k in keys}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"benchmark.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_flags(a):
    """benchmark.py's flags (main.py's names where they mean the same)."""
    a("--dataset", choices=registry.names(), default="IMDB", help="architecture and input shape")
    a("--seqLen", type=int, help="tokens per sequence (IMDB 100, SNLI 25)")
    a("--embed-dim", type=positive(int), default=300, help="word-vector size D")
    a("--fc_layers", type=int, nargs="+", help="FC sizes, the last = classes")
    a("--T", type=int, help="free-phase steps")
    a("--K", type=int, help="nudged-phase steps")
    a("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="free and nudged beta (IMDB 0 0.1, SNLI 0 0.5)")
    a("--thirdphase", action="store_true", help="3-phase EP (+beta and -beta)")
    a("--estimator", choices=list(mu.ESTIMATORS),
      help="EP estimate (main.py --estimator); default one-sided, or symmetric with --thirdphase")
    a("--alg", choices=["EP", "BPTT"], default="EP", help="learning algorithm to time")
    a("--batch_size", type=int, help="samples per batch (IMDB 100, SNLI 200)")
    a("--act", choices=sorted(ops.ACTIVATIONS), default="my_hard_sig", help="activation sigma")
    a("--device", default="cpu", help="N for cuda:N (CPU when CUDA is absent), or cpu")
    a("--batches", type=positive(int), default=3, help="timed batches after one warm-up")
    a("--reference", action="store_true", help="time the autograd-per-step reference dynamics")
    a("--compare", action="store_true", help="time fast path and reference, alternating")
    a("--dtype", choices=sorted(devices.DTYPES), default="float32", help="model dtype")
    a("--tf32", choices=["off", "free", "all"], default="off",
      help="CUDA TF32 matmuls: off, in the free phase only (main.py's default), or everywhere")
    a("--bf16", action="store_true",
      help="bfloat16 free phase (nudged phases and Hebbian in float32); reports gradient fidelity")
    a("--tol", type=float, help="early stopping tolerance of each phase")
    a("--anderson", type=int, metavar="M",
      help="Anderson mixing of the last M iterates (main.py --anderson; 0 = plain steps)")
    a("--tol-nudged", type=float,
      help="joint ±beta nudged phases stopped on delta's own relative change (main.py --tol-nudged)")
    a("--sample-exit", action="store_true", default=None,
      help="each sample leaves a phase on its own stopping rule, the batch shrinks (main.py --sample-exit)")
    a("--merge-keys", action=argparse.BooleanOptionalAction, default=None,
      help="the retrieval over each text's distinct tokens, weighted by their counts (main.py --merge-keys; "
           "random inputs have none to merge: time it with --load-path)")
    a("--bf16-matmul", action="store_true",
      help="the nudged phases' matmuls with bfloat16 weights, delta float32 (main.py --bf16-matmul)")
    a("--fast", action="store_true",
      help="main.py's --fast solver: --anderson 5 --tol 1e-3 --tol-nudged 1e-2 --sample-exit --merge-keys unless given "
           "(warm starts need epochs, so main.py's training logs measure them)")
    a("--compile", action="store_true", help="torch.compile the step of the dynamics")
    a("--bptt-checkpoint", type=int, default=0, metavar="C",
      help="BPTT: activation checkpointing in segments of C steps (0 = off)")
    a("--load-path", help="time on real data: a run folder of main.py (its trained weights, "
      "architecture and training data); the model flags then come from the run")
    a("--data-dir", default="data", help="with --load-path: where the datasets are")
    a("--cache-dir", help="with --load-path: main.py's data cache (default: main.py's)")
    a("--roofline", action="store_true", help="also time torch.matmul of the step's shapes")
    a("--threads", type=positive(int), help="torch threads (default: torch's choice)")
    a("--seed", type=int, default=0, help="seed of the weights and random inputs")


def parse_args(argv=None):
    p = Parser(description="Time EP/BPTT training steps (random inputs, or a trained run's real data "
               "with --load-path) against the original dynamics; prints one JSON line.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p.add_argument)
    args = p.parse_args(argv)
    args.data = load_run(args, p) if args.load_path else None
    for key, value in defaults(args.dataset).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if (args.reference or args.compare) and args.alg == "BPTT":
        p.error("--reference/--compare time the original EP dynamics: drop --alg BPTT")
    flags.fill_fast(args)
    args.anderson, args.sample_exit, args.merge_keys = args.anderson or 0, bool(args.sample_exit), bool(args.merge_keys)
    solver = args.tol or args.anderson or args.tol_nudged
    if args.reference and (args.bf16 or solver or args.compile):
        p.error("--reference times the original dynamics (float, fixed T and K, autograd per step): "
                "drop --bf16, --tol, --fast and --compile, or use --compare to set them against it")
    args.estimator = args.estimator or mu.estimator_name(args.thirdphase)
    bad = flags.problems(args)  # the rules main.py applies to the same flags
    if bad:
        p.error(bad[0])
    return args


def load_run(args, parser):
    """--load-path: the run's trained weights, architecture and training split (as main.py's
    `test` loads them). Sets the architecture flags; returns dict(state, split, embeddings)."""
    import data_utils
    import runs
    try:
        run = flags.build_parser().parse_args(["--load-path", args.load_path, "--data-dir", args.data_dir]
                                              + (["--cache-dir", args.cache_dir] if args.cache_dir else []))
        log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
        ckpt, path = flags.load_for_eval(run, log)
        data = data_utils.load_for_run(run, log)
    except (runs.UsageError, data_utils.DataError) as e:
        parser.error(str(e))
    arch = ckpt["config"]["model"]
    given = {"seqLen": args.seqLen, "fc_layers": args.fc_layers}
    args.dataset, args.seqLen, args.fc_layers = arch["dataset"], arch["seq_len"], arch["fc_layers"]
    args.embed_dim, args.act, args.gamma = arch["embed_dim"], arch["act"], arch["gamma"]
    for flag, value in given.items():
        if value is not None and value != getattr(args, flag):
            parser.error(f"--{flag} {value} conflicts with the run's model ({getattr(args, flag)})")
    return {"state": runs.restore_model(ckpt, path).state_dict(), "split": data.train,
            "embeddings": data.embeddings,
            "order": torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed))}


def pick_device(spec):
    """--device: cpu, N or cuda:N (model_utils.pick_device: the CPU with a notice without CUDA)."""
    if spec == "cpu":
        return torch.device("cpu")
    try:
        return devices.pick_device(int(spec.split(":")[-1]), lambda msg: print(msg, file=sys.stderr))
    except ValueError as e:
        msg = str(e) if "CUDA device" in str(e) else f"--device: expected N, cuda:N or cpu, got {spec!r}"
        print(f"benchmark.py: error: {msg}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- work counts
def fc_shapes(model):
    """(inputs, outputs) of each dense term of Φ."""
    return [(t.n_in, t.n_out) for t in model.terms if isinstance(t, mu.Dense)]


def step_flops(model, B):
    """Useful matmul FLOPs of one synchronous step, summed over Φ's terms and the units
    (`EPNet.flops`): every dense layer forward and its feedback, and the Hopfield retrieval
    (logits and weighted sum)."""
    return model.flops(B)[0]


def hebbian_flops(model, B):
    return model.flops(B)[1]


def batch_flops(model, args, info):
    B = args.batch_size
    if args.alg == "BPTT":  # forward of T steps, backward of K (about twice a forward)
        return (args.T + 2 * args.K) * step_flops(model, B)
    steps = info["free_steps"] + info["nudged_steps"]
    return steps * step_flops(model, B) + hebbian_flops(model, B) * 3  # drive + 2 Hebbian


# ----------------------------------------------------------------------------- timing
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def random_batch(model, args, device, dtype, gen):
    """The next batch: random inputs, or with --load-path the run's training samples in a
    fixed random order (wrapping around)."""
    B, L, D = args.batch_size, model.L, model.D
    if args.data is not None:
        d = args.data
        args.cursor = getattr(args, "cursor", -B) + B
        idx = d["order"][torch.arange(args.cursor, args.cursor + B) % len(d["order"])]
        x = loops.embed(d["embeddings"], d["split"].ids[idx], dtype)
        return x.to(device), d["split"].labels[idx].to(device)
    shape = (B, L, D) if model.n_inputs == 1 else (B, model.n_inputs, L, D)
    x = 0.15 * torch.randn(shape, generator=gen, dtype=dtype)  # word2vec-like scale
    y = torch.randint(0, model.n_classes, (B,), generator=gen)
    return x.to(device), y.to(device)


def gradients(model, x, y, args, reference=False):
    """The gradients of one batch as train_epoch computes them (into .grad); returns the
    per-phase seconds and steps."""
    if reference:  # the original: fixed T and K, model dtype, autograd of Φ at every step
        return mu.ep_gradients(model, x, y, args.T, args.K, args.betas, args.estimator, reference=True)[1]
    if args.alg == "EP":
        return mu.ep_gradients(model, x, y, args.T, args.K, args.betas, args.estimator,
                               args.tol, torch.bfloat16 if args.bf16 else None,
                               free_tf32=args.tf32 == "free", anderson=args.anderson,
                               tol_nudged=args.tol_nudged, sample_exit=args.sample_exit,
                               bf16_matmul=args.bf16_matmul)[1]
    return mu.bptt_gradients(model, x, y, args.T, args.K, args.bptt_checkpoint, free_tf32=args.tf32 == "free")[1]


def train_step(model, opt, x, y, args, reference):
    """One training step as train_epoch does it; returns the per-phase seconds and steps."""
    clock = devices.Clock(x.device)
    info = gradients(model, x, y, args, reference)
    opt.step()
    total = clock()
    return dict(info, total_s=total, update_s=total - info["free_s"] - info["nudged_s"])


def roofline_ops(model, B, device, dtype, kernel):
    """Matmuls of one step's shapes: torch.matmul, or (kernel) the fast path's `linear`."""
    mm = ops.linear if kernel else (lambda a, w: torch.matmul(a, w.t()))
    rand = lambda *shape: torch.rand(*shape, device=device, dtype=dtype)  # noqa: E731
    work, shapes = [], fc_shapes(model)
    for (n_in, n_out), layer in zip(shapes, model.fc):
        w, s_in, s_out = layer.weight.detach().to(dtype), rand(B, n_in), rand(B, n_out)
        work.append(lambda s_in=s_in, w=w: mm(s_in, w))  # forward
        work.append(lambda s_out=s_out, w=w: mm(s_out, w.t()))  # feedback
    q, a = rand(B, model.P, model.L, model.D), rand(B, model.P, model.L, model.L)
    work += [lambda: torch.matmul(q, q.transpose(-1, -2)), lambda: torch.matmul(a, q)]
    return work


class Roofline:
    """The matmuls of a step run back to back for a quarter of a batch's steps (a duration
    long enough to see the same machine load as a batch); best of the sweeps, which are
    interleaved with the batches."""

    def __init__(self, model, args, device, dtype):
        self.steps = max(10, (args.T + 2 * args.K) // 4)
        self.flops, self.device = self.steps * step_flops(model, args.batch_size), device
        self.ops = {kind: roofline_ops(model, args.batch_size, device, dtype, kind == "kernel")
                    for kind in ("matmul", "kernel")}
        self.best = {kind: float("inf") for kind in self.ops}

    def sweep(self):
        with torch.no_grad():
            for kind, work in self.ops.items():
                for op in work:  # warm-up
                    op()
                clock = devices.Clock(self.device)
                for _ in range(self.steps):
                    for op in work:
                        op()
                self.best[kind] = min(self.best[kind], clock())

    def gflops(self, kind):
        return self.flops / self.best[kind] / 1e9


def summarize(model, args, runs):
    best = min(runs, key=lambda r: r["total_s"])
    gflops = batch_flops(model, args, best) / best["total_s"] / 1e9
    return {"samples_per_s": args.batch_size / best["total_s"],
            "seconds_per_batch": best["total_s"],
            "median_seconds_per_batch": statistics.median(r["total_s"] for r in runs),
            "free_s": best["free_s"], "nudged_s": best["nudged_s"], "update_s": best["update_s"],
            "free_steps": statistics.mean(r["free_steps"] for r in runs),
            "nudged_steps": statistics.mean(r["nudged_steps"] for r in runs),
            "gflops": gflops}


def bf16_fidelity(model, args, device, dtype, gen):
    """‖g_bf16 − g_fp32‖ / ‖g_fp32‖ of the EP estimate, per parameter, on one batch."""
    x, y = random_batch(model, args, device, dtype, gen)
    grads = []
    for free_dtype in (None, torch.bfloat16):
        mu.ep_gradients(model, x, y, args.T, args.K, args.betas, args.estimator, args.tol, free_dtype,
                        anderson=args.anderson, tol_nudged=args.tol_nudged)
        grads.append([p.grad.clone() for p in model.params()])
    return {name: ((a - b).norm() / b.norm()).item()
            for name, a, b in zip(model.param_names(), grads[1], grads[0])}


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = devices.DTYPES[args.dtype]
    if args.bf16 or args.bf16_matmul:
        try:
            notice = ops.bf16_notice(device)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if notice:
            print(notice, file=sys.stderr)
    model = build(args, device, dtype)
    modes = [False, True] if args.compare else [args.reference]
    roof = Roofline(model, args, device, dtype) if args.roofline else None
    base = rss_mb() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2 ** 20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    load = os.getloadavg()[0]
    gen = torch.Generator().manual_seed(args.seed)
    runs = time_batches(model, args, device, dtype, gen, modes, roof)
    out = report(model, args, device, runs[modes[0]], base, load)
    if args.bf16:
        out["bf16_grad_rel_err"] = bf16_fidelity(model, args, device, dtype, gen)
    if args.compare:
        out["reference"] = summarize(model, args, runs[True])
        out["speedup_vs_reference"] = out["samples_per_s"] / out["reference"]["samples_per_s"]
    if roof is not None:
        for kind, prefix in (("matmul", "roofline"), ("kernel", "kernel_roofline")):
            out[f"{prefix}_gflops"] = roof.gflops(kind)
            out[f"{prefix}_fraction"] = out["gflops"] / roof.gflops(kind)
        if args.compare:
            out["reference"]["roofline_fraction"] = out["reference"]["gflops"] / roof.gflops("matmul")
    print(json.dumps(rounded(out)))


def build(args, device, dtype):
    """The model to time: random weights, or the run's (--load-path), compiled with --compile."""
    model = mu.EPNet(args.dataset, args.seqLen, args.embed_dim, args.fc_layers, args.act,
                     getattr(args, "gamma", None))
    if args.data is not None:
        model.load_state_dict(args.data["state"])
    model = model.to(device, dtype)
    if args.compile:
        model.compile_step()
    model.merge_keys = args.merge_keys  # the reference dynamics never merge (ep_gradients)
    devices.set_cuda_tf32(args.tf32 == "all")
    return model


def time_batches(model, args, device, dtype, gen, modes, roof):
    """One warm-up and --batches timed training steps per mode (fast path False, reference True),
    the modes alternating batch by batch; roofline sweeps in between. {mode: [step infos]}."""
    opt = loops.make_optimizer(model, [1e-5] * model.n_synapse_layers)
    runs = {mode: [] for mode in modes}
    for i in range(args.batches + 1):  # batch 0 warms up
        for mode in modes:
            x, y = random_batch(model, args, device, dtype, gen)
            run = train_step(model, opt, x, y, args, mode)
            if i > 0:
                runs[mode].append(run)
        if roof is not None:
            roof.sweep()
    return runs


def report(model, args, device, runs, base, load):
    """The JSON record of the timed run (before the comparison and roofline fields)."""
    out = summarize(model, args, runs)
    out.update({"peak_mem_mb": peak_mb(device), "base_mem_mb": base,
                "dtype": "bfloat16 free phase" if args.bf16 else args.dtype, "device": str(device),
                "threads": torch.get_num_threads(), "alg": args.alg, "estimator": args.estimator,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                "dynamics": "reference" if args.reference else "fast", "tol": args.tol,
                "anderson": args.anderson, "tol_nudged": args.tol_nudged, "sample_exit": args.sample_exit,
                "bf16_matmul": args.bf16_matmul, "merge_keys": args.merge_keys, "compile": args.compile,
                "bptt_checkpoint": args.bptt_checkpoint, "tf32": args.tf32,
                "inputs": f"training data of {args.load_path}" if args.data else "random",
                "batch_size": args.batch_size, "batches": args.batches,
                "step_gflop": step_flops(model, args.batch_size) / 1e9,
                "loadavg": [round(load, 2), round(os.getloadavg()[0], 2)],
                "roofline_gflops": None, "roofline_fraction": None})
    return out


def rounded(d):
    return {k: rounded(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
            for k, v in d.items()}


if __name__ == "__main__":
    main()
