"""The mathematics against independent definitions: plain loops from the formulas of Φ, the
Hopfield retrieval and the SNLI pairing, hand-truncated autograd for BPTT, the layer mapping of
--lrs and the cosine schedule, word dropout, and two-phase EP with β1 ≠ 0. None of these reuse the code path
they check."""
import json
import math

import pytest
import torch

import loops
import main
import model_utils as mu
from test_main import base_args, weights

torch.set_num_threads(2)

# docs/method.md §1: s1 queries p and attends over h, s2 h over p, s3 p over p, s4 h over h.
SNLI_PAIRS = [("p", "h"), ("h", "p"), ("p", "p"), ("h", "h")]


def snli_problem(seed=0, B=2, L=3, D=4, fc=(5, 3)):
    torch.manual_seed(seed)
    model = mu.EPNet("SNLI", L, D, list(fc), "my_sigmoid").double()
    x = torch.randn(B, 2, L, D, dtype=torch.float64)
    s = [torch.rand_like(t) for t in model.init_states(B, dtype=torch.float64)]
    return model, x, s


def test_snli_step_is_the_hopfield_retrieval_of_each_pair_written_as_loops():
    model, x, s = snli_problem()
    B, L, D = x.shape[0], model.L, model.D
    gamma = model.gamma
    W, Wfc = [w.detach() for w in model.proj], model.fc[0].weight.detach()
    drive, keys = model.precompute(x)
    got = model.step(s, drive, keys)[0]
    for b in range(B):
        seqs = {"p": x[b, 0], "h": x[b, 1]}
        feedback = (Wfc.t() @ s[1][b])  # [4·L·D], token axis of s1..s4 concatenated
        for j, (q, kv) in enumerate(SNLI_PAIRS):
            for i in range(L):
                g = W[j] @ seqs[q][i] + feedback[(j * L + i) * D:(j * L + i + 1) * D]
                scores = [gamma * float(g @ seqs[kv][l]) for l in range(L)]
                top = max(scores)
                w = [math.exp(v - top) for v in scores]
                want = sum(wl / sum(w) * seqs[kv][l] for l, wl in enumerate(w))
                torch.testing.assert_close(got[b, j, i], want, rtol=1e-12, atol=1e-12)


def test_snli_phi_written_as_sums():
    model, x, s = snli_problem(seed=1)
    y, beta = torch.tensor([2, 0]), 0.3
    W = [w.detach() for w in model.proj]
    (W5, b5), (W6, b6) = [(l.weight.detach(), l.bias.detach()) for l in model.fc]
    got = model.phi(x, s, beta, y)
    for b in range(x.shape[0]):
        seqs = {"p": x[b, 0], "h": x[b, 1]}
        want = sum(float(s[0][b, j, i] @ (W[j] @ seqs[q][i]))
                   for j, (q, _) in enumerate(SNLI_PAIRS) for i in range(model.L))
        want += float(s[1][b] @ (W5 @ s[0][b].reshape(-1) + b5)) + float(s[2][b] @ (W6 @ s[1][b] + b6))
        target = torch.zeros(3, dtype=torch.float64)
        target[y[b]] = 1
        want -= beta * 0.5 * float(((s[2][b] - target) ** 2).sum())
        assert got[b].item() == pytest.approx(want, rel=1e-12)


def test_imdb_retrieval_attends_over_its_own_sequence():
    torch.manual_seed(2)
    model = mu.EPNet("IMDB", 3, 4, [5, 2], "my_hard_sig").double()
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    s = [torch.rand_like(t) for t in model.init_states(1, dtype=torch.float64)]
    drive, keys = model.precompute(x)
    got = model.step(s, drive, keys)[0][0, 0]
    g = x[0] @ model.proj[0].detach().t() + (model.fc[0].weight.detach().t() @ s[1][0]).view(3, 4)
    a = torch.softmax(g @ x[0].t() / math.sqrt(4), dim=1)  # γ = 1/√D for IMDB
    torch.testing.assert_close(got, a @ x[0], rtol=1e-12, atol=1e-12)


def test_gamma_defaults():
    assert mu.EPNet("IMDB", 3, 16, [4, 2]).gamma == pytest.approx(0.25)
    assert mu.EPNet("IMDB", 3, 300, [4, 2]).gamma == pytest.approx(1 / math.sqrt(300))
    assert mu.EPNet("SNLI", 3, 300, [4, 3]).gamma == pytest.approx(0.16)
    assert mu.EPNet("SNLI", 3, 300, [4, 3], gamma=0.5).gamma == 0.5


def test_lrs_map_to_layers_projections_first():
    model = mu.EPNet("SNLI", 3, 4, [6, 5, 3])
    lrs = [1e-1, 2e-1, 3e-1, 4e-1, 5e-1, 6e-1, 7e-1]
    opt = loops.make_optimizer(model, lrs)
    named = {id(p): n for n, p in model.named_parameters()}
    want = [["proj.0"], ["proj.1"], ["proj.2"], ["proj.3"], ["fc.0.weight", "fc.0.bias"],
            ["fc.1.weight", "fc.1.bias"], ["fc.2.weight", "fc.2.bias"]]
    assert [[named[id(p)] for p in g["params"]] for g in opt.param_groups] == want
    assert [g["lr"] for g in opt.param_groups] == lrs


def _cosine(epoch, t_max, lrs=(0.02, 0.01, 0.005)):
    return [1e-5 + (lr0 - 1e-5) * (1 + math.cos(math.pi * epoch / t_max)) / 2 for lr0 in lrs]


def test_cosine_schedule_values_through_main(tiny_imdb):
    run = tiny_imdb["tmp"] / "run"
    args = base_args(tiny_imdb, "--epochs", "3", "--lr-decay", "--save", "--results-dir", str(run))
    args[args.index("--lrs") + 1:args.index("--lrs") + 4] = ["0.02", "0.01", "0.005"]
    assert main.main(args) == 0
    lr = json.loads((run / "metrics.json").read_text())["lr"]
    for epoch, row in enumerate(lr):  # the rate used during each epoch, T_max 100, eta_min 1e-5
        assert row == pytest.approx(_cosine(epoch, 100), rel=1e-9)


def test_lr_decay_epochs_sets_the_cosine_and_a_resume_moves_onto_a_new_one(tiny_imdb, capsys):
    run = tiny_imdb["tmp"] / "cos"
    args = base_args(tiny_imdb, "--epochs", "2", "--lr-decay", "--lr-decay-epochs", "4", "--save",
                     "--results-dir", str(run))
    args[args.index("--lrs") + 1:args.index("--lrs") + 4] = ["0.02", "0.01", "0.005"]
    assert main.main(args) == 0
    assert json.loads((run / "config.json").read_text())["hyper"]["lr_decay_epochs"] == 4
    resume = ["--load-path", str(run), "--data-dir", str(tiny_imdb["data"]), "--epochs", "3"]
    assert main.main(resume) == 0  # the run's own cosine (T_max 4) continues; no --save: still written
    assert main.main(resume[:-1] + ["5", "--lr-decay-epochs", "5"]) == 0  # onto T_max 5 from epoch 4 on
    assert "--lr-decay-epochs 5: the cosine of this run (T_max 4) is replaced" in capsys.readouterr().out
    lr = json.loads((run / "metrics.json").read_text())["lr"]
    want = [_cosine(0, 4), _cosine(1, 4), _cosine(2, 4), _cosine(3, 5), _cosine(4, 5)]
    for row, w in zip(lr, want, strict=True):
        assert row == pytest.approx(w, rel=1e-9)
    assert main.main(resume[:-1] + ["6", "--lr-decay-epochs", "5"]) == 0  # same cosine: on past its end
    assert main.main(resume[:-1] + ["7", "--lr-decay-epochs", "4"]) == 2  # would end before epoch 6
    assert "this run has trained 6 epochs already" in capsys.readouterr().err
    assert main.main(base_args(tiny_imdb, "--lr-decay-epochs", "5")) == 2  # without --lr-decay
    assert "add --lr-decay" in capsys.readouterr().err


def test_word_dropout_removes_each_token_with_p_and_closes_up_like_oov():
    ids = torch.randint(1, 50, (300, 2, 12), dtype=torch.int32)
    ids[:, :, 9:] = 0                                   # post-padded, as data_utils stores them
    ids[::3, 1, 4:] = 0                                 # and some short hypotheses
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    out = loops.drop_words(ids, 0.3, g)
    for row, m, got in zip(ids.reshape(-1, 12).tolist(), mask.reshape(-1, 12).tolist(),
                           out.reshape(-1, 12).tolist()):
        kept = [t for t, drop in zip(row, m) if t != 0 and not drop]
        assert got == kept + [0] * (12 - len(kept))
    real = (ids != 0).sum().item()
    assert 1 - (out != 0).sum().item() / real == pytest.approx(0.3, abs=0.03)
    assert loops.drop_words(ids, 0.0, g).equal(ids)


def test_word_dropout_through_main_changes_training_only_and_is_recorded(tiny_imdb, capsys):
    tmp = tiny_imdb["tmp"]
    plain, dropped = tmp / "plain", tmp / "dropped"
    assert main.main(base_args(tiny_imdb, "--epochs", "1", "--save", "--results-dir", str(plain))) == 0
    assert main.main(base_args(tiny_imdb, "--epochs", "1", "--save", "--word-dropout", "0.3",
                               "--results-dir", str(dropped))) == 0
    assert json.loads((dropped / "config.json").read_text())["hyper"]["word_dropout"] == 0.3
    assert json.loads((plain / "config.json").read_text())["hyper"]["word_dropout"] == 0.0
    w0, w1 = (weights(d / "final_model.pt") for d in (plain, dropped))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    # evaluation sees the whole texts: --execute test on the run gives the accuracy it recorded
    rec = json.loads((dropped / "metrics.json").read_text())["test_accuracy"]
    capsys.readouterr()
    assert main.main(["--execute", "test", "--load-path", str(dropped), "--data-dir", str(tiny_imdb["data"])]) == 0
    assert f"test accuracy {rec:.4f}" in capsys.readouterr().out
    assert main.main(base_args(tiny_imdb, "--word-dropout", "1")) == 2
    assert "--word-dropout is a probability in [0, 1), got 1" in capsys.readouterr().err


@pytest.mark.parametrize("checkpoint", [0, 2])
def test_bptt_with_k_below_t_is_autograd_truncated_by_hand(checkpoint):
    torch.manual_seed(3)
    model = mu.EPNet("SNLI", 3, 4, [6, 3], "my_sigmoid").double()
    x, y = torch.randn(3, 2, 3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    T, K = 12, 5
    drive, keys = model.precompute(x)
    s = model.init_states(3, dtype=torch.float64)
    for t in range(T):  # all T steps with a graph, cut by hand after step T − K
        if t == T - K:
            s = [v.detach() for v in s]
        s = model.step(s, drive, keys)
    loss = 0.5 * sum(((s[-1][b] - torch.eye(3, dtype=torch.float64)[y[b]]) ** 2).sum() for b in range(3)) / 3
    want = torch.autograd.grad(loss, model.params())
    mu.bptt_gradients(model, x, y, T, K, checkpoint)
    for p, w in zip(model.params(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-13)


def test_two_phase_ep_with_nonzero_beta1():
    """−[∂Φ/∂θ(s^β2) − ∂Φ/∂θ(s^β1)]/(β2 − β1), where s^β1 is the free phase run at β1."""
    torch.manual_seed(4)
    model = mu.EPNet("IMDB", 3, 4, [6, 2], "my_sigmoid").double()
    x, y = torch.randn(3, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 1])
    T, K, b1, b2 = 25, 10, 0.05, 0.3
    mu.ep_gradients(model, x, y, T, K, (b1, b2), estimator="one-sided")
    got = [p.grad.clone() for p in model.params()]
    drive, keys = model.precompute(x)
    s = model.init_states(3, dtype=torch.float64)
    target = torch.nn.functional.one_hot(y, 2).double()
    with torch.no_grad():
        for _ in range(T):  # the free phase at β1, written with autograd of Φ
            with torch.enable_grad():
                v = [t.detach().requires_grad_() for t in s]
                g = torch.autograd.grad(model.phi(x, v, b1, y).sum(), v)
            s = model.update(list(g), keys)
        s1 = s
        for _ in range(K):
            with torch.enable_grad():
                v = [t.detach().requires_grad_() for t in s]
                g = torch.autograd.grad(model.phi(x, v, b2, y).sum(), v)
            s = model.update(list(g), keys)
    assert target.shape == s[-1].shape
    ga = torch.autograd.grad(model.phi(x, s).mean(), model.params())
    gb = torch.autograd.grad(model.phi(x, s1).mean(), model.params())
    for g, a, b in zip(got, ga, gb):
        torch.testing.assert_close(g, -(a - b) / (b2 - b1), rtol=1e-9, atol=1e-12)
