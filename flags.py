"""The command line: the flags, how each is resolved (explicit > the loaded run's > the dataset's
paper defaults), and one validator per flag value, shared by main.py and benchmark.py.

`build_parser` holds the original tool's flags and this tool's. `resolve` fills the unset ones;
`load_for_eval` resolves them against a stored run. Each rule of `RULES` reads the parsed flags
(an argparse Namespace; flags a tool does not have are skipped) and returns the one-line error
for a bad value, or None; `validate` (main.py) and benchmark.py turn the first into their usage
error (exit code 2).
"""
import argparse
import os

import data_utils
import gdu
import model_utils as mu
import ops
import registry
from runs import UsageError, find_checkpoint, load_checkpoint, run_embeddings

# the fixed-point options (EP only)
SOLVER_FLAGS = ("fast", "anderson", "tol_nudged", "warm_start", "sample_exit", "bf16_matmul")
FAST = {"anderson": 5, "tol": 1e-3, "tol_nudged": 1e-2, "sample_exit": True, "merge_keys": True}  # what --fast turns on (docs/speed.md)
# Hyperparameters a saved run remembers; explicit flags override them, dataset defaults fill the rest.
HYPER = ["alg", "T", "K", "betas", "thirdphase", "estimator", "lrs", "lr_decay", "epochs", "batch_size",
         "seed", "tol", "dtype", "test_every", "bf16", "init", "fast", "anderson", "tol_nudged",
         "warm_start", "sample_exit", "weight_decay", "lr_decay_epochs", "word_dropout", "bf16_matmul",
         "merge_keys"]


def _get(args, name):
    return getattr(args, name, None)


def _flag(name):
    return "--" + name.replace("_", "-") if name not in ("fc_layers", "batch_size") else "--" + name


def positive(name):
    def rule(args):
        v = _get(args, name)
        return f"{_flag(name)} must be positive, got {v}" if v is not None and v <= 0 else None
    return rule


def non_negative(name):
    def rule(args):
        v = _get(args, name)
        return f"{_flag(name)} must be >= 0, got {v}" if v is not None and v < 0 else None
    return rule


def probability(name):
    def rule(args):
        v = _get(args, name)
        return f"{_flag(name)} is a probability in [0, 1), got {v:g}" if v is not None and not 0 <= v < 1 else None
    return rule


def fc_layers(args):
    sizes = _get(args, "fc_layers")
    if sizes is None:
        return None
    if any(h <= 0 for h in sizes):
        return f"--fc_layers sizes must be positive, got {sizes}"
    n = registry.get(args.dataset).n_classes
    if sizes[-1] != n:
        return f"--fc_layers must end with {n} classes for {args.dataset}, got {sizes[-1]}"
    return None


def bptt_window(args):
    if _get(args, "alg") == "BPTT" and args.K > args.T:
        return f"--K ({args.K}) cannot exceed --T ({args.T}) for BPTT: K steps are the last of the T free steps"
    return None


def betas(args):
    """The β gap the chosen EP estimator divides by must not vanish."""
    if _get(args, "alg") != "EP" or _get(args, "betas") is None:
        return None
    b1, b2 = args.betas
    est = _get(args, "estimator") or ("symmetric" if _get(args, "thirdphase") else "one-sided")
    if est != "one-sided-negative" and b1 == b2:
        return f"--betas {b1:g} {b2:g}: EP needs the nudging β2 to differ from β1 (its estimate divides by β2 − β1)"
    if est == "symmetric" and b2 == 0:
        return "--betas: three-phase EP needs β2 ≠ 0"
    if est == "one-sided-negative" and b1 + b2 == 0:
        return f"--betas {b1:g} {b2:g}: the one-sided-negative estimate divides by β1 + β2"
    return None


def lrs(args):
    rates = _get(args, "lrs")
    if rates is None:
        return None
    n_proj, n_fc = len(registry.get(args.dataset).projections), len(args.fc_layers)
    if len(rates) != n_proj + n_fc:
        return (f"--lrs needs {n_proj + n_fc} learning rates for this architecture ({n_proj} projection + "
                f"{n_fc} fully connected layers), got {len(rates)}")
    return f"--lrs must be positive, got {rates}" if any(lr <= 0 for lr in rates) else None


def ep_only(args):
    """Options BPTT training cannot honour: the free-phase bfloat16, early stopping, the solvers."""
    if _get(args, "alg") != "BPTT" or (_get(args, "execute") or "train") != "train":
        return None
    given = _get(args, "given")
    for name in ("tol", "bf16") + SOLVER_FLAGS:
        if (name in given) if given is not None else bool(_get(args, name)):
            return f"{_flag(name)} applies to EP training: drop it with --alg BPTT"
    return None


def fill_fast(args):
    """--fast: set its parts (FAST) where they were not given explicitly (main.py and benchmark.py)."""
    if args.fast:
        for key, value in FAST.items():
            if getattr(args, key) is None:
                setattr(args, key, value)


def sample_exit_rule(args):
    if _get(args, "sample_exit") and _get(args, "tol") is None and _get(args, "tol_nudged") is None:
        return "--sample-exit needs a stopping rule: give --tol and/or --tol-nudged (or --fast)"
    return None


def bf16_matmul_rule(args):
    if not _get(args, "bf16_matmul"):
        return None
    if _get(args, "tol_nudged") is None:
        return "--bf16-matmul needs the nudged phases' stopping rule: give --tol-nudged (or --fast)"
    if (_get(args, "dtype") or "float32") != "float32":
        return "--bf16-matmul keeps float32 states in the nudged phases: drop --dtype float64"
    return None


def decay_epochs_need_decay(args):
    if "lr_decay_epochs" in (_get(args, "given") or ()) and _get(args, "lr_decay") is False:
        return "--lr-decay-epochs sets the length of --lr-decay's cosine: add --lr-decay"
    return None


def bf16_dtype(args):
    if _get(args, "bf16") and (_get(args, "dtype") or "float32") != "float32":
        return f"--bf16 runs the free phase in bfloat16 beside a float32 model, not --dtype {args.dtype}"
    return None


RULES = data_utils.DATA_RULES + [fc_layers, positive("T"), positive("K"), positive("batch_size"),
         non_negative("epochs"), bptt_window, betas, lrs, positive("gamma"), positive("tol"),
         positive("tol_nudged"), non_negative("anderson"), non_negative("weight_decay"),
         non_negative("test_every"), non_negative("bptt_checkpoint"), ep_only, bf16_dtype,
         sample_exit_rule, bf16_matmul_rule, positive("lr_decay_epochs"), decay_epochs_need_decay,
         probability("word_dropout")]


def problems(args):
    """The error of every rule that fails, in RULES order."""
    return [msg for msg in (rule(args) for rule in RULES) if msg]


# ----------------------------------------------------------------------------- the parser
def build_parser():
    """The command line: the original tool's flags and this tool's, in groups."""
    p = argparse.ArgumentParser(
        description="Sequence learning with Equilibrium Propagation (convergent RNN + modern Hopfield layers).")
    for group in (_model_flags, _learning_flags, _solver_flags, _run_flags, _predict_flags):
        group(p.add_argument)
    data_utils.add_data_args(p)
    gdu.add_gdu_args(p)
    return p


def _model_flags(a):
    a("--dataset", choices=registry.names(), help="dataset (default IMDB, or the loaded run's)")
    a("--fc_layers", "--fc_layer", type=int, nargs="+", help="fully connected sizes, last = classes "
      "(default IMDB: 1000 40 2, SNLI: 400 3)")
    a("--seqLen", type=int, help="tokens per sequence (default IMDB 600, SNLI 25)")
    a("--act", choices=sorted(ops.ACTIVATIONS), help="activation σ (default my_hard_sig)")
    a("--gamma", type=float, help="Hopfield attention scale γ (default 1/sqrt(D) for IMDB, 0.16 for SNLI)")
    a("--init", choices=ops.INITS, help="initial output biases: centred (default: at the middle of "
      "σ's working range, so no output unit starts on a flat part) or torch (nn.Linear's, zero-centred)")


def _learning_flags(a):
    a("--execute", choices=["train", "test", "gducheck", "predict", "export"], default="train",
      help="train, test a stored model, GDU check, predict texts, or export a run for sharing")
    a("--alg", choices=["EP", "BPTT"], help="learning algorithm (default EP)")
    a("--T", type=int, help="free-phase steps (default IMDB 50, SNLI 60)")
    a("--K", type=int, help="nudged-phase steps (EP) / backpropagated steps (BPTT) (default T/2)")
    a("--betas", type=float, nargs=2, metavar=("BETA1", "BETA2"),
      help="β of the free and nudged phases (default IMDB 0 0.1, SNLI 0 0.5)")
    a("--thirdphase", action="store_true", default=None,
      help="three-phase EP: nudge with +β2 and −β2 (symmetric estimate)")
    a("--estimator", choices=list(mu.ESTIMATORS),
      help="EP estimate: one-sided (the +β2 state against the free state), one-sided-negative (the "
           "free state against −β2), symmetric (+β2 against −β2, what --thirdphase selects); default "
           "one-sided, or symmetric with --thirdphase")
    a("--lrs", type=float, nargs="+", help="one learning rate per synapse layer, projections first")
    a("--lr-decay", dest="lr_decay", action="store_true", default=None,
      help="cosine annealing of the learning rates (over --lr-decay-epochs, eta_min 1e-5)")
    a("--lr-decay-epochs", dest="lr_decay_epochs", type=int, metavar="N",
      help="--lr-decay: the epoch at which the cosine reaches eta_min (its T_max; default 100, the "
           "original's). Given when resuming, the rates move onto the new curve from the next epoch on")
    a("--epochs", type=int, help="training epochs (default 50)")
    a("--weight-decay", dest="weight_decay", type=float,
      help="decoupled weight decay (AdamW) of the weight matrices, biases excluded (default 0: Adam)")
    a("--word-dropout", dest="word_dropout", type=float, metavar="P",
      help="training only: drop each token of a training sample with probability P, afresh every "
           "epoch, the rest closing up as OOV tokens do (default 0: the paper's inputs)")
    a("--batch_size", type=int, help="batch size (default IMDB 100, SNLI 200)")
    a("--seed", type=int, help="random seed (default 0)")


def _solver_flags(a):
    a("--tol", type=float, help="stop a phase early when the largest relative state change "
      "falls below this (default off: always T and K steps)")
    a("--fast", action="store_true", default=None,
      help="EP: fewer steps to the same fixed points, the combination measured best: "
           "--anderson 5 --tol 1e-3 --tol-nudged 1e-2 --sample-exit --merge-keys (T and K become caps; add "
           "--compile for fused steps); explicit flags override its parts")
    a("--anderson", type=int, metavar="M", help="Anderson mixing of the last M iterates in every "
      "phase (on the FC states, projections retrieved first); 0 = plain synchronous steps (default)")
    a("--tol-nudged", dest="tol_nudged", type=float,
      help="EP: run the +β and −β phases as one batch and stop both once δ = s − s0 changes by "
           "less than this, relative to itself (default off: K steps, or --tol's rule)")
    a("--warm-start", dest="warm_start", action="store_true", default=None,
      help="EP training: start each sample's free phase at its last free fixed point (FC part, "
           "float16, kept in memory), needs --tol to save steps")
    a("--sample-exit", dest="sample_exit", action="store_true", default=None,
      help="with --tol / --tol-nudged: each sample leaves a phase as soon as its own relative change "
           "is below the tolerance, and the batch shrinks (the ±β phases of a sample stop together)")
    a("--merge-keys", dest="merge_keys", action=argparse.BooleanOptionalAction, default=None,
      help="the Hopfield retrieval over each text's distinct tokens, each weighted by its count: the "
           "same dynamics exactly, with fewer keys (padding is one); --no-merge-keys turns it off under --fast")
    a("--bf16-matmul", dest="bf16_matmul", action="store_true", default=None,
      help="EP training with --tol-nudged: the nudged phases multiply by bfloat16 copies of the weights and keys, "
           "δ = s − s0 stays float32; free phase, Hebbian estimate and evaluation unchanged (fast on CPUs "
           "with AVX512-BF16 and on GPUs)")


def _run_flags(a):
    a("--dtype", choices=["float32", "float64"], help="dtype of model and dynamics (default float32)")
    a("--bf16", action="store_true", default=None,
      help="EP: run the free phase and evaluation in bfloat16 (CPUs with AVX512-BF16, CUDA); "
           "nudged phases and Hebbian updates stay in --dtype")
    a("--compile", action="store_true",
      help="torch.compile the step of the dynamics (train and test; first batches pay the compile)")
    a("--bptt-checkpoint", dest="bptt_checkpoint", type=int, default=0, metavar="C",
      help="BPTT: activation checkpointing, recompute the K recorded steps in segments of C "
           "during backprop (memory ~ K/C + C steps instead of K; default 0 = off)")
    a("--load-path", dest="load_path", help="run folder (or .pt file) to resume, test or check")
    a("--device", type=int, help="CUDA device index (CPU when CUDA is unavailable)")
    a("--no-tf32", dest="tf32", action="store_false",
      help="CUDA: no TF32 at all (default: the free phase of training, which only finds the "
           "starting point, uses TF32 matmuls; nudged phases, the Hebbian estimate, BPTT's "
           "recorded steps, evaluation, export, predict and the GDU check always use full float32)")
    a("--save", action="store_true", default=None,
      help="write the run folder: checkpoints, metrics, plots (on by default when training resumes a "
           "run folder given by --load-path: the run goes on in it)")
    a("--results-dir", dest="results_dir",
      help="run folder (default results/<dataset>/<date>/<time>_<cpu|cudaN>/)")
    a("--overwrite", action="store_true", help="allow reusing a run folder that holds a run")
    a("--dist-timeout", dest="dist_timeout", type=float, default=1800,
      help="torchrun: seconds a rank waits for the others before failing (default 1800)")
    a("--test-every", dest="test_every", type=int,
      help="evaluate on the test set every N epochs (default 1; 0 = only at the end)")
    a("--check-thm", dest="check_thm", action="store_true",
      help="run the GDU check on a few training samples after every epoch and log it")
    a("--weights-dtype", dest="weights_dtype", choices=["float32", "float16", "bfloat16"],
      default="float16", help="export: precision the weights are stored in (default float16)")


def _predict_flags(a):
    a("--text", nargs="+", help="predict: texts to classify (IMDB)")
    a("--premise", help="predict: SNLI premise")
    a("--hypothesis", help="predict: SNLI hypothesis")
    a("--input-file", dest="input_file",
      help="predict: one text per line (SNLI: premise<TAB>hypothesis)")


def resolve(args, saved=None):
    """Fill unset flags: explicit flag > the loaded run's config > dataset defaults."""
    saved = saved or {}
    args.lrs_given = args.lrs is not None
    args.given = {k for k in ("thirdphase", "estimator", "betas", "tol", "bf16", "lr_decay_epochs") + SOLVER_FLAGS
                  if getattr(args, k, None) is not None}
    arch = saved.get("model", {})
    if args.dataset is None:
        args.dataset = arch.get("dataset", "IMDB")
    elif arch and arch["dataset"] != args.dataset:
        raise UsageError(f"--dataset {args.dataset} does not match the loaded model, "
                         f"which was trained on {arch['dataset']}")
    d = registry.get(args.dataset).paper  # the paper's configuration (the original README)
    if arch:  # architecture always comes from the checkpoint
        for flag, key in [("fc_layers", "fc_layers"), ("seqLen", "seq_len"), ("act", "act"),
                          ("gamma", "gamma")]:
            given = getattr(args, flag)
            if given is not None and given != arch[key]:
                raise UsageError(f"--{flag} {given} conflicts with the loaded model ({arch[key]}); "
                                 f"drop the flag to use the stored architecture")
            setattr(args, flag, arch[key])
    info = saved.get("data", {})  # the data options of a loaded run, unless given again
    if getattr(args, "val_split", None) is None and info.get("val", {}).get("fraction") is not None:
        args.val_split = info["val"]["fraction"]
    if getattr(args, "tokenize", None) is None and info.get("tokenize"):
        args.tokenize = info["tokenize"]  # a run is evaluated with the tokens it was trained on
    for key in ("max_train", "max_test"):  # a resumed run keeps its subsamples; test uses all
        if getattr(args, key, None) is None and args.execute == "train":
            setattr(args, key, info.get("subsample", {}).get(key))
    hyper = saved.get("hyper", {})
    if getattr(args, "save", False) is None:  # a resumed run folder keeps being written
        args.save = args.execute == "train" and bool(args.load_path) and os.path.isdir(args.load_path)
    fill_fast(args)
    fallback = {"alg": "EP", "thirdphase": False, "lr_decay": False, "epochs": 50, "seed": 0,
                "fast": False, "anderson": 0, "tol_nudged": None, "warm_start": False, "sample_exit": False,
                "bf16_matmul": False, "merge_keys": False,
                "weight_decay": 0.0, "lr_decay_epochs": 100, "word_dropout": 0.0,
                "tol": None, "dtype": "float32", "test_every": 1, "bf16": False, "act": "my_hard_sig",
                "init": "torch" if hyper and "init" not in hyper else "centred",
                **{k: v for k, v in d.items() if k != "lrs"}}
    for key in HYPER + ["fc_layers", "seqLen", "act"]:
        if getattr(args, key, None) is None:
            setattr(args, key, hyper.get(key, fallback.get(key)))
    if args.estimator is None or "thirdphase" in args.given and "estimator" not in args.given:
        explicit = "thirdphase" in args.given or not hyper.get("estimator")
        args.estimator = mu.estimator_name(bool(args.thirdphase)) if explicit else hyper["estimator"]
    args.thirdphase = args.estimator == "symmetric"  # the original's flag, as the GDU check reads it
    if args.K is None:
        args.K = max(1, args.T // 2)
    if args.lrs is None and args.fc_layers == d["fc_layers"]:
        args.lrs = d["lrs"]
    elif args.lrs is None and args.execute == "train":  # other modes use no learning rate
        raise UsageError(f"--lrs is required for --fc_layers {' '.join(map(str, args.fc_layers))}: "
                         f"give {len(registry.get(args.dataset).projections) + len(args.fc_layers)} "
                         f"learning rates (projections first)")
    args.betas = list(args.betas)
    return args


def validate(args):
    """Clear one-line errors for every bad flag value (exit code 2): the shared rules of
    `flags.py`, then those of the modes."""
    bad = problems(args)
    if bad:
        raise UsageError(bad[0])
    for flag in ("bf16", "tol"):
        if args.execute == "gducheck" and flag in getattr(args, "given", set()):
            raise UsageError(f"--{flag} does not apply to gducheck: the theorem is about the plain fixed-T "
                             f"steps, in --gdu-dtype")


def solver_flags_given(args, extra=()):
    """The solver flags (`SOLVER_FLAGS`, plus `extra`) this command sets, as '--a/--b' for the
    notices of the modes that take the plain synchronous steps instead ('' when none is set)."""
    return "/".join(f"--{f.replace('_', '-')}" for f in SOLVER_FLAGS + tuple(extra) if getattr(args, f, None))


def unused_flags(args):
    """Flags of the other algorithm, accepted so that one command switches by --alg alone."""
    if args.execute == "gducheck":  # the theorem is about the plain synchronous steps
        return [f"--{f.replace('_', '-')}" for f in SOLVER_FLAGS if f in getattr(args, "given", set())]
    if args.execute != "train":
        return []
    if args.alg == "BPTT":
        return [f"--{f}" for f in ("thirdphase", "estimator", "betas") if f in getattr(args, "given", set())]
    return ["--bptt-checkpoint"] if args.bptt_checkpoint > 0 else []


def hyper_of(args):
    return {k: getattr(args, k) for k in HYPER}


def load_for_eval(args, log):
    """The checkpoint to evaluate and its path; flags resolved against its config, and
    --embeddings auto pointed at the run folder's embeddings.npz when there is one."""
    path = find_checkpoint(args.load_path, ["best_model.pt", "final_model.pt", "checkpoint.pt"])
    ckpt = load_checkpoint(path)
    resolve(args, ckpt["config"])
    validate(args)
    if args.embeddings == "auto" and run_embeddings(args.load_path):
        args.embeddings = run_embeddings(args.load_path)  # the exact vectors the run was trained with
    return ckpt, path
