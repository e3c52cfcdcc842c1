"""The GDU check as checks: EP's per-step updates equal BPTT's per-step gradients at a fixed
point, the symmetric estimate is the better one, the linear-time BPTT equals its definition,
and the gducheck entry writes its metrics and plots."""
import argparse
import json
import math

import pytest
import torch

import gdu
import model_utils as mu
from conftest import tiny_model

torch.set_num_threads(2)

METRIC_KEYS = {f"{kind}_{curve}" for kind in ("rel_rmse", "sign_agreement")
               for curve in ("one_sided", "one_sided_negative", "symmetric")}


def tiny(dataset, act="my_sigmoid", scale=1.0, B=3, seed=0):
    """A tiny float64 model of either architecture (L=4, D=5, one hidden layer of 7)."""
    return tiny_model(dataset, (7,), act, B=B, seed=seed, scale=scale)


def converged(dataset):
    # Small weights make the dynamics a contraction: T = 80 steps reach the fixed point.
    return tiny(dataset, act="my_sigmoid", scale=0.5)


@pytest.fixture(scope="module", params=["IMDB", "SNLI"])
def converged_check(request):
    model, x, y = converged(request.param)
    result = gdu.gdu_check(model, x, y, T=80, K=15, beta=1e-3, estimator="symmetric")
    return model, result, gdu.gdu_metrics(result)


def test_free_phase_is_at_its_fixed_point(converged_check):
    _, result, _ = converged_check
    assert result["free_residual"] < 1e-12


def test_symmetric_ep_matches_bptt_on_every_layer(converged_check):
    model, _, metrics = converged_check
    names = model.param_names() + gdu.neuron_names(model)
    assert list(metrics["layers"]) == names
    for name, m in metrics["layers"].items():
        assert set(m) == METRIC_KEYS
        assert m["rel_rmse_symmetric"] < 0.05, (name, m)
        assert m["sign_agreement_symmetric"] > 0.95, (name, m)


def test_symmetric_estimate_beats_one_sided_on_every_layer(converged_check):
    _, result, metrics = converged_check
    for name, m in metrics["layers"].items():
        assert m["rel_rmse_symmetric"] < m["rel_rmse_one_sided"], (name, m)
        assert gdu.symmetric_gain(result, name) < 1.0, name


def test_bptt_curves_are_not_trivial(converged_check):
    # Every layer receives gradient within K steps, so the comparison above is not 0 == 0.
    _, result, _ = converged_check
    for name in result["names"]:
        assert result["bptt"][name].abs().sum() > 0, name


def truncated_bptt(model, x, y, T, k):
    """The definition: detach the state at T−k, backprop ℓ(s_T) through the last k steps.
    Returns −∂ℓ/∂θ and −B·∂ℓ/∂g_{T−k} (the first recorded step's pre-activations)."""
    drive, keys = model.precompute(x)
    with torch.no_grad():
        s, _ = mu.relax(model, model.init_states(x.shape[0], dtype=x.dtype), drive, keys, T - k)
    g_first = None
    for t in range(k):
        g = model.grad_states(s, drive)
        g_first = g if t == 0 else g_first
        s = model.update(g, keys)
    grads = torch.autograd.grad(mu.mse_loss(s[-1], y), model.params() + g_first,
                                allow_unused=True)
    grads = [torch.zeros_like(v) if gr is None else gr
             for v, gr in zip(model.params() + g_first, grads)]
    n = len(model.params())
    return [-gr for gr in grads[:n]], [-x.shape[0] * gr for gr in grads[n:]]


@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
def test_linear_time_bptt_equals_truncated_runs(dataset):
    model, x, y = tiny(dataset, act="my_sigmoid")  # not converged: the identity holds anyway
    T, K = 12, 6
    result = gdu.gdu_check(model, x, y, T, K, beta=0.01, estimator="one-sided")
    pnames, snames = model.param_names(), gdu.neuron_names(model)
    for k in range(1, K + 1):
        theta, pre = truncated_bptt(model, x, y, T, k)
        for name, ref in zip(pnames, theta):
            cumulative = result["bptt"][name][:k].sum(0)
            torch.testing.assert_close(cumulative, ref, rtol=1e-10, atol=1e-13)
        for name, ref in zip(snames, pre):  # neurons: the k-th-to-last step's own gradient
            torch.testing.assert_close(result["bptt"][name][k - 1], ref, rtol=1e-10, atol=1e-13)


def test_check_leaves_the_model_alone_and_honours_dtype():
    model, x, y = tiny("IMDB")
    model = model.float()
    before = [p.detach().clone() for p in model.params()]
    result = gdu.gdu_check(model, x.float(), y, T=10, K=4, beta=0.01, dtype="float64")
    assert result["dtype"] == "float64"
    assert all(v.dtype == torch.float64 for v in result["bptt"].values())
    for p, b in zip(model.params(), before):
        assert p.dtype == torch.float32 and torch.equal(p, b) and p.grad is None
    result32 = gdu.gdu_check(model, x, y, T=10, K=4, beta=0.01, dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in result32["ep_sym"].values())


def test_bad_arguments_are_clear_errors():
    model, x, y = tiny("IMDB")
    with pytest.raises(ValueError, match="K <= T"):
        gdu.gdu_check(model, x, y, T=5, K=6, beta=0.1)
    with pytest.raises(ValueError, match="nonzero beta"):
        gdu.gdu_check(model, x, y, T=5, K=2, beta=0.0)


def test_metric_definitions():
    ep = torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.0, 1.0]])  # [K=2, 3 entries]
    bptt = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, -3.0]])
    # cumulative: EP [[1,0,-2],[1,0,-1]], BPTT [[1,0,1],[1,0,-2]]
    assert gdu.rel_rmse(ep, bptt) == pytest.approx(10 ** 0.5 / 7 ** 0.5)
    assert gdu.rel_rmse(torch.zeros(2, 3), torch.zeros(2, 3)) == 0.0
    # final EP [1, 0, -1] vs BPTT [1, 0, -2]: the zero entry agrees (both exactly zero)
    assert gdu.sign_agreement(ep, bptt) == 1.0
    assert gdu.sign_agreement(ep, -bptt) == pytest.approx(1 / 3)


def test_convergence_trace_and_conditions():
    model, x, y = converged("SNLI")
    trace = gdu.convergence_trace(model, x, 60)
    assert len(trace["delta"]) == len(trace["phi"]) == len(trace["rel"]) == 60
    assert trace["delta"][-1] < 1e-10 < trace["delta"][0]
    assert "below 1e-06 from step" in gdu.format_convergence(trace)
    assert "never below" in gdu.format_convergence(gdu.convergence_trace(model, x, 2))
    # the same measure as --tol and the GDU check's residual
    drive, keys = model.precompute(x)
    with torch.no_grad():
        s, used = mu.relax(model, model.init_states(x.shape[0], dtype=x.dtype), drive, keys, 60, tol=1e-6)
    assert used == next(t + 1 for t, r in enumerate(trace["rel"]) if r < 1e-6)
    good = gdu.gdu_check(model, x, y, 60, 10, 0.01, True)
    lines = gdu.format_conditions(good).splitlines()
    assert len(lines) == 2 and "fixed point: yes" in lines[0] and "small beta: yes" in lines[1]
    bad = gdu.format_conditions(gdu.gdu_check(model, x, y, 3, 2, 0.5, True))
    assert "fixed point: NO" in bad and "raise --T" in bad and "small beta: NO" in bad and "--betas 0 0.01" in bad


def args_for(**kw):
    parser = gdu.add_gdu_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.gdu_dtype, args.gdu_samples) == ("float64", 16)
    for k, v in {"T": 40, "K": 8, "betas": [0.0, 0.01], "thirdphase": True, "save": False,
                 **kw}.items():
        setattr(args, k, v)
    return args


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dataset,thirdphase", [("IMDB", True), ("SNLI", False)])
def test_run_gducheck_writes_metrics_and_plots(tmp_path, dataset, thirdphase):
    model, x, y = converged(dataset)
    out, lines = tmp_path / "run", []
    metrics = gdu.run_gducheck(model, x, y, args_for(save=True, thirdphase=thirdphase), str(out),
                               log=lines.append)
    saved = json.loads((out / "gdu_metrics.json").read_text())
    assert saved == metrics
    assert set(saved) == {"layers", "T", "K", "betas", "estimator"}
    assert (saved["T"], saved["K"], saved["betas"]) == (40, 8, [0.0, 0.01])
    assert list(saved["layers"]) == model.param_names() + gdu.neuron_names(model)
    expected = METRIC_KEYS if thirdphase else {k for k in METRIC_KEYS if k.endswith("_one_sided")}
    assert all(set(m) == expected for m in saved["layers"].values())
    text = "\n".join(lines)
    assert "free phase over T=40 steps" in text and "relRMSE" in text and "GDU conditions" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    expected_pngs = {f"gdu_{n}.png" for n in model.param_names()} | {
        "gdu_summary.png", "convergence.png",
        "gdu_symmetric_gain.png" if thirdphase else "gdu_rel_rmse.png"}
    assert set(pngs) == expected_pngs
    for name in pngs:
        assert (out / name).stat().st_size > 1000 and is_png(out / name)
    assert not list(out.glob(".tmp_*"))


@pytest.mark.parametrize("estimator", list(mu.ESTIMATORS))
def test_every_estimator_has_its_curves_and_matches_bptt(estimator):
    """The check runs the estimator's nudged phases (the same family as training), draws a
    curve per phase and the estimator's own, and that curve matches BPTT at a fixed point."""
    model, x, y = converged("IMDB")
    result = gdu.gdu_check(model, x, y, T=80, K=15, beta=1e-3, estimator=estimator)
    runs = {"one-sided": ["one-sided"], "one-sided-negative": ["one-sided-negative"],
            "symmetric": list(gdu.CURVES)}[estimator]
    assert gdu.curves_in(result) == runs and result["estimator"] == estimator
    metrics = gdu.gdu_metrics(result)
    suffix = gdu.CURVES[estimator][1]
    for name, m in metrics["layers"].items():
        assert m[f"rel_rmse_{suffix}"] < 0.05, (name, m)
    assert f"relRMSE {dict(symmetric='sym').get(estimator, '+β' if estimator == 'one-sided' else '−β')}" \
        in gdu.format_table(metrics)


def test_run_gducheck_without_save_writes_only_json(tmp_path):
    model, x, y = converged("IMDB")
    gdu.run_gducheck(model, x, y, args_for(gdu_dtype="float32"), str(tmp_path / "r"),
                     log=lambda s: None)
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["gdu_metrics.json"]


def test_following_a_subset_of_entries_equals_the_full_check_there(tmp_path):
    model, x, y = tiny("SNLI")
    full = gdu.gdu_check(model, x, y, T=10, K=4, beta=0.01)
    part = gdu.gdu_check(model, x, y, T=10, K=4, beta=0.01, max_entries=20)
    big = [n for n in model.param_names() if math.prod(full["shapes"][n]) > 20]
    assert big and sorted(part["entries"]) == sorted(big) and not full["entries"]
    for name in big:
        idx = part["entries"][name]
        assert len(idx) == 20
        for key in ("bptt", "ep_pos", "ep_neg", "ep_sym"):
            torch.testing.assert_close(part[key][name], full[key][name].flatten(1)[:, idx])
    metrics = gdu.gdu_metrics(part)
    assert metrics["layers"][big[0]]["entries_followed"] == 20
    assert gdu.plot_gdu(part, tmp_path)  # titles map subset entries back to tensor indices
