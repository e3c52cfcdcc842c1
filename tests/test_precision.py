"""EP's estimate is a small difference of two nudged states: these checks hold its precision.

The nudged phases run on δ = s − s0 (`EPNet.delta_step`), the activations and the attention
move by exact differences (`ACTIVATION_DELTAS`, `softmax_delta`) and the Hebbian term is a
difference form, so float32 EP agrees with float64 EP to about 1e-6 on a trained model."""
from pathlib import Path

import numpy as np
import pytest
import torch

import devices
import model_utils as mu
from conftest import tiny_model
import ops

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("act", sorted(ops.ACTIVATIONS))
def test_activation_delta_is_the_difference(act):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, generator=g, dtype=torch.float64) * 2 + 0.5
    d = torch.randn(4000, generator=g, dtype=torch.float64) * torch.logspace(-9, 0, 4000, dtype=torch.float64)
    a[:5] = torch.tensor([0.0, 1.0, 2.0, -0.3, 2.2], dtype=torch.float64)  # on and near the kinks
    f = ops.ACTIVATIONS[act]
    exact = f(a + d) - f(a)
    got = ops.ACTIVATION_DELTAS[act](a, d)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-15)
    # float32: the difference keeps the relative precision of d (a + d would not)
    got32 = ops.ACTIVATION_DELTAS[act](a.float(), d.float()).double()
    small = d.abs() < 1e-6
    ref = ops.ACTIVATION_DELTAS[act](a.float().double(), d.float().double())
    assert ((got32 - ref).abs() <= 1e-5 * ref.abs() + 1e-30)[small].float().mean() > 0.99


def test_softmax_delta_is_the_difference_also_for_large_moves():
    g = torch.Generator().manual_seed(1)
    S0 = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 3
    for scale in (1e-8, 1e-3, 1.0, 100.0):
        ds = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * scale
        exact = torch.softmax(S0 + ds, -1) - torch.softmax(S0, -1)
        got = ops.softmax_delta(torch.softmax(S0, -1), ds)
        torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-13 * max(scale, 1.0))
    # float32 where e^ds overflows (ds > 88): the row-shifted form, still the exact difference
    S0, ds = S0.float(), torch.randn(3, 5, 7, generator=g) * 100.0
    ds[0, 0, 0] = 200.0
    exact = (torch.softmax(S0.double() + ds.double(), -1) - torch.softmax(S0.double(), -1)).float()
    torch.testing.assert_close(ops.softmax_delta(torch.softmax(S0, -1), ds), exact, rtol=1e-4, atol=1e-6)


def test_retrieval_delta_is_the_difference_of_the_retrievals():
    """The nudged step's form, (softmax(S0 + dq·Kᵀ) − softmax(S0))·K with the subtraction on
    [L, D]: exact in float64 for small and large moves, and through the overflow path."""
    g = torch.Generator().manual_seed(2)
    K = torch.randn(3, 2, 7, 5, generator=g, dtype=torch.float64)
    S0 = torch.randn(3, 2, 7, 7, generator=g, dtype=torch.float64) * 2
    p0 = torch.softmax(S0, -1)
    for scale in (1e-9, 1e-3, 1.0, 30.0):
        dq = torch.randn(3, 2, 7, 5, generator=g, dtype=torch.float64) * scale
        exact = (torch.softmax(S0 + dq @ K.transpose(-1, -2), -1) - p0) @ K
        got = ops.retrieval_delta(p0, p0 @ K, dq, K)
        torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-12 * max(scale, 1.0))
    S0, K, dq = S0.float(), K.float(), torch.zeros(3, 2, 7, 5)
    dq[0, 0, 0] = 100.0 * K[0, 0, 0]  # ds of key 0 = 100·|K_0|² > 88: e^ds overflows in float32
    p0 = torch.softmax(S0, -1)
    exact = ((torch.softmax(S0.double() + (dq @ K.transpose(-1, -2)).double(), -1) - p0.double())
             @ K.double()).float()
    torch.testing.assert_close(ops.retrieval_delta(p0, p0 @ K, dq, K), exact, rtol=1e-4, atol=1e-5)



def test_retrieval_delta_with_bfloat16_keys_rounds_relative_to_the_change():
    """--bf16-matmul's nudged retrieval: the two products with bfloat16 copies of the keys,
    the result in the offsets' dtype and close to the exact change relative to itself, for
    small and large moves (the rounding follows δ, not the states), through the overflow path too."""
    g = torch.Generator().manual_seed(3)
    K = torch.randn(3, 2, 40, 16, generator=g)
    p0 = torch.softmax(torch.randn(3, 2, 30, 40, generator=g) * 2, -1)
    for scale in (1e-6, 1e-3, 1e-1, 100.0):
        dq = torch.randn(3, 2, 30, 16, generator=g) * scale
        exact = ops.retrieval_delta(p0.double(), (p0 @ K).double(), dq.double(), K.double())
        got = ops.retrieval_delta(p0, p0 @ K, dq, K.bfloat16())
        assert got.dtype == torch.float32
        err = ((got.double() - exact).norm() / exact.norm()).item()
        assert 1e-6 < err < 2e-2, (scale, err)   # bfloat16 products: close, not float32-exact


def tiny(dataset, act, seed=0):
    return tiny_model(dataset, (7,) if dataset == "SNLI" else (7, 5), act, seed=seed)


@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
@pytest.mark.parametrize("act", ["my_hard_sig", "my_sigmoid", "tanh", "hard_sigmoid"])
@pytest.mark.parametrize("beta0", [0.0, 0.1])
def test_delta_nudged_phase_equals_plain_steps(dataset, act, beta0):
    """s0 + δ after K delta steps = K plain steps from s0, also from an unconverged s0 and β1 ≠ 0."""
    model, x, y = tiny(dataset, act)
    with torch.no_grad():
        drive, keys = model.precompute(x)
        s0, _ = mu.relax(model, model.init_states(3, dtype=x.dtype), drive, keys, 7, beta0, y)
        setup = model.nudged_setup(s0, drive, keys, beta0, y)
        for beta in (0.3, -0.3):
            plain, _ = mu.relax(model, s0, drive, keys, 9, beta, y)
            d, _ = mu.relax_nudged(model, s0, setup, keys, 9, beta, beta0, y)
            for a, b, c in zip(plain, s0, d):
                torch.testing.assert_close(b + c, a, rtol=1e-10, atol=1e-12)


def test_hebbian_difference_form_is_accurate_in_float32():
    """The FC Hebbian difference of two nearly equal states, float32 against float64."""
    torch.manual_seed(0)
    model = mu.EPNet("IMDB", 6, 8, [300, 40, 2], "my_hard_sig")
    x = torch.randn(64, 6, 8)
    s = [torch.rand_like(t) for t in model.init_states(64)]
    d = [1e-4 * torch.randn_like(t) for t in s]
    s2 = [a + b for a, b in zip(s, d)]
    h32 = model.hebbian(x, s2, s, d)
    m64 = model.double()
    h64 = m64.hebbian(x.double(), [t.double() for t in s2], [t.double() for t in s], [t.double() for t in d])
    for a, b in zip(h32, h64):
        assert rel(a, b) < 1e-6


def load_shipped(name):
    folder = ROOT / "saved_models" / name
    if not (folder / "best_model.pt").is_file():
        pytest.skip(f"{folder} is absent")
    ckpt = torch.load(folder / "best_model.pt", map_location="cpu", weights_only=True)
    with np.load(folder / "embeddings.npz", allow_pickle=False) as f:
        vectors = torch.from_numpy(f["vectors"]).float()
    return ckpt, torch.cat([torch.zeros(1, vectors.shape[1]), vectors])


@pytest.mark.parametrize("name,B", [("test_SNLI_25_300", 16), ("test_IMDB_400_100", 8)])
def test_float32_ep_estimate_matches_float64_on_a_trained_model(name, B, device):
    """A trained model's EP gradient in float32 is within 1e-5 (relative) of float64 on every layer."""
    ckpt, vectors = load_shipped(name)
    cfg, hyper = ckpt["config"]["model"], ckpt["config"]["hyper"]
    g = torch.Generator().manual_seed(0)
    shape = (B, cfg["seq_len"]) if cfg["dataset"] == "IMDB" else (B, 2, cfg["seq_len"])
    ids = torch.randint(1, min(len(vectors), 3000), shape, generator=g)
    y = torch.randint(0, cfg["fc_layers"][-1], (B,), generator=g)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        model = mu.build_model(cfg)
        model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
        model = model.to(device, dtype)
        with devices.cuda_tf32(False):
            mu.ep_gradients(model, vectors[ids].to(device, dtype), y.to(device), hyper["T"], hyper["K"],
                            tuple(hyper["betas"]), True)
        grads[dtype] = [p.grad for p in model.params()]
    errs = {n: rel(a, b) for n, a, b in zip(model.param_names(), grads[torch.float32], grads[torch.float64])}
    assert max(errs.values()) < 1e-5, errs


def test_precision_tool_reports_each_policy(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("ep_precision", ROOT / "tools" / "ep_precision.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    if not (ROOT / "saved_models" / "test_SNLI_25_300" / "best_model.pt").is_file():
        pytest.skip("shipped SNLI model absent")
    assert tool.main([str(ROOT / "saved_models" / "test_SNLI_25_300"), "--batch", "2"]) == 0
    rows = {l.split("  max ")[0].strip(): float(l.split("  max ")[1].split()[0])
            for l in capsys.readouterr().out.splitlines() if "  max " in l}
    # float32's gradient error depends on the matmul kernel: 6.5e-7 with oneDNN's, 1.2e-5 with
    # MKL's F.linear (SEQLEARN_EP_NO_ONEDNN=1) here; TF32's 10-bit mantissa puts it 10x above either
    bound = 1e-5 if torch.float32 in ops.ONEDNN_DTYPES else 5e-5
    assert rows["float32"] < bound and 10 * rows["float32"] < rows["TF32 everywhere"]
    assert rows["float32"] < rows["TF32 free phase"] < rows["TF32 everywhere"]
    x = torch.tensor([1.0 + 2 ** -12, 1.0 + 2 ** -9, 3.0])
    assert tool.to_tf32(x).tolist() == [1.0, 1.0 + 2 ** -9, 3.0]
