"""One validator per flag value, shared by main.py and benchmark.py.

Each rule reads the parsed flags (an argparse Namespace; flags a tool does not have are
skipped) and returns the one-line error for a bad value, or None. `problems(args)` lists them
in order; each tool turns the first into its own usage error (exit code 2).
"""
import registry

SOLVER_FLAGS = ("fast", "anderson", "tol_nudged", "warm_start")  # the fixed-point options (EP only)
FAST = {"anderson": 5, "tol": 1e-3, "tol_nudged": 1e-2}  # what --fast turns on (docs/speed.md)


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


def bf16_dtype(args):
    if _get(args, "bf16") and (_get(args, "dtype") or "float32") != "float32":
        return f"--bf16 runs the free phase in bfloat16 beside a float32 model, not --dtype {args.dtype}"
    return None


RULES = [positive("seqLen"), fc_layers, positive("T"), positive("K"), positive("batch_size"),
         non_negative("epochs"), bptt_window, betas, lrs, positive("gamma"), positive("tol"),
         positive("tol_nudged"), non_negative("anderson"), non_negative("weight_decay"),
         non_negative("test_every"), non_negative("bptt_checkpoint"), ep_only, bf16_dtype]


def problems(args):
    """The error of every rule that fails, in RULES order."""
    return [msg for msg in (rule(args) for rule in RULES) if msg]
