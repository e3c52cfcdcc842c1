"""Run folders and checkpoints: where a run is written, what a checkpoint holds and how it is
read back safely (weights_only=True, one clear error per failure), the RNG state that makes a
resumed run continue exactly, the curves, and stopping on Ctrl-C or SIGTERM without a
half-written epoch.

A run folder (`--save`) holds command.txt, config.json, embeddings.npz, checkpoint.pt (the last
epoch: weights, optimizer, scheduler, RNG, history, the --warm-start table), best_model.pt and
final_model.pt (weights, config, history), metrics.json and accuracy.png. Every file is
written atomically (`data_io.write_atomic`).
"""
import contextlib
import datetime
import json
import math
import os
import pickle
import random
import shlex
import signal
import tempfile
import zipfile

import numpy as np
import torch

import data_io
import loops
import model_utils as mu
from data_io import save_json, save_torch, write_atomic

CHECKPOINT_FORMAT = "seqlearn-ep/1"


class UsageError(Exception):
    """A user mistake: one line on stderr, exit code 2."""


def find_checkpoint(load_path, prefer):
    """A .pt file, or the first of `prefer` inside a run folder."""
    if not os.path.exists(load_path):
        raise UsageError(f"--load-path {load_path}: no such file or folder")
    if os.path.isfile(load_path):
        return load_path
    for name in prefer:
        path = os.path.join(load_path, name)
        if os.path.isfile(path):
            return path
    raise UsageError(f"--load-path {load_path}: no checkpoint in it (looked for {', '.join(prefer)})")


def load_checkpoint(path):
    """torch.load with weights_only=True; every failure is one clear UsageError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"refusing to load {path}: it holds Python objects that safe loading "
                         f"(weights_only=True) does not allow, so it could run code ({first[:120]})")
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UsageError(f"cannot read checkpoint {path}: the file is corrupted or truncated "
                         f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint of this tool (format {CHECKPOINT_FORMAT})")
    return ckpt


def restore_model(ckpt, path):
    model = mu.build_model(ckpt["config"]["model"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UsageError(f"{path}: weights do not fit the stored architecture ({str(e).splitlines()[0][:160]})")
    return model


def model_only(state):
    keep = ["format", "model", "config", "epoch", "history", "best_val"]
    return {k: state[k] for k in keep if k in state}


def save_epoch(run_dir, model, optimizer, scheduler, config, history, epoch, best_val, improved,
               warm=None):
    """After every epoch: checkpoint (with the --warm-start table), best model, metrics and
    curves, each written atomically."""
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config,
             "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler else None,
             "epoch": epoch + 1, "history": history, "best_val": best_val, "rng": rng_state(),
             "warm_starts": None if warm is None else warm.state()}
    if improved:
        save_torch(model_only(state), os.path.join(run_dir, "best_model.pt"))
    save_torch(state, os.path.join(run_dir, "checkpoint.pt"))
    save_json(history, os.path.join(run_dir, "metrics.json"))
    plot_accuracy(history, os.path.join(run_dir, "accuracy.png"),
                  f"{config['model']['dataset']} {config['hyper']['alg']}: accuracy per epoch "
                  f"({os.path.basename(os.path.normpath(run_dir))})")


def default_run_dir(args, kind=None):
    """results/<dataset>/<date>/<time>_<cpu|cudaN>[_<kind>]"""
    now = datetime.datetime.now()
    dev = f"cuda{args.device_obj.index or 0}" if args.device_obj.type == "cuda" else "cpu"
    return os.path.join("results", args.dataset, now.strftime("%Y-%m-%d"),
                        now.strftime("%H-%M-%S") + f"_{dev}" + (f"_{kind}" if kind else ""))


def prepare_run_dir(path, resuming, overwrite):
    """Create the run folder; refuse to overwrite an earlier run silently."""
    if os.path.exists(os.path.join(path, "checkpoint.pt")) and not (resuming or overwrite):
        raise UsageError(f"{path} already holds a run: resume it with --load-path {path}, "
                         f"choose another --results-dir, or pass --overwrite")
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, delete=True)
        probe.close()
    except OSError as e:
        raise UsageError(f"cannot write to the run folder {path}: {e.strerror}")
    return path


def abandon_run_dir(run_dir, created):
    """Remove what a fresh run wrote before its first complete epoch (and the folder, if the
    run created it and nothing else is in it)."""
    for name in ("embeddings.npz", "command.txt", "config.json"):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(run_dir, name))
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)


def run_embeddings(load_path):
    folder = load_path if os.path.isdir(load_path) else os.path.dirname(load_path)
    path = os.path.join(folder, "embeddings.npz")
    return path if os.path.isfile(path) else None


def make_config(args, model, data, hyper):
    """config.json: the architecture, the run's hyperparameters `hyper`, the data record
    (portable paths), the command and the versions."""
    info = data_io.portable_info(data.info, args.data_dir)  # no machine-local absolute paths
    config = {"model": model.config(), "hyper": hyper, "data": info,
              "command": command_line(args.argv), "torch": str(torch.__version__),
              "created": datetime.datetime.now().isoformat(timespec="seconds")}
    return json.loads(json.dumps(config, default=str))  # plain types only: safe to load


def command_line(argv):
    """The command as typed: `python main.py` and the arguments main() was given."""
    return " ".join(shlex.quote(a) for a in ["python", "main.py", *argv])


def new_history():
    return {"train_acc": [], "val_acc": [], "test_acc": [], "epoch_time_s": [], "samples_per_s": [],
            "free_steps": [], "nudged_steps": [], "lr": [], "gdu": []}


def plot_accuracy(history, path, title="accuracy per epoch"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [("train_acc", "train"), ("val_acc", "validation"), ("test_acc", "test")]:
        pts = [(i + 1, v) for i, v in enumerate(history[key]) if v is not None and not math.isnan(v)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def rng_state():
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached": float(np_state[4])}}
    return state  # no CUDA RNG: nothing draws from it, and it would tie a run to its GPU count


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    v, key, gauss = state["python"]
    random.setstate((v, tuple(key), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    # state["cuda"] (runs saved by earlier versions) is ignored: nothing draws from the CUDA RNG,
    # and restoring it fails on a machine with fewer or no GPUs.


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deferred_sigint():
    """Hold SIGINT and SIGTERM until the block ends, then raise KeyboardInterrupt: no half-done
    epoch files."""
    pending = []
    signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        raise KeyboardInterrupt


def interrupt(signum, frame):
    """A SIGTERM handler: stop like Ctrl-C (a resumable run or nothing)."""
    raise KeyboardInterrupt


def test_accuracy(args, ckpt, path, data, stats=None):
    """Accuracy of a checkpoint's weights on data.test with the evaluation flags (--T,
    --batch_size, --tol, --bf16, --dtype), sharded across ranks under torchrun."""
    model = restore_model(ckpt, path).to(args.device_obj, getattr(torch, args.dtype))
    if args.compile:
        model.compile_step()
    model.merge_keys = bool(getattr(args, "merge_keys", False))
    return loops.evaluate(model, data.test, data.embeddings.to(args.device_obj), args.T, args.batch_size,
                       args.tol, "test", torch.bfloat16 if args.bf16 else None, args.dist, stats,
                       anderson=args.anderson, sample_exit=args.sample_exit)
