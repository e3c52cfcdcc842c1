"""The engine's mathematics as checks: closed form = autograd, EP = BPTT, training learns."""
import pytest
import torch

import loops
import model_utils as mu
from conftest import tiny_model
import ops

torch.set_num_threads(2)


def tiny(dataset, L=4, D=5, fc=(7, 3), act="my_sigmoid", dtype=torch.float64, seed=0):
    return tiny_model(dataset, tuple(fc[:-1]), act, dtype, L=L, D=D, seed=seed)


def random_state(model, B, dtype=torch.float64):
    return [torch.rand_like(t) for t in model.init_states(B, dtype=dtype)]


@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_closed_form_state_gradient_equals_autograd(dataset, beta, device):
    model, x, y = [t.to(device) for t in tiny(dataset)]
    s = [t.to(device).requires_grad_(True) for t in random_state(model, 3)]
    auto = torch.autograd.grad(model.phi(x, s, beta, y).sum(), s)
    drive, _ = model.precompute(x)
    closed = model.grad_states([t.detach() for t in s], drive, beta, y)
    for a, c in zip(auto, closed):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


class Skip(mu.Term):
    """⟨s_hi, V vec(s_lo)⟩, no bias: a new layer type, written as in docs/code.md."""

    def __init__(self, lo, hi, n_lo, n_hi):
        self.layers, self.size = (lo, hi), n_lo * n_hi

    def value(self, s, ctx, prm):
        lo, hi = self.layers
        return (s[hi] * (s[lo].flatten(1) @ prm[0].t())).sum(1)

    def grad(self, k, src, ctx, prm, acc):
        lo, hi = self.layers
        if k == hi:
            return mu.linear(src[lo].flatten(1), prm[0], add=acc)
        return mu.linear(src[hi], prm[0].t(), add=acc)

    def delta(self, k, d, ctx, prm, acc):
        return self.grad(k, d, ctx, prm, acc)  # linear in the states

    def hebbian(self, s, s_ref, diff, ctx, prm):
        lo, hi = self.layers
        B, pre = s[lo].shape[0], s[lo].flatten(1)
        h = diff[hi].t() @ pre
        if s_ref is not None:
            h = h + s_ref[hi].t() @ diff[lo].flatten(1)
        return [h / B]

    def flops(self, B):
        return 4 * B * self.size, 2 * B * self.size


def with_skip(dataset):
    """The tiny model of `dataset` with a `Skip` term added (every term type there is)."""
    model, x, y = tiny(dataset)
    n_lo, n_hi = model.P * model.L * model.D, model.n_classes
    model.add_term("skip", Skip(0, len(model.fc_layers), n_lo, n_hi),
                   torch.nn.Parameter(0.1 * torch.randn(n_hi, n_lo, dtype=x.dtype)))
    return model, x, y


def term_cases():
    """(dataset, term index, term type) for every term of both datasets' Φ, and the test's Skip."""
    return [(ds, i, type(t).__name__) for ds in ("IMDB", "SNLI") for i, t in enumerate(with_skip(ds)[0].terms)]


@pytest.mark.parametrize("dataset,i,kind", term_cases())
def test_every_term_matches_autograd_of_its_value(dataset, i, kind):
    """Each interaction term on its own, whatever its type: its closed-form state gradients,
    its change under an offset δ (what the nudged phases run on) and its Hebbian terms, single
    and as a difference, equal autograd of its value (float64)."""
    model, x, y = with_skip(dataset)
    term, prm = model.terms[i], model.term_params()[i]
    s = [t.requires_grad_(True) for t in random_state(model, 3)]
    d = [0.1 * t for t in random_state(model, 3)]
    beta0, beta = 0.1, 0.3
    ctx = {"drive": model.precompute(x)[0], "keys": None, "beta": beta, "y": y, "x": model.inputs(x)}
    auto = torch.autograd.grad(term.value(s, ctx, prm).sum(), [s[k] for k in term.layers])
    zero = lambda k: torch.zeros_like(s[k].detach().flatten(1))  # noqa: E731
    with torch.no_grad():
        for k, a in zip(term.layers, auto):
            torch.testing.assert_close(term.grad(k, s, ctx, prm, zero(k)).view_as(a), a, rtol=1e-10, atol=1e-12)
            moved = term.grad(k, [a_ + b for a_, b in zip(s, d)], ctx, prm, zero(k))
            ctx0 = dict(ctx, beta=beta0)
            nudge = (beta - beta0) * (mu.one_hot(y, s[-1]) - s[-1])
            got = term.delta(k, d, dict(ctx, nudge=nudge), prm, zero(k))
            torch.testing.assert_close(got, moved - term.grad(k, s, ctx0, prm, zero(k)), rtol=1e-10, atol=1e-12)
    s = [t.detach() for t in s]
    s2 = [a + b for a, b in zip(s, d)]
    if not prm:
        assert term.hebbian(s, None, s, ctx, prm) == []
        return
    ctx["drive"] = model.precompute(x)[0]  # with the graph to U
    g = torch.autograd.grad(term.value(s, ctx, prm).mean(), prm, retain_graph=True)
    g2 = torch.autograd.grad(term.value(s2, ctx, prm).mean(), prm)
    for a, h, a2, h2 in zip(g, term.hebbian(s, None, s, ctx, prm), g2,
                            term.hebbian(s2, s, [a - b for a, b in zip(s2, s)], ctx, prm)):
        torch.testing.assert_close(h, a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h2, a2 - a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
def test_a_new_term_type_joins_phi_through_add_term(dataset):
    """A skip connection from the projection states to the output, added with one call: the
    closed-form dynamics, the Hebbian estimate and the EP update all include it."""
    model, x, y = tiny(dataset)
    n_lo, n_hi = model.P * model.L * model.D, model.n_classes
    v = torch.nn.Parameter(0.1 * torch.randn(n_hi, n_lo, dtype=x.dtype))
    model.add_term("skip", Skip(0, len(model.fc_layers), n_lo, n_hi), v)
    assert model.params()[-1] is v and model.param_names()[-1] == "skip.0"
    assert len(model.layer_groups()) == model.P + len(model.fc) + 1
    s = [t.requires_grad_(True) for t in random_state(model, 3)]
    auto = torch.autograd.grad(model.phi(x, s, 0.3, y).sum(), s)
    drive, keys = model.precompute(x)
    for a, c in zip(auto, model.grad_states([t.detach() for t in s], drive, 0.3, y)):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    s = [t.detach() for t in s]
    for a, h in zip(torch.autograd.grad(model.phi(x, s).mean(), model.params()), model.hebbian(x, s)):
        torch.testing.assert_close(h, a, rtol=1e-10, atol=1e-12)
    for a, b in zip(model.step(s, drive, keys, 0.2, y), model.step_reference(x, s, keys, 0.2, y)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    mu.ep_gradients(model, x, y, 30, 10, (0.0, 0.1), "symmetric")
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert model.flops(3)[0] == type(model)(dataset, model.L, model.D, model.fc_layers).flops(3)[0] + 4 * 3 * n_lo * n_hi


def test_flops_count_every_term():
    """The step's work count is the sum over the terms and units: IMDB with L=4, D=5, FC 7, 2."""
    model, _, _ = tiny("IMDB")
    B, (step, hebb) = 3, model.flops(3)
    fc = 2 * B * (4 * 5 * 7 + 7 * 2)  # forward of each dense layer; feedback equally
    assert step == 2 * fc + 2 * (2 * B * 4 * 4 * 5)
    assert hebb == 2 * B * 4 * 5 * 5 + fc


@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
def test_fast_step_equals_autograd_reference_step(dataset):
    model, x, y = tiny(dataset)
    s = random_state(model, 3)
    drive, keys = model.precompute(x)
    for a, b in zip(model.step(s, drive, keys, 0.2, y), model.step_reference(x, s, keys, 0.2, y)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
def test_hebbian_equals_autograd_param_gradient(dataset, device):
    model, x, y = [t.to(device) for t in tiny(dataset)]
    s = [t.to(device) for t in random_state(model, 3)]
    auto = torch.autograd.grad(model.phi(x, s).mean(), model.params())
    for a, h in zip(auto, model.hebbian(x, s)):
        torch.testing.assert_close(h, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("thirdphase", [False, True])
def test_ep_update_is_difference_of_autograd_param_gradients(thirdphase):
    model, x, y = tiny("SNLI")
    T, K, betas = 30, 10, (0.0, 0.1)
    mu.ep_gradients(model, x, y, T, K, betas, thirdphase)
    got = [p.grad.clone() for p in model.params()]
    drive, keys = model.precompute(x)
    with torch.no_grad():
        s0, _ = mu.relax(model, model.init_states(3, dtype=x.dtype), drive, keys, T)
        sp, _ = mu.relax(model, s0, drive, keys, K, 0.1, y)
        sm, _ = mu.relax(model, s0, drive, keys, K, -0.1, y) if thirdphase else (s0, 0)
    ga = torch.autograd.grad(model.phi(x, sp).mean(), model.params())
    gb = torch.autograd.grad(model.phi(x, sm).mean(), model.params())
    scale = 0.2 if thirdphase else 0.1
    for g, a, b in zip(got, ga, gb):
        torch.testing.assert_close(g, -(a - b) / scale, rtol=1e-9, atol=1e-12)


def converged_problem(dataset, seed=0):
    # Small weights make the dynamics a contraction, so the free phase reaches its fixed point.
    model, x, y = tiny(dataset, act="my_sigmoid", seed=seed)
    with torch.no_grad():
        for p in model.params():
            p.mul_(0.5)
    return model, x, y


@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
def test_free_phase_converges_to_a_fixed_point(dataset):
    model, x, y = converged_problem(dataset)
    drive, keys = model.precompute(x)
    with torch.no_grad():
        s, used = mu.relax(model, model.init_states(3, dtype=x.dtype), drive, keys, 200, tol=1e-12)
        nxt = model.step(s, drive, keys)
    assert used < 200
    for a, b in zip(s, nxt):
        assert (a - b).abs().max() < 1e-10


def bptt_reference_gradient(model, x, y, T):
    """Gradient of the loss at the free-phase fixed point, by autograd through all T steps."""
    model.zero_grad(set_to_none=True)
    drive, keys = model.precompute(x)
    s = model.init_states(x.shape[0], x.device, x.dtype)
    for _ in range(T):
        s = model.step(s, drive, keys)
    mu.mse_loss(s[-1], y).backward()
    return [p.grad.clone() for p in model.params()]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
def test_three_phase_ep_matches_bptt_and_beats_two_phase(dataset, device):
    model, x, y = [t.to(device) for t in converged_problem(dataset)]
    ref = bptt_reference_gradient(model, x, y, T=150)
    errs = {}
    for third in (False, True):
        mu.ep_gradients(model, x, y, T=150, K=100, betas=(0.0, 0.05), estimator=third)
        errs[third] = [rel_err(p.grad, r) for p, r in zip(model.params(), ref)]
    assert max(errs[True]) < 0.02, errs[True]
    assert sum(errs[True]) < sum(errs[False])
    for e3, e2 in zip(errs[True], errs[False]):
        assert e3 < e2


def test_bptt_gradients_match_autograd_through_all_steps():
    model, x, y = converged_problem("IMDB")
    ref = bptt_reference_gradient(model, x, y, T=60)
    mu.bptt_gradients(model, x, y, T=60, K=60)
    for p, r in zip(model.params(), ref):
        torch.testing.assert_close(p.grad, r)


def test_activations():
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0])
    torch.testing.assert_close(ops.my_hard_sig(x), (x / 2).clamp(0, 1))
    torch.testing.assert_close(ops.hard_sigmoid(x), x.clamp(0, 1))
    torch.testing.assert_close(ops.my_sigmoid(x), 1 / (1 + torch.exp(-4 * (x - 0.5))))
    assert ops.ACTIVATIONS["mysig"] is ops.my_sigmoid


def test_wrong_number_of_learning_rates_is_a_clear_error():
    model, _, _ = tiny("SNLI", dtype=torch.float32)
    with pytest.raises(ValueError, match="needs 6 learning rates"):
        loops.make_optimizer(model, [0.1] * 3)


class Split:
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.labels)


def synthetic_sequences(n, L=6, V=8, seed=0):
    """Class = whether token 1 ('good') occurs more often than token 2 ('bad')."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, L), generator=g)
    good, bad = (ids == 1).sum(1), (ids == 2).sum(1)
    keep = good != bad
    return Split(ids[keep].int(), (good > bad)[keep].long())


@pytest.mark.parametrize("alg", ["EP", "BPTT"])
def test_training_learns_a_synthetic_sequence_task(alg):
    torch.manual_seed(0)
    train, test = synthetic_sequences(600, seed=1), synthetic_sequences(300, seed=2)
    emb = torch.randn(8, 4)
    emb[0] = 0
    model = mu.EPNet("IMDB", 6, 4, [32, 2], "my_hard_sig")  # centred biases: all units start active
    opt = loops.make_optimizer(model, [0.005, 0.005, 0.005])
    hp = {"alg": alg, "T": 20, "K": 8, "betas": (0.0, 0.2), "estimator": "symmetric",
          "batch_size": 20, "tol": None}
    for epoch in range(15):
        loops.train_epoch(model, opt, train, emb, hp, torch.Generator().manual_seed(epoch))
    assert loops.evaluate(model, test, emb, 20, 100) > 0.9
