"""The whole CUDA check in one command: correctness, precision, shipped-model accuracy, speed and
memory at the paper's scale, one real training epoch, and projected paper-run times.

    python tools/gpu_check.py --device 0 --data-dir .gpu_data --out results/gpu_check.json
    python tools/gpu_check.py --quick          # the same sections, tiny, on the CPU (CI runs it)

Sections (each timed; an error in one is recorded and the next runs; once --budget-s is spent
the remaining sections are skipped and say so):
  math       pytest's math checks with the `device` fixture (cpu, and cuda when present):
             closed form = autograd, Hebbian = autograd, 3-phase EP ≈ BPTT, float32 vs float64 EP
  precision  the shipped SNLI model's EP gradient on real SNLI test pairs against float64, per
             layer: float32, TF32 in the free phase (main.py's CUDA default), TF32 everywhere,
             bfloat16 free phase
  test       `main.py --execute test` of saved_models/test_SNLI_25_300 (the CPU gets 6453/9824)
  speed      benchmark.py at the paper's IMDB and SNLI shapes: fast path (float32, TF32, bf16,
             compile) and the autograd-per-step reference; samples/s and peak memory; BPTT
             memory against K
  train      one training epoch on the SNLI sample (main.py), accuracy and time
  projection the paper's 50-epoch runs on this device, from the measured rates

Needs a PyTorch with CUDA and, for the real-data sections, the SNLI files in --data-dir
(snli_1.0_test.jsonl.gz and the train sample, about 2.6 MB; copy them into an ignored folder
that travels with the repo). nltk is the only other package the SNLI path imports.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SNLI_RUN = os.path.join(ROOT, "saved_models", "test_SNLI_25_300")
PAPER = {  # the paper's shapes (seed README), for benchmark.py
    "IMDB": ["--dataset", "IMDB", "--seqLen", "600", "--embed-dim", "300", "--fc_layers", "1000", "40", "2",
             "--T", "50", "--K", "25", "--batch_size", "100", "--thirdphase", "--betas", "0", "0.1"],
    "SNLI": ["--dataset", "SNLI", "--seqLen", "25", "--embed-dim", "300", "--fc_layers", "400", "3",
             "--T", "60", "--K", "30", "--batch_size", "200", "--thirdphase", "--betas", "0", "0.5"],
}
QUICK = {
    "IMDB": ["--dataset", "IMDB", "--seqLen", "8", "--embed-dim", "16", "--fc_layers", "32", "8", "2",
             "--T", "6", "--K", "3", "--batch_size", "8", "--thirdphase"],
    "SNLI": ["--dataset", "SNLI", "--seqLen", "5", "--embed-dim", "16", "--fc_layers", "32", "3",
             "--T", "6", "--K", "3", "--batch_size", "8", "--thirdphase"],
}
TRAIN_SAMPLES = {"IMDB": 25000, "SNLI_sample": 25302, "SNLI_full": 550152}


def run(cmd, timeout, env=None):
    """(returncode, stdout, stderr, seconds) of a subprocess in the repo root."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - t
    except subprocess.TimeoutExpired as e:
        return 124, e.stdout or "", f"timed out after {timeout} s", time.perf_counter() - t


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def has_snli(data_dir):
    return any(name.startswith("snli_1.0_test") for d in (data_dir, os.path.join(data_dir, "snli"),
                                                        os.path.join(data_dir, "snli_1.0"))
               if os.path.isdir(d) for name in os.listdir(d))


def cpu_name():
    """Model name and the vector extensions that matter for the kernels."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    model = re.search(r"model name\s*:\s*(.+)", info)
    flags = set(re.search(r"flags\s*:\s*(.+)", info).group(1).split()) if "flags" in info else set()
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model.group(1).strip() if model else platform.machine()} ({', '.join(ext) or 'no AVX2'})"


def device_arg(args):
    return ["--device", str(args.device)] if args.device is not None else []


# ----------------------------------------------------------------------------- sections
def section_math(args):
    files = ["tests/test_model_utils.py", "tests/test_precision.py"]
    rc, out, err, sec = run([sys.executable, "-m", "pytest", "-q", "-rs", *files, "-k",
                             "closed_form or hebbian_equals or three_phase or trained_model"],
                            timeout=300 if args.quick else 600)
    summary = next((l for l in reversed(out.splitlines()) if " passed" in l or " failed" in l), out[-300:])
    return {"ok": rc == 0, "summary": summary.strip("= "), "seconds": round(sec, 1),
            "cuda_ran": args.torch_device.startswith("cuda") and "no CUDA device" not in out}


def real_snli_batch(args, B):
    """B official SNLI test pairs encoded with the shipped run's vocabulary, or None."""
    import data_utils
    a = argparse.Namespace(dataset="SNLI", data_dir=args.data_dir, seqLen=25,
                           embeddings=os.path.join(SNLI_RUN, "embeddings.npz"), max_test=B, splits=["test"],
                           cache_dir=args.cache_dir)
    try:
        data = data_utils.load_data(a, log=lambda m: None)
    except data_utils.DataError as e:
        return None, str(e)
    x = data.embeddings.half().float()[data.test.ids[:B].long()]
    return (x, data.test.labels[:B]), None


def section_precision(args):
    import torch
    import devices
    import model_utils as mu
    dev = torch.device(args.torch_device)
    ckpt = torch.load(os.path.join(SNLI_RUN, "best_model.pt"), map_location="cpu", weights_only=True)
    h = ckpt["config"]["hyper"]
    B = 8 if args.quick else 100
    batch, why = real_snli_batch(args, B)
    if batch is None:
        import numpy as np
        with np.load(os.path.join(SNLI_RUN, "embeddings.npz"), allow_pickle=False) as f:
            vec = torch.cat([torch.zeros(1, f["vectors"].shape[1]), torch.from_numpy(f["vectors"]).float()])
        g = torch.Generator().manual_seed(0)
        batch = (vec[torch.randint(1, 3000, (B, 2, 25), generator=g)], torch.randint(0, 3, (B,), generator=g))
    x, y = batch

    def grads(dtype, tf32, free_dtype=None):
        model = mu.build_model(ckpt["config"]["model"])
        model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
        model = model.to(dev, dtype)
        with devices.cuda_tf32(tf32 == "all"):
            mu.ep_gradients(model, x.to(dev, dtype), y.to(dev), h["T"], h["K"], tuple(h["betas"]), True,
                            free_dtype=free_dtype, free_tf32=tf32 == "free")
        return model.param_names(), [p.grad.double().cpu() for p in model.params()]

    names, ref = grads(torch.float64, "off")
    out = {"inputs": "official SNLI test pairs" if why is None else f"random token ids ({why})",
           "batch": B, "device": str(dev)}
    for label, kw in [("float32", {"tf32": "off"}), ("tf32_free_phase", {"tf32": "free"}),
                      ("tf32_everywhere", {"tf32": "all"}), ("bf16_free_phase", {"tf32": "off", "free_dtype": torch.bfloat16})]:
        _, got = grads(torch.float32, **kw)
        errs = {n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(names, got, ref)}
        out[label] = {"max": max(errs.values()), "per_layer": errs}
    return out


def section_test(args):
    if not has_snli(args.data_dir):
        return {"skipped": f"no SNLI files in {args.data_dir}"}
    cmd = [sys.executable, "main.py", "--dataset", "SNLI", "--seqLen", "25", "--execute", "test", "--T", "60",
           "--thirdphase", "--batch_size", "200", "--load-path", SNLI_RUN, "--data-dir", args.data_dir,
           "--cache-dir", args.cache_dir, *device_arg(args)] + (["--max-test", "300"] if args.quick else [])
    rc, out, err, sec = run(cmd, timeout=600)
    m = re.search(r"test accuracy ([\d.]+) \((\d+)/(\d+) correct", out)
    if rc != 0 or not m:
        return {"ok": False, "error": (err or out).strip().splitlines()[-1:] if (err or out) else "no output",
                "seconds": round(sec, 1)}
    with open(os.path.join(SNLI_RUN, "metrics.json")) as f:
        cpu_correct = json.load(f).get("test_correct")
    correct, n = int(m.group(2)), int(m.group(3))
    return {"ok": True, "accuracy": float(m.group(1)), "correct": correct, "samples": n,
            "cpu_correct": cpu_correct if not args.quick else None,
            "difference": correct - cpu_correct if cpu_correct and not args.quick else None,
            "seconds": round(sec, 1)}


def bench(args, shape, extra, timeout):
    cmd = [sys.executable, "benchmark.py", *shape, "--batches", "1" if args.quick else "3",
           "--device", str(args.device) if args.device is not None else "cpu", *extra]
    rc, out, err, sec = run(cmd, timeout, {"SEQLEARN_EP_COMPILE_BACKEND": "eager"} if args.quick else None)
    if rc != 0:
        return {"error": (err.strip().splitlines() or ["exit %d" % rc])[-1][:300]}
    r = last_json(out)
    keep = ["samples_per_s", "peak_mem_mb", "base_mem_mb", "free_s", "nudged_s", "gflops",
            "speedup_vs_reference", "bf16_grad_rel_err"]
    res = {k: r[k] for k in keep if k in r}
    if "reference" in r:
        res["reference_samples_per_s"] = r["reference"]["samples_per_s"]
    return res


def section_speed(args):
    shapes = QUICK if args.quick else PAPER
    t = 120 if args.quick else 240
    out = {}
    for ds in ("SNLI", "IMDB"):
        out[ds] = {
            "float32_vs_reference": bench(args, shapes[ds], ["--compare"], t),
            "tf32_free_phase": bench(args, shapes[ds], ["--tf32", "free"], t),
            "tf32_everywhere": bench(args, shapes[ds], ["--tf32", "all"], t),
            "bf16": bench(args, shapes[ds], ["--bf16"], t),
            "compile": bench(args, shapes[ds], ["--compile"], t),
        }
    ks = ["2", "3"] if args.quick else ["10", "25", "50"]
    out["IMDB"]["memory_vs_K"] = {
        k: {"EP": bench(args, shapes["IMDB"], ["--K", k], t).get("peak_mem_mb"),
            "BPTT": bench(args, shapes["IMDB"], ["--alg", "BPTT", "--K", k, "--T", str(max(int(k), 6 if args.quick else 50))], t).get("peak_mem_mb")}
        for k in ks}
    return out


def section_train(args):
    if not has_snli(args.data_dir):
        return {"skipped": f"no SNLI files in {args.data_dir}"}
    run_dir = os.path.join(ROOT, "results", "gpu_check", "snli_epoch")
    cmd = [sys.executable, "main.py", "--dataset", "SNLI", "--data-dir", args.data_dir, "--cache-dir", args.cache_dir,
           "--embeddings", os.path.join(SNLI_RUN, "embeddings.npz"), "--fc_layers", "400", "3", "--seqLen", "25",
           "--lrs", "0.0005", "0.0005", "0.0005", "0.0005", "0.0002", "0.0002", "--T", "60", "--K", "30",
           "--betas", "0", "0.5", "--thirdphase", "--batch_size", "200", "--epochs", "1", "--test-every", "0",
           "--save", "--overwrite", "--results-dir", run_dir, *device_arg(args)]
    if args.quick:
        cmd += ["--max-train", "200", "--max-test", "100", "--T", "8", "--K", "4"]
    rc, out, err, sec = run(cmd, timeout=600)
    m = re.search(r"epoch 1/1: train acc ([\d.]+)\s+val acc ([\d.]+).*?([\d.]+)s\s+([\d.]+) samples/s", out)
    if rc != 0 or not m:
        return {"ok": False, "error": (err or out).strip().splitlines()[-1:], "seconds": round(sec, 1)}
    t = re.search(r"test accuracy ([\d.]+)", out.split("best model")[-1])
    return {"ok": True, "train_acc": float(m.group(1)), "val_acc": float(m.group(2)),
            "epoch_seconds": float(m.group(3)), "samples_per_s": float(m.group(4)),
            "test_acc": float(t.group(1)) if t else None, "wall_seconds": round(sec, 1)}


def projection(report):
    """Hours for the paper's 50 epochs from the measured training rates (no evaluation time)."""
    out = {}
    speed = report.get("speed", {}).get("result", {})
    for ds, n in (("IMDB", [("IMDB", 25000)]), ("SNLI", [("SNLI_sample", 25302), ("SNLI_full", 550152)])):
        rate = speed.get(ds, {}).get("float32_vs_reference", {}).get("samples_per_s")
        for key, samples in n:
            out[key] = round(50 * samples / rate / 3600, 2) if rate else None
    return {"hours_50_epochs_float32": out}


def main(argv=None):
    p = argparse.ArgumentParser(description="The CUDA check of this project in one command (see docstring).")
    p.add_argument("--device", type=int, help="CUDA device index (default 0 when CUDA is present)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and subsets, runs on the CPU (CI)")
    p.add_argument("--data-dir", default="data", help="folder with the SNLI files")
    p.add_argument("--cache-dir", default=os.path.join(ROOT, ".cache", "gpu_check"), help="data cache")
    p.add_argument("--out", default=os.path.join("results", "gpu_check", "report.json"), help="JSON report")
    p.add_argument("--budget-s", type=float, default=450, help="skip sections once this much time is spent")
    p.add_argument("--sections", nargs="+", default=["math", "precision", "test", "speed", "train"],
                   choices=["math", "precision", "test", "speed", "train"])
    args = p.parse_args(argv)
    import torch
    cuda = torch.cuda.is_available()
    if cuda and args.device is None:
        args.device = 0
    args.torch_device = f"cuda:{args.device}" if cuda else "cpu"
    if not cuda and not args.quick:
        print("notice: no CUDA device: running the full-size check on the CPU (use --quick for the CI mode)",
              file=sys.stderr)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick,
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "device": torch.cuda.get_device_name(args.device) if cuda else platform.processor() or "cpu",
              "cpu": cpu_name(), "command": " ".join(["python", "tools/gpu_check.py", *(argv or sys.argv[1:])])}
    start = time.perf_counter()
    funcs = {"math": section_math, "precision": section_precision, "test": section_test,
             "speed": section_speed, "train": section_train}
    for name in args.sections:
        spent = time.perf_counter() - start
        if spent > args.budget_s:
            report[name] = {"skipped": f"budget of {args.budget_s:.0f} s spent ({spent:.0f} s)"}
            continue
        t = time.perf_counter()
        try:
            report[name] = {"result": funcs[name](args)}
        except Exception as e:  # one failing section must not lose the others
            report[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        report[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"{name}: {json.dumps(report[name])[:400]}", flush=True)
    report["projection"] = projection(report)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"report: {args.out} ({report['total_seconds']} s)")
    failed = [n for n in args.sections if "error" in report[n]
              or report[n].get("result", {}).get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
