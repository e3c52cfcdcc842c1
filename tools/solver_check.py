"""How close does each solver get to the fixed points, in how many steps? On a trained run.

    python tools/solver_check.py saved_models/test_SNLI_25_300 --data-dir data --T 60 --K 30

Takes a run folder (its weights, β and real training batches), computes a reference EP gradient
at tightly converged fixed points (Anderson, relative residual 1e-6 free / 1e-5 nudged, up to
--ref-steps steps), then for each solver the EP gradient, the steps it used and its relative
error max over parameters ‖g − g_ref‖ / ‖g_ref‖:
plain synchronous T and K steps (the default); the stopping rules alone (--tol, --tol-nudged);
Anderson mixing with them, batch-wide and per sample (--sample-exit: --fast), and --fast with
--bf16-matmul where the CPU has bfloat16 kernels; and plain steps up
to --ref-steps; with --fast-tols, --fast at other stopping tolerances (and with --bf16-matmul
or a bfloat16 free phase, --bf16). Steps are per sample
(the work, in steps of the whole batch). Also
the relative distance of the plain T-step free state from the reference fixed point. Prints one
JSON line per batch and a summary.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark  # noqa: E402
import model_utils as mu  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder (or saved_models/...)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--T", type=int, default=None, help="plain free-phase steps (default: the run's)")
    p.add_argument("--K", type=int, default=None, help="plain nudged-phase steps (default: the run's)")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--ref-steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fast-tols", nargs="*", default=[], metavar="TOL,TOL_NUDGED[,bf16-matmul][,bf16]",
                   help="also --fast with these stopping tolerances (free,nudged), e.g. 1e-2,3e-2, optionally "
                        "with --bf16-matmul and/or --bf16 (a bfloat16 free phase): 3e-2,1e-1,bf16-matmul,bf16")
    args = p.parse_args(argv)
    fast_rows = []
    for spec in args.fast_tols:
        try:
            fast_rows.append(fast_row(spec))
        except ValueError as e:
            p.error(f"--fast-tols {spec}: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = benchmark.parse_args(["--load-path", args.run, "--data-dir", args.data_dir,
                              "--batch_size", str(args.batch_size)])
    hyper = torch.load(os.path.join(args.run, "best_model.pt") if os.path.isdir(args.run) else args.run,
                       weights_only=True)["config"]["hyper"]
    T, K, betas = args.T or hyper["T"], args.K or hyper["K"], tuple(hyper["betas"])
    model = mu.EPNet(b.dataset, b.seqLen, b.embed_dim, b.fc_layers, b.act, b.gamma)
    model.load_state_dict(b.data["state"])
    solvers = {
        f"plain T={T} K={K}": dict(T=T, K=K),
        "stopping rules (--tol 1e-3 --tol-nudged 1e-2)": dict(T=T, K=K, tol=1e-3, tol_nudged=1e-2),
        "Anderson 5, same rules": dict(T=T, K=K, tol=1e-3, tol_nudged=1e-2, anderson=5),
        "--fast (Anderson 5, same rules, --sample-exit)": dict(T=T, K=K, tol=1e-3, tol_nudged=1e-2, anderson=5,
                                                              sample_exit=True),
        "--fast --bf16-matmul (bfloat16 weights in the nudged phases)": dict(T=T, K=K, tol=1e-3, tol_nudged=1e-2,
                                                                       anderson=5, sample_exit=True,
                                                                       bf16_matmul=True),
        f"plain free phase up to {args.ref_steps} steps": dict(T=args.ref_steps, K=args.ref_steps, tol=1e-6,
                                                              tol_nudged=1e-5),
    }
    for name, kw in fast_rows:
        solvers[name] = dict(T=T, K=K, **kw)
    import ops
    if torch.bfloat16 not in ops.ONEDNN_DTYPES:   # generic bf16 matmuls: correct, not worth timing
        solvers = {k: v for k, v in solvers.items() if not (v.get("bf16_matmul") or v.get("free_dtype"))}
    rows = {name: [] for name in solvers}
    for _ in range(args.batches):
        x, y = benchmark.random_batch(model, b, "cpu", torch.float32, None)

        def grads(**kw):
            out, info = mu.ep_gradients(model, x, y, kw.pop("T"), kw.pop("K"), betas, True, **kw)
            return [q.grad.clone() for q in model.params()], info

        ref, ref_info = grads(T=args.ref_steps, K=args.ref_steps, tol=1e-6, anderson=8, tol_nudged=1e-5)
        with torch.no_grad():
            drive, keys = model.precompute(x)
            s_ref, _ = mu.relax(model, model.init_states(x.shape[0]), drive, keys, args.ref_steps, tol=1e-6,
                                anderson=8)
            s_T, _ = mu.relax(model, model.init_states(x.shape[0]), drive, keys, T)
        distance = max(((a - r).norm() / r.norm()).item() for a, r in zip(s_T, s_ref))
        for name, kw in solvers.items():
            g, info = grads(**kw)
            err = max(((a - r).norm() / r.norm()).item() for a, r in zip(g, ref))
            rows[name].append({"grad_rel_err": err, "free_steps": info["free_steps"],
                               "nudged_steps_per_phase": info["nudged_steps"] / 2})
        print(json.dumps({"reference_steps": [ref_info["free_steps"], ref_info["nudged_steps"] / 2],
                          f"plain_T{T}_free_state_distance": round(distance, 6),
                          **{k: v[-1] for k, v in rows.items()}}))
    print(json.dumps({"summary": {k: {m: round(sum(r[m] for r in v) / len(v), 6) for m in v[0]}
                                  for k, v in rows.items()}}, indent=1))


FAST_ROW_OPTIONS = {"bf16-matmul": ("bf16_matmul", True), "bf16": ("free_dtype", torch.bfloat16)}  # ep_gradients'


def fast_row(spec):
    """'TOL,TOL_NUDGED[,bf16-matmul][,bf16]' -> (row name, ep_gradients keywords of --fast with them)."""
    tol, tol_nudged, *extra = spec.split(",")
    kw = dict(tol=float(tol), tol_nudged=float(tol_nudged), anderson=5, sample_exit=True)
    name = f"--fast --tol {kw['tol']:g} --tol-nudged {kw['tol_nudged']:g}"
    for opt in extra:
        if opt not in FAST_ROW_OPTIONS:
            raise ValueError(f"unknown option {opt!r} ({', '.join(FAST_ROW_OPTIONS)})")
        key, value = FAST_ROW_OPTIONS[opt]
        kw[key] = value
        name += f" --{opt}"
    return name, kw


if __name__ == "__main__":
    main()
