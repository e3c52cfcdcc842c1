"""Fewer steps to the same fixed points: Anderson mixing, the sweep order, the joint ±β phases and
warm starts reach what plain synchronous iteration reaches (float64, converged problems)."""
import json

import pytest
import torch

import fixed_point as fp
import model_utils as mu
import ops
from test_model_utils import converged_problem, random_state, rel_err, tiny

torch.set_num_threads(2)
DATASETS = ["IMDB", "SNLI"]


def plain_fixed_point(model, x, beta=0.0, y=None, steps=400):
    drive, keys = model.precompute(x)
    with torch.no_grad():
        s, used = mu.relax(model, model.init_states(x.shape[0], dtype=x.dtype), drive, keys, steps,
                           beta, y, tol=1e-14)
    assert used < steps
    return s


def max_diff(a, b):
    return max((u - v).abs().max().item() for u, v in zip(a, b))


def test_anderson_solves_a_linear_fixed_point_faster_than_plain_iteration():
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(4, 30, 30, dtype=torch.float64))
    lam = torch.linspace(-0.5, 0.97, 30, dtype=torch.float64)   # a slow contraction per sample
    A = Q @ torch.diag(lam) @ Q.transpose(1, 2)
    c = torch.randn(4, 30, dtype=torch.float64)
    f = lambda z: [torch.einsum("bij,bj->bi", A, z[0]) + c]  # noqa: E731
    exact = torch.linalg.solve(torch.eye(30, dtype=torch.float64) - A, c)
    z0 = [torch.zeros(4, 30, dtype=torch.float64)]
    plain, n_plain = fp.iterate(f, z0, 2000, tol=1e-12)
    acc, n_acc = fp.anderson(f, z0, 2000, tol=1e-12, m=10)
    assert (acc[0] - exact).abs().max() < 1e-8 and (plain[0] - exact).abs().max() < 1e-8
    assert n_acc < n_plain / 4, (n_acc, n_plain)


def test_mixing_weights_sum_to_one_and_skip_invalid_columns():
    torch.manual_seed(0)
    g = torch.randn(3, 4, 10, dtype=torch.float64)
    gram = g @ g.transpose(1, 2)
    valid = torch.tensor([[True] * 4, [False, True, True, False], [False, False, True, False]])
    a = fp._mixing_weights(gram, valid, 2, 1e-12)
    torch.testing.assert_close(a.sum(1), torch.ones(3, dtype=torch.float64))
    assert (a[~valid] == 0).all()
    assert a[2, 2] == 1.0                                  # one valid column: the plain step
    # the valid-columns solution is the constrained least-squares minimiser
    cols = [1, 2]
    sub = gram[1][cols][:, cols]
    w = torch.linalg.solve(sub, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(a[1, cols], w / w.sum(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dataset", DATASETS)
def test_sweep_step_has_the_fixed_points_of_the_synchronous_step(dataset):
    model, x, y = converged_problem(dataset)
    s = plain_fixed_point(model, x)
    drive, keys = model.precompute(x)
    with torch.no_grad():
        assert max_diff(model.step_fc(s, drive, keys), s) < 1e-12
        # and it is a genuinely different map away from them (bottom-up order)
        r = random_state(model, 3)
        assert max_diff(model.step_fc(r, drive, keys), model.step(r, drive, keys)) > 1e-3


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("m", [0, 5])
@pytest.mark.parametrize("sample_exit", [False, True])
def test_free_phase_with_anderson_reaches_the_plain_fixed_point(dataset, m, sample_exit):
    model, x, y = converged_problem(dataset)
    ref = plain_fixed_point(model, x)
    drive, keys = model.precompute(x)
    with torch.no_grad():
        s, used = mu.relax(model, model.init_states(3, dtype=x.dtype), drive, keys, 400, tol=1e-13,
                           anderson=m, sample_exit=sample_exit)
    assert max_diff(s, ref) < 1e-10
    assert used < 400


@pytest.mark.parametrize("dataset", DATASETS)
def test_sweep_delta_step_is_the_sweep_step_on_offsets(dataset):
    """delta_step_fc(δ) = step_fc-like top-down sweep of s0 + δ, minus s0, to float64 rounding."""
    model, x, y = tiny(dataset, act="my_hard_sig")
    drive, keys = model.precompute(x)
    s0, d = random_state(model, 3), [0.01 * t for t in random_state(model, 3)]
    beta0, beta = 0.1, 0.3
    setup = model.nudged_setup(s0, drive, keys, beta0, y)
    out = s0[-1]
    nudge = (beta - beta0) * (mu.one_hot(y, out) - out)
    got = model.delta_step_fc(d, setup, keys, torch.tensor(beta, dtype=x.dtype), nudge)
    # the same sweep written on the states: projections from s1, then FC layers top-down
    s = [a + b for a, b in zip(s0, d)]
    W, b = [l.weight for l in model.fc], [l.bias for l in model.fc]
    new = [model.retrieve(drive + (s[1] @ W[0]).view_as(drive), keys)] + list(s[1:])
    n = len(s) - 1
    for k in range(n, 0, -1):
        g = new[k - 1].flatten(1) @ W[k - 1].t() + b[k - 1]
        g = g + new[k + 1] @ W[k] if k < n else g + beta * (mu.one_hot(y, s[k]) - s[k])
        new[k] = ops.ACTIVATIONS[model.act_name](g)
    for a, want, base in zip(got, new, s0):
        torch.testing.assert_close(a, want - base, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("thirdphase", [False, True])
def test_joint_nudged_phases_reach_the_plain_nudged_fixed_points(dataset, thirdphase):
    model, x, y = converged_problem(dataset)
    s0 = plain_fixed_point(model, x)
    drive, keys = model.precompute(x)
    with torch.no_grad():
        setup = model.nudged_setup(s0, drive, keys, 0.0, y)
        want_pos, _ = mu.relax_nudged(model, s0, setup, keys, 400, 0.05, 0.0, y)
        want_neg, _ = mu.relax_nudged(model, s0, setup, keys, 400, -0.05, 0.0, y)
        for m, sample_exit in [(0, False), (5, False), (0, True), (5, True)]:
            signs = (1, -1) if thirdphase else (1,)
            ds, n = mu.relax_nudged_pair(model, s0, setup, keys, 400, 0.05, 0.0, y, 1e-11, m, signs, sample_exit)
            assert n < 400 and len(ds) == len(signs)
            assert max_diff(ds[0], want_pos) < 1e-12
            if thirdphase:
                assert max_diff(ds[1], want_neg) < 1e-12


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("sample_exit", [False, True])
def test_fast_ep_estimate_equals_the_converged_fixed_step_estimate(dataset, sample_exit):
    model, x, y = converged_problem(dataset)
    mu.ep_gradients(model, x, y, 400, 300, (0.0, 0.05), True)
    want = [p.grad.clone() for p in model.params()]
    _, info = mu.ep_gradients(model, x, y, 400, 300, (0.0, 0.05), True, tol=1e-12, anderson=5,
                              tol_nudged=1e-10, sample_exit=sample_exit)
    assert info["free_steps"] < 100 and info["nudged_steps"] < 200
    for p, w in zip(model.params(), want):
        assert rel_err(p.grad, w) < 1e-7


@pytest.mark.parametrize("dataset", DATASETS)
def test_warm_start_from_the_fc_states_reaches_the_same_fixed_point_in_fewer_steps(dataset):
    model, x, y = converged_problem(dataset)
    ref = plain_fixed_point(model, x)
    drive, keys = model.precompute(x)
    table = fp.WarmStarts(10, model.fc_layers)
    idx = torch.tensor([7, 2, 5])
    assert all((t == 0).all() for t in table.get(idx, x.dtype))
    table.put(idx, ref[1:])
    assert table.nbytes == 10 * sum(model.fc_layers) * 2
    warm = table.get(idx, x.dtype)
    for w, r in zip(warm, ref[1:]):
        assert (w - r).abs().max() < 1e-3                        # stored in float16
    with torch.no_grad():
        start = model.warm_states(warm, drive, keys)
        torch.testing.assert_close(start[0], model.step(ref, drive, keys)[0], rtol=0, atol=5e-3)
        cold, n_cold = mu.relax(model, model.init_states(3, dtype=x.dtype), drive, keys, 400, tol=1e-12,
                                anderson=5)
        hot, n_hot = mu.relax(model, start, drive, keys, 400, tol=1e-12, anderson=5)
    assert max_diff(hot, ref) < 1e-10 and max_diff(cold, ref) < 1e-10
    assert n_hot < n_cold


def test_each_sample_leaves_on_its_own_residual_and_keeps_its_row():
    """Per-sample exit on independent problems of different speeds: every sample gets what the
    whole batch run to the same tolerance gives it, in its own row; the ±β blocks leave together;
    the work is the mean of the samples' own step counts."""
    torch.manual_seed(0)
    B, n = 4, 6
    rate = torch.tensor([0.1, 0.9, 0.5, 0.95], dtype=torch.float64)[:, None]  # per-sample contraction
    c = torch.randn(B, n, dtype=torch.float64)
    f_batch = lambda z: [rate * torch.tanh(z[0]) + c]  # noqa: E731
    f_rows = lambda z, ctx, _: [ctx[0] * torch.tanh(z[0]) + ctx[1]]  # noqa: E731
    z0 = [torch.zeros(B, n, dtype=torch.float64)]
    ref, n_ref = fp.iterate(f_batch, z0, 5000, tol=1e-13)
    for m in (0, 5):
        got, work = fp.solve_per_sample(f_rows, z0, (rate, c), 5000, 1e-13, m)
        assert max_diff(got, ref) < 1e-11
        alone = [fp.solve_per_sample(f_rows, [z0[0][i:i + 1]], (rate[i:i + 1], c[i:i + 1]), 5000, 1e-13, m)[1]
                 for i in range(B)]
        assert work == pytest.approx(sum(alone) / B)          # each sample paid for its own steps
        assert work < max(alone)
    # two rows per sample (the ±β phases, next to each other): a sample's rows leave together,
    # on the slower of the two, the rows come back in their order, and what the rows of a
    # sample share (`shared`, one row per sample) shrinks with the samples
    rate2 = torch.stack([rate, rate.flip(0)], 1).flatten(0, 1)
    sign2 = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(B)[:, None]
    f2 = lambda z: [rate2 * torch.tanh(z[0]) + sign2 * c.repeat_interleave(2, 0)]  # noqa: E731
    f_shared = lambda z, ctx, sh: [ctx[0] * torch.tanh(z[0]) + ctx[1] * sh[0].repeat_interleave(2, 0)]  # noqa: E731
    ref2, _ = fp.iterate(f2, [torch.zeros(2 * B, n, dtype=torch.float64)], 5000, tol=1e-13)
    got2, work2 = fp.solve_per_sample(f_shared, [torch.zeros(2 * B, n, dtype=torch.float64)], (rate2, sign2), 5000,
                                      1e-13, 0, group=2, shared=(c,))
    assert max_diff(got2, ref2) < 1e-11
    slow = torch.maximum(rate, rate.flip(0))
    per_pair = [fp.solve_per_sample(f_rows, [torch.zeros(1, n, dtype=torch.float64)], (slow[i:i + 1], c[i:i + 1]),
                                    5000, 1e-13, 0)[1] for i in range(B)]
    assert abs(work2 - sum(per_pair) / B) <= 2                # steps set by each pair's slower row
    # a cap stops everyone, and T = 0 returns the start
    capped, w = fp.solve_per_sample(f_rows, z0, (rate, c), 3, 1e-13, 5)
    assert w == 3 and all(torch.isfinite(t).all() for t in capped)
    assert fp.solve_per_sample(f_rows, z0, (rate, c), 0, 1e-13)[1] == 0


def test_anderson_history_survives_bfloat16_states():
    model, x, y = converged_problem("IMDB")
    model = model.float()
    drive, keys = model.precompute(x.float())
    p = [w.to(torch.bfloat16) for w in model.params()]
    with torch.no_grad():
        s, _ = mu.relax(model, model.init_states(3, dtype=torch.bfloat16), drive.bfloat16(), keys.bfloat16(),
                        30, tol=1e-2, p=p, anderson=5)
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in s)


# ----------------------------------------------------------------------------- the command line
def test_fast_is_recorded_survives_resume_and_is_refused_by_bptt(tiny_imdb, capsys):
    import main
    from test_main import base_args, weights
    tmp = tiny_imdb["tmp"]
    common = base_args(tiny_imdb, "--fast", "--warm-start", "--sample-exit", "--save")
    assert main.main(common + ["--epochs", "2", "--results-dir", str(tmp / "full")]) == 0
    out = capsys.readouterr()
    assert "steps" in [l for l in (out.out + out.err).splitlines() if l.startswith("epoch 2/2")][0]
    hyper = json.loads((tmp / "full" / "config.json").read_text())["hyper"]
    assert (hyper["fast"], hyper["anderson"], hyper["tol"], hyper["tol_nudged"], hyper["warm_start"],
            hyper["sample_exit"]) == (True, 5, 1e-3, 1e-2, True, True)
    assert main.main(base_args(tiny_imdb, "--fast", "--epochs", "1", "--save", "--results-dir",
                               str(tmp / "plainfast"))) == 0
    assert json.loads((tmp / "plainfast" / "config.json").read_text())["hyper"]["warm_start"] is False
    ckpt = torch.load(tmp / "full" / "checkpoint.pt", weights_only=True)
    assert ckpt["warm_starts"].dtype == torch.float16 and ckpt["warm_starts"].abs().sum() > 0
    assert "warm_starts" not in torch.load(tmp / "full" / "best_model.pt", weights_only=True)
    # one epoch, then resumed without repeating the flags: the run's solver and warm starts continue
    assert main.main(common + ["--epochs", "1", "--results-dir", str(tmp / "part")]) == 0
    assert main.main(["--load-path", str(tmp / "part"), "--epochs", "2", "--save", "--data-dir",
                      str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"])]) == 0
    a, b = weights(tmp / "full" / "final_model.pt"), weights(tmp / "part" / "final_model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # explicit flags override --fast's parts
    assert main.main(base_args(tiny_imdb, "--fast", "--anderson", "3", "--epochs", "1", "--save",
                               "--results-dir", str(tmp / "three"))) == 0
    assert json.loads((tmp / "three" / "config.json").read_text())["hyper"]["anderson"] == 3
    capsys.readouterr()
    for bad in (["--fast"], ["--anderson", "4"], ["--tol-nudged", "0.01"], ["--warm-start"], ["--sample-exit"]):
        assert main.main(base_args(tiny_imdb, "--alg", "BPTT", "--epochs", "1", *bad)) == 2
        err = capsys.readouterr().err
        assert "applies to EP training" in err and len(err.strip().splitlines()) == 1
    assert main.main(base_args(tiny_imdb, "--anderson", "-1")) == 2
    assert main.main(base_args(tiny_imdb, "--tol-nudged", "0")) == 2
    capsys.readouterr()
    assert main.main(base_args(tiny_imdb, "--sample-exit")) == 2   # no stopping rule to exit on
    assert "--sample-exit needs a stopping rule" in capsys.readouterr().err


def test_gducheck_of_a_fast_run_says_it_takes_the_plain_steps(tiny_imdb, capsys):
    import main
    from test_main import base_args
    tmp = tiny_imdb["tmp"]
    assert main.main(base_args(tiny_imdb, "--fast", "--epochs", "1", "--save", "--results-dir",
                               str(tmp / "run"))) == 0
    capsys.readouterr()
    assert main.main(["--execute", "gducheck", "--load-path", str(tmp / "run"), "--data-dir",
                      str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"]), "--gdu-samples", "4",
                      "--results-dir", str(tmp / "gdu")]) == 0
    out = capsys.readouterr()
    assert "plain synchronous steps" in out.out + out.err
    assert "solver is not used here" in out.out + out.err


def test_fast_solver_under_torchrun_equals_one_process_float64(tiny_imdb):
    from test_dist import max_diff as weight_diff, single, torchrun
    tmp = tiny_imdb["tmp"]
    # converged phases (tight tolerances, generous caps): then the result does not depend on
    # how the batch is split over ranks, and warm starts must reach the same fixed points
    from test_main import base_args
    common = base_args(tiny_imdb, "--dtype", "float64", "--save", "--anderson", "5", "--tol", "1e-12",
                       "--tol-nudged", "1e-10", "--warm-start", "--sample-exit", "--T", "200", "--K", "200")
    one = single(common + ["--epochs", "2", "--results-dir", str(tmp / "one")], tmp)
    assert one.returncode == 0, one.stderr[-3000:]
    first = torchrun(common + ["--epochs", "1", "--results-dir", str(tmp / "two")], tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    table = torch.load(tmp / "two" / "checkpoint.pt", weights_only=True)["warm_starts"]
    assert table.abs().sum(1).gt(0).all()  # rank 0 holds the rows both ranks stored
    second = torchrun(["--load-path", str(tmp / "two"), "--epochs", "2", "--save", "--data-dir",
                       str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"])], tmp)
    assert second.returncode == 0, second.stderr[-3000:]
    assert weight_diff(tmp / "one" / "final_model.pt", tmp / "two" / "final_model.pt") < 1e-6


@pytest.mark.parametrize("dataset", DATASETS)
def test_estimator_family_matches_autograd_differences_and_the_original_flag(dataset):
    """Each estimator is the difference of ∂Φ/∂θ at its two states over their β gap (β1 ≠ 0 here,
    so every gap differs); True/False are the original's --thirdphase."""
    model, x, y = converged_problem(dataset)
    betas, (T, K) = (0.02, 0.05), (200, 150)
    drive, keys = model.precompute(x)
    with torch.no_grad():
        s0, _ = mu.relax(model, model.init_states(3, dtype=x.dtype), drive, keys, T, betas[0], y)
        states = {0: s0, 1: mu.relax(model, s0, drive, keys, K, betas[1], y)[0],
                  -1: mu.relax(model, s0, drive, keys, K, -betas[1], y)[0]}
    grads = {}
    for name, (a, b) in mu.ESTIMATORS.items():
        gap = (betas[0] if a == 0 else a * betas[1]) - (betas[0] if b == 0 else b * betas[1])
        assert mu.estimator_gap(name, betas) == pytest.approx(gap)
        ga = torch.autograd.grad(model.phi(x, states[a]).mean(), model.params())
        gb = torch.autograd.grad(model.phi(x, states[b]).mean(), model.params())
        for m in (5, 0):  # Anderson with the sweep steps, then plain steps (kept for the flag check)
            mu.ep_gradients(model, x, y, T, K, betas, name, anderson=m)
            for p, u, v in zip(model.params(), ga, gb):
                torch.testing.assert_close(p.grad, -(u - v) / gap, rtol=1e-7, atol=1e-10)
        grads[name] = [p.grad.clone() for p in model.params()]
    for flag, name in ((True, "symmetric"), (False, "one-sided")):
        mu.ep_gradients(model, x, y, T, K, betas, flag)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.params(), grads[name]))
    with pytest.raises(ValueError, match="unknown EP estimator"):
        mu.ep_gradients(model, x, y, T, K, betas, "two-sided")


def test_estimator_flag_through_main(tiny_imdb, capsys):
    import main
    from test_main import base_args
    tmp = tiny_imdb["tmp"]
    args = [a for a in base_args(tiny_imdb, "--epochs", "1", "--save") if a != "--thirdphase"]
    assert main.main(args + ["--estimator", "one-sided-negative", "--results-dir", str(tmp / "neg")]) == 0
    hyper = json.loads((tmp / "neg" / "config.json").read_text())["hyper"]
    assert (hyper["estimator"], hyper["thirdphase"]) == ("one-sided-negative", False)
    assert "EP one-sided-negative" in capsys.readouterr().out
    assert main.main(args + ["--thirdphase", "--results-dir", str(tmp / "sym")]) == 0
    assert json.loads((tmp / "sym" / "config.json").read_text())["hyper"]["estimator"] == "symmetric"
    bad = [a if a != "0.5" else "0" for a in args]  # --betas 0 0 (β1 + β2 = 0)
    assert main.main(bad + ["--estimator", "one-sided-negative"]) == 2
    assert "divides by β1 + β2" in capsys.readouterr().err


# --bf16-matmul: bfloat16 copies of the weights in the matmuls, float states
def test_linear_with_low_precision_weights_multiplies_in_their_dtype_and_returns_the_states_dtype():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(6, 40, generator=g), torch.randn(5, 40, generator=g), torch.randn(5, generator=g)
    add = torch.randn(6, 5, generator=g)
    w16, b16 = w.bfloat16(), b.bfloat16()
    out = ops.linear(x, w16, b16, add=add)
    assert out.dtype == torch.float32
    want = torch.nn.functional.linear(x.bfloat16(), w16, b16).float() + add
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)       # a bf16 ulp: kernels may round apart
    assert not torch.equal(out, torch.nn.functional.linear(x, w, b) + add)
    torch.testing.assert_close(ops.linear(x, w16.t().contiguous().t()), ops.linear(x, w16))


@pytest.mark.parametrize("dataset", DATASETS)
def test_bf16_matmul_estimate_is_the_float_estimate_to_bfloat16_rounding(dataset):
    model, x, y = converged_problem(dataset)
    mu.ep_gradients(model, x, y, 400, 300, (0.0, 0.05), True, tol=1e-12, anderson=5, tol_nudged=1e-10)
    want = [p.grad.clone() for p in model.params()]
    out, info = mu.ep_gradients(model, x, y, 400, 300, (0.0, 0.05), True, tol=1e-12, anderson=5, tol_nudged=1e-2,
                                sample_exit=True, bf16_matmul=True)
    errs = [rel_err(p.grad, w) for p, w in zip(model.params(), want)]
    assert 1e-6 < max(errs) < 2e-2      # bfloat16 products: close, not equal
    out32, info32 = mu.ep_gradients(model, x, y, 400, 300, (0.0, 0.05), True, tol=1e-12, anderson=5,
                                    tol_nudged=1e-2, sample_exit=True)
    assert torch.equal(out, out32) and info["free_steps"] == info32["free_steps"]   # the free phase is untouched
    with pytest.raises(ValueError, match="needs tol_nudged"):
        mu.ep_gradients(model, x, y, 30, 10, (0.0, 0.05), True, bf16_matmul=True)


def test_bf16_matmul_through_main_is_recorded_and_needs_the_nudged_stopping_rule(tiny_imdb, capsys):
    import main
    from test_main import base_args
    tmp = tiny_imdb["tmp"]
    assert main.main(base_args(tiny_imdb, "--fast", "--bf16-matmul", "--epochs", "1", "--save",
                               "--results-dir", str(tmp / "bf"))) == 0
    assert json.loads((tmp / "bf" / "config.json").read_text())["hyper"]["bf16_matmul"] is True
    # with a bfloat16 free phase too (on CPUs without bfloat16 kernels: a notice, then slower)
    assert main.main(base_args(tiny_imdb, "--fast", "--bf16-matmul", "--bf16", "--epochs", "1", "--save",
                               "--results-dir", str(tmp / "bf2"))) == 0
    hyper = json.loads((tmp / "bf2" / "config.json").read_text())["hyper"]
    assert hyper["bf16_matmul"] is True and hyper["bf16"] is True
    capsys.readouterr()
    for bad, msg in ((["--bf16-matmul"], "needs the nudged phases' stopping rule"),
                     (["--fast", "--bf16-matmul", "--dtype", "float64"], "keeps float32 states"),
                     (["--fast", "--bf16-matmul", "--alg", "BPTT"], "applies to EP training")):
        assert main.main(base_args(tiny_imdb, "--epochs", "1", *bad)) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


def test_solver_flags_given_names_the_flags_in_effect():
    """The notices of --check-thm and gducheck name the solver flags that they do not use."""
    import argparse
    import flags
    args = argparse.Namespace(fast=True, anderson=5, tol_nudged=1e-2, warm_start=False, sample_exit=True,
                              bf16_matmul=False, tol=1e-3)
    assert flags.solver_flags_given(args) == "--fast/--anderson/--tol-nudged/--sample-exit"
    assert flags.solver_flags_given(args, extra=("tol",)) == "--fast/--anderson/--tol-nudged/--sample-exit/--tol"
    assert flags.solver_flags_given(argparse.Namespace(anderson=0, tol=None)) == ""
