"""Train, test, check (GDU) and use convergent RNNs with modern-Hopfield layers, by EP or BPTT.

    python main.py --dataset IMDB --execute train --alg EP --thirdphase --save ...
    python main.py --dataset SNLI --execute test --load-path saved_models/test_SNLI_25_300

Flags follow the original tool's README; see README.md for the full table.
"""
import math
import os
import signal
import sys

# OpenMP threads that spin at barriers halve throughput on a loaded machine: sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# tqdm reads its TQDM_* defaults when it is imported, so these must be set before that:
if not sys.stderr.isatty():  # logs to a file: progress bars update every 30 s, not every step
    os.environ.setdefault("TQDM_MININTERVAL", "30")
if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 shows progress
    os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data_utils
import devices
import dist_utils
import fixed_point
import gdu
import loops
import model_utils as mu
import ops
import registry
import runs
from data_io import save_json, save_torch
from data_utils import load_for_run as load_data
from export import export
from flags import build_parser, hyper_of, load_for_eval, resolve, solver_flags_given, unused_flags, validate
from runs import (CHECKPOINT_FORMAT, UsageError, abandon_run_dir, command_line, default_run_dir,
                  deferred_sigint, find_checkpoint, load_checkpoint, model_only, new_history,
                  prepare_run_dir, restore_model, run_embeddings, save_epoch, seed_everything,
                  set_rng_state, test_accuracy)

def warn_memory(args, embed_dim, log):
    """Estimate the first FC layer's size (weights + Adam + gradient) and warn when it won't fit."""
    n_proj = len(registry.get(args.dataset).projections)
    weights = n_proj * args.seqLen * embed_dim * args.fc_layers[0]
    nbytes = weights * (8 if args.dtype == "float64" else 4) * 4
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if args.device_obj.type == "cuda":
        total = torch.cuda.get_device_properties(args.device_obj).total_memory
    if nbytes > 0.8 * total:
        log(f"WARNING: the first FC layer ({weights / 1e6:.0f}M weights) needs about "
            f"{nbytes / 2**30:.1f} GiB with its gradient and Adam state, more than this "
            f"device's {total / 2**30:.1f} GiB: lower --seqLen or --fc_layers")



# ----------------------------------------------------------------------------- train


class RunFolder:
    """Where a training run writes (rank 0 with --save), and whether this run created it."""

    def __init__(self, path, created, fresh):
        self.path, self.created, self.fresh = path, created, fresh

    def file(self, name):
        return os.path.join(self.path, name)


def train(args, log):
    """--execute train: a new run, or the resumption of one (--load-path)."""
    ckpt = start_training(args, log)
    data = load_data(args, log)
    seed_everything(args.seed)
    model = training_model(args, ckpt, data, log)
    optimizer, scheduler, state = training_state(args, model, ckpt, log)
    if not ckpt:
        refuse_dead_start(args, model, data)
    config = runs.make_config(args, model, data, hyper_of(args))
    run = open_run_folder(args, data, config, log)
    hp = training_hyper(args, data, ckpt)
    log(describe_training(args, model, data))
    embeddings = data.embeddings.to(args.device_obj)
    if len(data.train) and state["start_epoch"] < args.epochs:
        log(time_estimate(args, model, data, embeddings, args.epochs - state["start_epoch"]))

    def evaluate(split, desc):
        return loops.evaluate(model, split, embeddings, args.T, args.batch_size, args.tol, desc,
                           hp["free_dtype"], args.dist, anderson=args.anderson, sample_exit=args.sample_exit)

    from tqdm import tqdm
    epoch = state["start_epoch"]
    try:
        for epoch in tqdm(range(state["start_epoch"], args.epochs), desc="epochs", initial=state["start_epoch"],
                          total=args.epochs, dynamic_ncols=True):
            stats = train_one_epoch(args, model, optimizer, scheduler, data, embeddings, hp, epoch, state,
                                    evaluate, log)
            improved = math.isnan(stats["val_acc"]) or stats["val_acc"] > state["best_val"]
            state["best_val"] = stats["val_acc"] if improved else state["best_val"]
            if run:
                with deferred_sigint():  # Ctrl-C waits until this epoch's files are complete
                    save_epoch(run.path, model, optimizer, scheduler, config, state["history"], epoch,
                               state["best_val"], improved, hp["warm"])
    except (KeyboardInterrupt, mu.DivergenceError, loops.DeadNetworkError) as e:
        return stop_training(e, run, epoch, log)
    return finish_training(args, model, data, run, config, state, evaluate, log)


def start_training(args, log):
    """The checkpoint to resume (or None); flags resolved against it and validated."""
    ckpt = load_checkpoint(find_checkpoint(args.load_path, ["checkpoint.pt", "final_model.pt"])) \
        if args.load_path is not None else None
    resolve(args, ckpt["config"] if ckpt else None)
    validate(args)
    if unused_flags(args):
        log(f"notice: {' and '.join(unused_flags(args))} only apply to --alg "
            f"{'EP' if args.alg == 'BPTT' else 'BPTT'}; this {args.alg} run ignores them")
    solver = solver_flags_given(args)
    if args.check_thm and solver:
        log("notice: --check-thm takes the plain synchronous T and K steps (the theorem is about "
            f"them), not the {solver} solver of training")
    if ckpt and args.embeddings == "auto" and run_embeddings(args.load_path):
        args.embeddings = run_embeddings(args.load_path)  # the exact vectors the run was trained with
    return ckpt


def training_model(args, ckpt, data, log):
    """The model to train, on its device and dtype (the same weights on every torchrun rank)."""
    if ckpt:
        model = restore_model(ckpt, args.load_path)
    else:
        model = mu.EPNet(args.dataset, args.seqLen, data.embed_dim, args.fc_layers, args.act, args.gamma,
                         args.init)
        args.gamma = model.gamma
    if model.D != data.embed_dim or model.n_classes != data.n_classes:
        raise UsageError(f"the model expects {model.D}-d vectors and {model.n_classes} classes; the data "
                         f"has {data.embed_dim}-d vectors and {data.n_classes} classes (check --embeddings)")
    warn_memory(args, data.embed_dim, log)
    model = model.to(args.device_obj, getattr(torch, args.dtype))
    if args.compile:
        model.compile_step()
    model.merge_keys = bool(args.merge_keys)
    if args.dist is not None:
        args.dist.broadcast_model(model)  # identical weights on every rank, whatever happened before
    return model


def training_state(args, model, ckpt, log):
    """Optimizer, scheduler and {history, start_epoch, best_val}, restored when resuming."""
    optimizer = loops.make_optimizer(model, args.lrs, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.lr_decay_epochs, eta_min=1e-5) \
        if args.lr_decay else None
    state = {"history": new_history(), "start_epoch": 0, "best_val": -1.0}
    if ckpt:
        saved_wd = ckpt["config"]["hyper"].get("weight_decay") or 0.0
        if bool(saved_wd) != bool(args.weight_decay):
            raise UsageError(f"--weight-decay {args.weight_decay:g}: this run was trained with weight decay "
                             f"{saved_wd:g}; resume it with a nonzero value if and only if it had one")
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        for k, group in enumerate(optimizer.param_groups):  # explicit --lrs / --weight-decay win on resume
            if args.lrs_given and list(args.lrs) != ckpt["config"]["hyper"]["lrs"]:
                group["lr"] = group["initial_lr"] = args.lrs[group.get("layer", k)]
            if group.get("weight_decay"):
                group["weight_decay"] = args.weight_decay
        if scheduler is not None and scheduler.T_max != args.lr_decay_epochs:
            move_to_cosine(optimizer, scheduler, args.lr_decay_epochs, log)
        state["history"].update(ckpt["history"])
        state["start_epoch"], state["best_val"] = ckpt["epoch"], ckpt["best_val"]
        set_rng_state(ckpt["rng"])
        log(f"resuming from {args.load_path} after epoch {state['start_epoch']}")
    return optimizer, scheduler, state


def move_to_cosine(optimizer, scheduler, t_max, log):
    """A resumed run given a new --lr-decay-epochs: every rate jumps onto the new cosine at the
    current epoch (the scheduler's own closed form), from where its recursion follows that curve."""
    e, old = scheduler.last_epoch, scheduler.T_max
    if t_max <= e:
        raise UsageError(f"--lr-decay-epochs {t_max}: this run has trained {e} epochs already; the new "
                         f"cosine must end later")
    scheduler.T_max = t_max
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]  # after any new --lrs
    scheduler._last_lr = scheduler._get_closed_form_lr()
    for group, lr in zip(optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr
    log(f"--lr-decay-epochs {t_max}: the cosine of this run (T_max {old}) is replaced; epoch {e + 1} "
        f"trains at {scheduler._last_lr[0] / scheduler.base_lrs[0]:.3f} of the initial rates")


def refuse_dead_start(args, model, data):
    """A network born dead never learns: say so before training it."""
    if not len(data.train):
        return
    first = data.train.ids[:args.batch_size].to(args.device_obj)
    x = loops.embed(data.embeddings.to(args.device_obj), first, next(model.parameters()).dtype)
    dead = loops.initial_dead_layers(model, x, args.T)
    if dead:
        raise loops.DeadNetworkError(loops.dead_layer_message(
            model, dead, f"of the first batch at initialisation (--init {args.init})",
            "Change --seed, use --init centred, or a smooth --act (my_sigmoid)"))


def open_run_folder(args, data, config, log):
    """--save: the run folder, prepared, with its vectors, command and config (rank 0 only)."""
    if not args.save or (args.dist is not None and not args.dist.main):
        return None
    resume_dir = args.load_path if args.load_path and os.path.isdir(args.load_path) else None
    path = args.results_dir or resume_dir or default_run_dir(args)
    same = resume_dir is not None and os.path.abspath(path) == os.path.abspath(resume_dir)
    run = RunFolder(path, not os.path.exists(path), not os.path.exists(os.path.join(path, "checkpoint.pt")))
    prepare_run_dir(path, same, args.overwrite)
    if not os.path.exists(run.file("embeddings.npz")):
        data_utils.export_embeddings(data, run.file("embeddings.npz"))
    with open(run.file("command.txt"), "a") as f:
        f.write(command_line(args.argv) + "\n")
    save_json(config, run.file("config.json"))
    log(f"run folder: {path}")
    return run


def training_hyper(args, data, ckpt):
    """What train_epoch needs (loops.train_epoch), with the warm-start table if any."""
    warm = fixed_point.WarmStarts(len(data.train), args.fc_layers, args.device_obj) \
        if args.warm_start and args.alg == "EP" else None
    if warm is not None and ckpt and ckpt.get("warm_starts") is not None:
        warm.load(ckpt["warm_starts"])
    return {"alg": args.alg, "T": args.T, "K": args.K, "betas": tuple(args.betas),
            "estimator": args.estimator, "batch_size": args.batch_size, "tol": args.tol,
            "anderson": args.anderson, "tol_nudged": args.tol_nudged, "warm": warm, "sample_exit": args.sample_exit,
            "bf16_matmul": args.bf16_matmul,
            "free_dtype": torch.bfloat16 if args.bf16 else None, "bptt_checkpoint": args.bptt_checkpoint,
            "free_tf32": args.tf32 and args.device_obj.type == "cuda", "word_dropout": args.word_dropout}


def describe_training(args, model, data):
    dist = args.dist
    return (f"{args.dataset}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, "
            f"D={data.embed_dim}, {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{args.alg}{f' {args.estimator}' + (' (3-phase)' if args.thirdphase else '') if args.alg == 'EP' else ''}, "
            f"T={args.T} K={args.K} betas={args.betas}, device {args.device_obj}"
            + (f", {dist.world} processes ({dist.backend}), {args.batch_size / dist.world:g} samples "
               f"per process per batch" if dist else ""))


def train_one_epoch(args, model, optimizer, scheduler, data, embeddings, hp, epoch, state, evaluate, log):
    """One epoch, its evaluation, its history entries and its log line; returns the stats."""
    gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    stats = loops.train_epoch(model, optimizer, data.train, embeddings, hp, gen, desc=f"epoch {epoch + 1}",
                           dist=args.dist)
    if hp["warm"] is not None:
        hp["warm"].sync(args.dist)
    lr = [g["lr"] for g in optimizer.param_groups]
    if scheduler is not None:
        scheduler.step()
    stats["val_acc"] = val_acc = evaluate(data.val, "val")
    due = (args.test_every and (epoch + 1) % args.test_every == 0) or epoch + 1 == args.epochs
    test_acc = evaluate(data.test, "test") if due else None
    history = state["history"]
    for key, v in [("train_acc", stats["train_acc"]), ("val_acc", val_acc), ("test_acc", test_acc),
                   ("epoch_time_s", stats["seconds"]), ("samples_per_s", stats["samples"] / stats["seconds"]),
                   ("free_steps", stats["free_steps"]), ("nudged_steps", stats["nudged_steps"]), ("lr", lr)]:
        history[key].append(v)
    if args.check_thm:
        history["gdu"].append(check_theorem(model, data.train, embeddings, args, epoch + 1, log))
    log(f"epoch {epoch + 1}/{args.epochs}: train acc {stats['train_acc']:.4f}  val acc {val_acc:.4f}  "
        f"test acc {'-' if test_acc is None else f'{test_acc:.4f}'}  {stats['seconds']:.1f}s  "
        f"{stats['samples'] / stats['seconds']:.1f} samples/s"
        + (f"  steps {stats['free_steps']:.1f}+{stats['nudged_steps']:.1f}" if args.tol or args.tol_nudged else ""))
    if stats["dead"]:
        msg = loops.dead_layer_message(model, stats["dead"], f"of epoch {epoch + 1}")
        if len(model.fc) - 1 in stats["dead"]:  # no output, no learning: stop
            raise loops.DeadNetworkError(msg)
        log(f"WARNING: {msg}")
    return stats


def stop_training(e, run, epoch, log):
    """Ctrl-C/SIGTERM (exit 130), divergence or a dead network (exit 3): keep the last complete
    epoch, or leave nothing if none completed."""
    kept = run is not None and os.path.exists(run.file("checkpoint.pt"))
    if run is not None and not kept and run.fresh:  # no epoch completed: leave nothing half-made
        abandon_run_dir(run.path, run.created)
    where = (f"; the last complete epoch is kept in {run.path}/checkpoint.pt (resume with "
             f"--load-path {run.path})" if kept else
             f"; no epoch had completed, so {run.path} was removed" if run is not None else "")
    if isinstance(e, KeyboardInterrupt):
        log(f"interrupted during epoch {epoch + 1}{where}")
        return 130
    what = "training diverged" if isinstance(e, mu.DivergenceError) else "the network died"
    log(f"error: {what} in epoch {epoch + 1}: {e}{where}"
        + (". Lower --lrs or --betas." if isinstance(e, mu.DivergenceError) else ""))
    return 3


def finish_training(args, model, data, run, config, state, evaluate, log):
    """final_model.pt, and the test accuracy of the best-validation weights in metrics.json."""
    history, best_val, dist = state["history"], state["best_val"], args.dist
    if not (args.save and args.epochs > 0):
        if history["test_acc"]:
            log(f"final test accuracy {history['test_acc'][-1]:.4f}")
        return 0
    best = None
    if run:
        final = model_only({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config,
                            "epoch": args.epochs, "history": history, "best_val": best_val})
        save_torch(final, run.file("final_model.pt"))
        best = load_checkpoint(run.file("best_model.pt"))
    best_epoch = best["epoch"] if best else None
    if dist is not None:
        best_epoch = dist.broadcast_object(best_epoch)
    if best_epoch == args.epochs and history["test_acc"][-1] is not None:
        test_acc = history["test_acc"][-1]  # the last epoch is the best: already evaluated
    else:
        if best:
            model.load_state_dict(best["model"])
        if dist is not None:
            dist.broadcast_model(model)  # rank 0 read the best weights
        test_acc = evaluate(data.test, "test")
    if run:
        metrics = dict(history)
        metrics.update({"test_accuracy": test_acc, "best_epoch": best_epoch, "best_val_acc": best_val})
        save_json(metrics, run.file("metrics.json"))
    log(f"best model (epoch {best_epoch}, val acc {best_val:.4f}): test accuracy {test_acc:.4f}")
    return 0


def _duration(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def time_estimate(args, model, data, embeddings, epochs):
    """One line, before the first batch: the time per epoch and for the run, from one timed
    step of the dynamics on a real batch; and a plain word when the job is GPU-scale."""
    B = min(args.batch_size, len(data.train))
    x = loops.embed(embeddings, data.train.ids[:B].to(embeddings.device), next(model.parameters()).dtype)
    step = loops.seconds_per_step(model, x)
    world = args.dist.world if args.dist else 1
    # EP: T free + K (or 2K) nudged steps; BPTT: T forward steps + about 2 steps' work per backpropagated one
    train_steps = args.T + (args.K * (2 if args.thirdphase else 1) if args.alg == "EP" else 2 * args.K)
    batches = math.ceil(len(data.train) / args.batch_size)
    evals = math.ceil((len(data.val) + len(data.test) / max(args.test_every or args.epochs, 1)) / args.batch_size)
    epoch = step * (B / args.batch_size) * (batches * train_steps + evals * args.T) / world
    line = (f"estimate: one step of the dynamics takes {step * 1e3:.0f} ms on a batch of {B}, so one epoch "
            f"({batches} batches x {train_steps} steps, then evaluation) about {_duration(epoch)}, "
            f"{epochs} epoch(s) about {_duration(epoch * epochs)} on {args.device_obj}")
    if args.tol or args.tol_nudged:
        line += " at most (--tol/--tol-nudged/--fast stop phases early; the epoch log gives the steps used)"
    if args.device_obj.type == "cpu" and epoch > 3600:
        line += (". This is a GPU-scale job: run it on a CUDA machine (--device N), or shrink it for the "
                 "CPU (--seqLen, --fc_layers, --max-train; see the quick start)")
    return line


def check_theorem(model, split, embeddings, args, epoch, log):
    """--check-thm: GDU metrics on a few training samples, logged and kept in the history."""
    n = min(args.gdu_samples, len(split))
    x = loops.embed(embeddings, split.ids[:n].to(embeddings.device), next(model.parameters()).dtype)
    metrics = gdu.gdu_metrics(gdu.gdu_check(model, x, split.labels[:n].to(embeddings.device),
                                            args.T, args.K, args.betas[1], args.estimator,
                                            getattr(torch, args.gdu_dtype), gdu.max_entries_of(args)))
    key = "rel_rmse_" + gdu.CURVES[args.estimator][1]
    worst = max(metrics["layers"].items(), key=lambda kv: kv[1][key])
    log(f"GDU check after epoch {epoch}: worst {key} {worst[1][key]:.3g} ({worst[0]})")
    metrics["epoch"] = epoch
    return metrics


# ----------------------------------------------------------------------------- test / gducheck / predict
def test(args, log):
    if args.load_path is None:
        raise UsageError("--execute test needs --load-path (a run folder or checkpoint file)")
    ckpt, path = load_for_eval(args, log)
    data = load_data(args, log)
    stats = {}
    acc = test_accuracy(args, ckpt, path, data, stats)
    used = (f", {stats['free_steps']:.1f} steps used on average (--tol {args.tol:g}"
            f"{f', --anderson {args.anderson}' if args.anderson else ''})" if args.tol else "")
    log(f"test accuracy {acc:.4f} ({round(acc * len(data.test))}/{len(data.test)} correct, "
        f"T={args.T}{used}, {path})")
    return 0


def gducheck(args, log):
    if args.load_path:
        ckpt, path = load_for_eval(args, log)
    else:
        ckpt = None
        resolve(args)
        validate(args)
    data = load_data(args, log)
    seed_everything(args.seed)
    if ckpt:
        model = restore_model(ckpt, path)
    else:
        model = mu.EPNet(args.dataset, args.seqLen, data.embed_dim, args.fc_layers, args.act, args.gamma,
                         args.init)
    model = model.to(args.device_obj)
    solver = solver_flags_given(args, extra=("tol",))
    log("GDU check: plain synchronous steps, T free then K nudged (the steps the theorem is about)"
        + (f"; the run's {solver} solver is not used here" if solver else ""))
    out_dir = args.results_dir or default_run_dir(args, "gducheck")  # never into --load-path
    os.makedirs(out_dir, exist_ok=True)
    n = min(args.gdu_samples, len(data.test))
    idx = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(args.seed))[:n]
    x = loops.embed(data.embeddings.to(args.device_obj), data.test.ids[idx].to(args.device_obj), torch.float32)
    gdu.run_gducheck(model, x, data.test.labels[idx].to(args.device_obj), args, out_dir, log=log)
    log(f"GDU results in {out_dir}")
    return 0


def predict(args, log):
    if args.load_path is None:
        raise UsageError("--execute predict needs --load-path (a run folder with embeddings.npz)")
    ckpt, path = load_for_eval(args, log)
    emb_path = run_embeddings(args.load_path)
    if emb_path is None:
        raise UsageError(f"{args.load_path} has no embeddings.npz: predict needs the run's word vectors")
    with np.load(emb_path, allow_pickle=False) as f:  # words + float16 vectors, row 0 = padding
        vocab = ["<pad>"] + [str(w) for w in f["words"]]
        vectors = torch.cat([torch.zeros(1, f["vectors"].shape[1]), torch.from_numpy(f["vectors"]).float()])
    texts = read_predict_inputs(args)  # one string per text, or one tuple of fields
    fields = [list(texts)] if isinstance(texts[0], str) else [list(t) for t in zip(*texts)]
    rule = args.tokenize or "paper"
    ids = [data_utils.encode_texts(f, vocab, args.dataset, args.seqLen, rule) for f in fields]
    ids = ids[0] if len(ids) == 1 else torch.stack(ids, 1)
    model = restore_model(ckpt, path).to(args.device_obj, getattr(torch, args.dtype))
    model.merge_keys = bool(args.merge_keys)
    out = loops.predict_outputs(model, ids, vectors.to(args.device_obj), args.T, args.batch_size, args.tol,
                             free_dtype=torch.bfloat16 if args.bf16 else None, anderson=args.anderson)
    known = [data_utils.known_words(f, vocab, args.dataset, rule) for f in fields]  # per field, per text
    print_predictions(texts, out, known, args.dataset, log)
    return 0


def print_predictions(texts, out, known, dataset, log, width=300):
    """A tab-separated table with a header: label, one score per class (the output neurons
    after the free phase: trained towards one-hot targets, not probabilities), the known words
    of each text, and the text (cut at `width` characters with a visible mark)."""
    classes = registry.get(dataset).classes
    print("\t".join(["label", *[f"score:{c}" for c in classes], "known_words", "text"]))
    for n, (text, o) in enumerate(zip(texts, out)):
        shown = text if isinstance(text, str) else " ||| ".join(text)
        if len(shown) > width:
            shown = shown[:width] + f" …[{len(shown) - width} more characters]"
        counts = [k[n] for k in known]
        print("\t".join([classes[int(o.argmax())], *[f"{v:.3f}" for v in o.tolist()],
                         " | ".join(f"{a}/{b}" for a, b in counts), shown]))
        fewest = min(a for a, _ in counts)
        if fewest < 3:
            log(f"WARNING: text {n + 1} has {'no' if fewest == 0 else f'only {fewest}'} word(s) the model knows"
                f"{' in one sentence' if len(counts) > 1 else ''}: its label mostly reflects the network's bias")
    log("scores: the output neurons after the free phase (trained towards one-hot targets; "
        "not probabilities, they need not sum to 1)")


def read_predict_inputs(args):
    if args.input_file:
        try:
            with open(args.input_file, encoding="utf-8") as f:
                lines = [l.rstrip("\n") for l in f if l.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --input-file {args.input_file}: {e}")
        n = registry.get(args.dataset).n_fields
        if n > 1:
            if any(len(l.split("\t")) != n for l in lines):
                raise UsageError(f"--input-file for {args.dataset} needs "
                                 f"{'<TAB>'.join(registry.get(args.dataset).fields)} on every line")
            return [tuple(l.split("\t")) for l in lines]
        return lines
    if registry.get(args.dataset).n_fields == 2:
        if not (args.premise and args.hypothesis):
            raise UsageError(f"{args.dataset} predict needs --premise and --hypothesis (or --input-file)")
        return [(args.premise, args.hypothesis)]
    if not args.text:
        raise UsageError("predict needs --text \"...\" or --input-file FILE")
    return args.text


# ----------------------------------------------------------------------------- entry
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv

    args.dist, who = None, ""

    def log(msg):
        if args.dist is None or args.dist.main:  # under torchrun only rank 0 logs
            from tqdm import tqdm
            tqdm.write(str(msg))

    try:
        if dist_utils.launched() and args.execute in ("gducheck", "predict", "export"):
            if int(os.environ["RANK"]) > 0:
                return 0
            log(f"notice: --execute {args.execute} runs in one process (rank 0) under torchrun")
            args.device_obj = devices.pick_device(int(os.environ.get("LOCAL_RANK", "0")), log)
        elif dist_utils.launched():
            if args.dist_timeout <= 0:
                raise UsageError(f"--dist-timeout must be positive (got {args.dist_timeout})")
            args.dist = dist_utils.Dist(args.dist_timeout)
            args.device_obj, who = args.dist.device, f"[rank {args.dist.rank}] "
        else:
            args.device_obj = devices.pick_device(args.device, log)
        if args.device_obj.type == "cuda":  # full float32 everywhere; TF32 only in free phases (hp)
            devices.set_cuda_tf32(False)
        if args.bf16 or (args.bf16_matmul and args.execute == "train"):
            notice = ops.bf16_notice(args.device_obj)  # ValueError: one line, exit 2
            if notice:
                log(notice)
        run = {"train": train, "test": test, "gducheck": gducheck, "predict": predict,
               "export": export}[args.execute]
        return run(args, log)
    except (UsageError, data_utils.DataError, ValueError) as e:
        print(f"{who}error: {e}", file=sys.stderr)
        return 2
    except (mu.DivergenceError, loops.DeadNetworkError) as e:
        print(f"{who}error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{who}interrupted", file=sys.stderr)
        return 130
    finally:
        if args.dist is not None:
            args.dist.close()


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL) if hasattr(signal, "SIGPIPE") else None
    signal.signal(signal.SIGTERM, runs.interrupt)  # `kill` stops like Ctrl-C: a resumable run or nothing
    code = main()
    if dist_utils.launched():
        # A torchrun worker has written and closed everything (atomic checkpoints, process group
        # destroyed); leave without the interpreter's teardown, where C++ threads of the
        # distributed backend have at times aborted a finished worker ("terminate called without
        # an active exception", under load), which torchrun then reports as a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)
