"""`--execute export`: pack a run folder for sharing (e.g. into saved_models/).

The run's best weights are stored in --weights-dtype with its word vectors, curves, command and
config, and the test accuracy of exactly the stored weights is measured now with the evaluation
flags given (--T, --batch_size, --tol, ...), which become the stored defaults, so that
`--execute test` on the export reproduces it.
"""
import json
import os

import torch

import data_utils
from data_io import save_json, save_torch, write_atomic
from flags import load_for_eval
from runs import CHECKPOINT_FORMAT, UsageError, command_line, run_embeddings, test_accuracy


def export(args, log):
    out = _check_folders(args)
    ckpt, path = load_for_eval(args, log)
    args.embeddings = run_embeddings(args.load_path)
    if args.embeddings is None:
        raise UsageError(f"{args.load_path} has no embeddings.npz: the export needs the run's word vectors")
    data = data_utils.load_for_run(args, log)
    state = _stored_weights(ckpt["model"], args.weights_dtype)
    acc = test_accuracy(args, {**ckpt, "model": state}, path, data)
    metrics = _run_metrics(args.load_path, ckpt)
    info = _export_info(args, ckpt, path, metrics)
    config = json.loads(json.dumps(ckpt["config"]))
    config["hyper"].update(info["eval"])  # `--execute test` without flags evaluates as measured here
    config["export"] = info
    correct = round(acc * len(data.test))
    metrics.update({"test_accuracy": acc, "test_correct": correct, "test_samples": len(data.test),
                    "export": info})
    os.makedirs(out, exist_ok=True)
    save_torch({"format": CHECKPOINT_FORMAT, "model": state, "config": config, "epoch": ckpt.get("epoch"),
                "history": ckpt.get("history", {}), "best_val": ckpt.get("best_val")},
               os.path.join(out, "best_model.pt"))
    _copy_run_files(args, out)
    save_json(config, os.path.join(out, "config.json"))
    save_json(metrics, os.path.join(out, "metrics.json"))
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)) / 2**20
    log(f"exported {path} ({args.weights_dtype} weights) to {out} ({size:.1f} MB): test accuracy "
        f"{acc:.4f} ({correct}/{len(data.test)} correct, T={args.T}); before export "
        f"{info['test_accuracy_before_export']}")
    return 0


def _check_folders(args):
    """The output folder, after the checks that need no data: a run folder in, an empty new one out."""
    if args.load_path is None or not os.path.isdir(args.load_path):
        raise UsageError("--execute export needs --load-path RUN_FOLDER (a folder written by --save)")
    if not args.results_dir:
        raise UsageError("--execute export needs --results-dir OUT_FOLDER")
    out = args.results_dir
    if os.path.abspath(out) == os.path.abspath(args.load_path):
        raise UsageError("--results-dir must differ from --load-path")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise UsageError(f"{out} is not empty: choose another --results-dir or pass --overwrite")
    return out


def _stored_weights(model_state, weights_dtype):
    """The state dict in the export's dtype; a usage error when a weight overflows it."""
    wdtype = getattr(torch, weights_dtype)
    state = {k: v.to(wdtype) if v.is_floating_point() else v for k, v in model_state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UsageError(f"weights {', '.join(bad)} overflow {weights_dtype}; export with "
                         f"--weights-dtype bfloat16 or float32")
    return state


def _run_metrics(run_dir, ckpt):
    """The run's metrics.json (its curves), or the checkpoint's history when there is none."""
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return dict(ckpt.get("history", {}))


def _export_info(args, ckpt, path, metrics):
    rel = os.path.relpath(path)
    return {"from": rel if not rel.startswith("..") else os.path.basename(path),
            "weights_dtype": args.weights_dtype, "epoch": ckpt.get("epoch"),
            "eval": {"T": args.T, "batch_size": args.batch_size, "tol": args.tol, "bf16": args.bf16,
                     "anderson": args.anderson, "sample_exit": args.sample_exit},
            "trained_with": {k: ckpt["config"]["hyper"].get(k) for k in ("T", "K", "batch_size", "tol", "bf16", "fast")},
            "test_accuracy_before_export": metrics.get("test_accuracy"),
            "command": command_line(args.argv)}


def _copy_run_files(args, out):
    """embeddings.npz, accuracy.png, and command.txt with the export command appended."""
    for name in ("embeddings.npz", "accuracy.png"):
        src = os.path.join(args.load_path, name)
        if os.path.isfile(src):
            with open(src, "rb") as f:
                blob = f.read()
            write_atomic(os.path.join(out, name), lambda g, blob=blob: g.write(blob))
    try:
        with open(os.path.join(args.load_path, "command.txt")) as f:
            commands = f.read()
    except OSError:
        commands = ""
    write_atomic(os.path.join(out, "command.txt"),
                 lambda g: g.write((commands + "# export\n" + command_line(args.argv) + "\n").encode()))
