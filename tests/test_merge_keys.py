"""--merge-keys: the Hopfield retrieval over each text's distinct tokens, each weighted by its
count, is the retrieval over all tokens (float64, to rounding), through the steps, the nudged
offsets, the EP and BPTT gradients and evaluation, with rows run in their key order and put back."""
import json

import pytest
import torch

import fixed_point as fp
import loops
import model_utils as mu
import ops
import registry

torch.set_num_threads(2)
DATASETS = ["IMDB", "SNLI"]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(ops, "CHUNK_MIN_KEYS", 8)  # the tiny problems' keys run in chunks of rows too
    monkeypatch.setattr(ops, "CHUNK_ROWS", 3)


def token_problem(dataset, B=10, L=80, D=6, vocab=25, scale=0.5, seed=0):
    """A model whose inputs are word vectors of token ids, as in training: repeated tokens and
    a padding tail (zero vectors) of a different length in every row, enough keys and
    rows for the retrieval to run in chunks of rows (`MergedKeys.chunks`, with small_chunks)."""
    torch.manual_seed(seed)
    spec = registry.get(dataset)
    model = mu.EPNet(dataset, L, D, [9, spec.n_classes], "my_sigmoid").double()
    with torch.no_grad():
        for p in model.params():
            p.mul_(scale)  # a contraction: the phases converge
    emb = torch.randn(vocab, D, dtype=torch.float64)
    emb[0] = 0.0
    shape = (B, L) if spec.n_fields == 1 else (B, spec.n_fields, L)
    ids = torch.randint(1, vocab, shape)
    for b in range(B):  # row b: b·7 padding tokens at the end, and a vocabulary of its own size
        ids[b, ..., L - 7 * b:] = 0
        ids[b] = torch.where(ids[b] > 3 + 2 * b, ids[b] % (3 + 2 * b) + 1, ids[b])
    return model, emb[ids], torch.randint(0, spec.n_classes, (B,)), ids


def test_merged_retrieval_is_the_retrieval_over_all_keys_and_never_merges_different_vectors():
    torch.manual_seed(0)
    keys = torch.randn(4, 2, 30, 5, dtype=torch.float64)
    keys[:, :, 10:20] = keys[:, :, :10]            # every vector twice ...
    keys[:, :, 25:] = 0.0                          # ... and a padding tail
    keys[0, 0, 1, 3] = torch.nextafter(keys[0, 0, 1, 3], torch.tensor(10.0, dtype=torch.float64))  # 1 ulp apart
    merged = ops.merge_keys(keys)
    assert merged.values.shape[-2] < 30
    counts = merged.bias.exp().sum(-1).squeeze(-1)
    torch.testing.assert_close(counts, torch.full((4, 2), 30.0, dtype=torch.float64))
    distinct = [len({tuple(v.tolist()) for v in keys[b, j]}) for b in range(4) for j in range(2)]
    assert torch.isfinite(merged.bias).sum(-1).flatten().tolist() == distinct  # the ulp pair stays apart
    assert merged.counts.tolist() == [max(distinct[2 * b:2 * b + 2]) for b in range(4)]
    distinct = keys[:, :, 20:25]  # nothing to merge: the keys come back as they are
    assert ops.merge_keys(distinct) is distinct
    units = ops.HopfieldUnits(2, 30, 5, 0.7)
    g = torch.randn(4, 2 * 30 * 5, dtype=torch.float64)
    torch.testing.assert_close(units.update(g, {"keys": merged}), units.update(g, {"keys": keys}),
                               rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dataset", DATASETS)
def test_merged_keys_give_the_same_steps_and_nudged_offsets(dataset):
    model, x, y, _ = token_problem(dataset)
    drive, keys = model.precompute(x, merge=False)
    _, merged = model.precompute(x, merge=True)
    assert merged.values.shape[-2] < keys.shape[-2]
    assert len(merged.chunks()) == 3  # the runs of rows are exercised
    s = [torch.rand_like(t) for t in model.init_states(x.shape[0], dtype=x.dtype)]
    with torch.no_grad():
        for name in ("step", "step_fc"):
            for a, b in zip(getattr(model, name)(s, drive, merged, 0.3, y), getattr(model, name)(s, drive, keys, 0.3, y)):
                torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
        setups = [model.nudged_setup(s, drive, k, 0.0, y) for k in (merged, keys)]
        d = [1e-3 * torch.randn_like(t) for t in s]
        nudge = 0.2 * (ops.one_hot(y, s[-1]) - s[-1])
        beta = torch.tensor(0.2, dtype=x.dtype)
        a, b = (model.delta_step(d, st, k, beta, nudge) for st, k in zip(setups, (merged, keys)))
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("fast", [False, True])
def test_ep_gradients_and_outputs_with_merged_keys_equal_the_full_ones(dataset, fast):
    model, x, y, _ = token_problem(dataset)
    kw = dict(tol=1e-12, anderson=5, tol_nudged=1e-10, sample_exit=True) if fast else {}
    T, K = (200, 150) if fast else (20, 8)
    out, info = mu.ep_gradients(model, x, y, T, K, (0.0, 0.1), True, **kw)
    want = [p.grad.clone() for p in model.params()]
    model.merge_keys = True
    order = model.key_order(model.precompute(x)[1])
    assert not torch.equal(order, torch.arange(len(order)))  # the rows run in another order ...
    out_m, info_m = mu.ep_gradients(model, x, y, T, K, (0.0, 0.1), True, **kw)
    torch.testing.assert_close(out_m, out, rtol=1e-10, atol=1e-12)  # ... and come back in the caller's
    for a, b in zip(info_m["free_fc"], info["free_fc"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for p, w in zip(model.params(), want):
        assert (p.grad - w).norm() <= 1e-8 * w.norm()


def test_bptt_and_evaluation_with_merged_keys_equal_the_full_ones():
    model, x, y, ids = token_problem("IMDB")
    emb = torch.zeros(int(ids.max()) + 1, x.shape[-1], dtype=x.dtype)
    emb[ids.flatten()] = x.reshape(-1, x.shape[-1])
    outs, grads = [], []
    for merge in (False, True):
        model.merge_keys = merge
        out, _ = mu.bptt_gradients(model, x, y, 12, 5)
        grads.append([p.grad.clone() for p in model.params()])
        outs.append(loops.predict_outputs(model, ids, emb, 15, batch_size=9))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        assert (a - b).norm() <= 1e-9 * b.norm()


def test_sample_exit_keeps_merged_keys_aligned_with_their_rows():
    model, x, y, _ = token_problem("IMDB")
    drive, keys = model.precompute(x, merge=True)
    rows = torch.tensor([1, 4, 7])
    taken = fp._take((drive, keys), rows)[1]
    assert isinstance(taken, ops.MergedKeys)
    assert torch.equal(taken.values, keys.values[rows]) and torch.equal(taken.counts, keys.counts[rows])
    both = fp._repeat(keys, 2)
    assert isinstance(both, ops.MergedKeys) and both.bias.shape[0] == 2 * x.shape[0]
    assert torch.equal(both.values[1::2], keys.values)   # each row twice, next to each other


def test_merge_keys_through_main_is_part_of_fast_recorded_and_can_be_turned_off(tiny_imdb, capsys):
    import main
    from test_main import base_args
    tmp = tiny_imdb["tmp"]
    assert main.main(base_args(tiny_imdb, "--fast", "--epochs", "1", "--save", "--results-dir",
                               str(tmp / "fast"))) == 0
    assert json.loads((tmp / "fast" / "config.json").read_text())["hyper"]["merge_keys"] is True
    assert main.main(base_args(tiny_imdb, "--fast", "--no-merge-keys", "--epochs", "1", "--save",
                               "--results-dir", str(tmp / "nomerge"))) == 0
    assert json.loads((tmp / "nomerge" / "config.json").read_text())["hyper"]["merge_keys"] is False
    assert main.main(base_args(tiny_imdb, "--merge-keys", "--alg", "BPTT", "--epochs", "1")) == 0
    capsys.readouterr()
    assert main.main(["--execute", "test", "--load-path", str(tmp / "fast"), "--data-dir",
                      str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"])]) == 0
    recorded = json.loads((tmp / "fast" / "metrics.json").read_text())["test_accuracy"]
    assert f"test accuracy {recorded:.4f}" in capsys.readouterr().out


def test_merged_nudged_offset_through_the_overflow_path():
    """A move of the queries so large that e^ds overflows in float32 in one row: the merged
    retrieval's offsets (the overflow path in that row's run of rows) still equal the
    difference of the retrievals over all keys."""
    torch.manual_seed(1)
    keys = torch.randn(6, 1, 40, 5)
    keys[:, :, 20:] = keys[:, :, :20]  # every vector twice
    merged = ops.merge_keys(keys)
    units = ops.HopfieldUnits(1, 40, 5, 1.0)
    g0 = 0.3 * torch.randn(6, 40 * 5)
    dg = 1e-3 * torch.randn(6, 1, 40, 5)
    dg[2, 0, 3] = 100.0 * keys[2, 0, 0]  # ds = 100·|k|² > 88 for row 2's query 3
    with torch.no_grad():
        exact = (units.update(g0.double() + dg.flatten(1).double(), {"keys": keys.double()})
                 - units.update(g0.double(), {"keys": keys.double()})).float()
        ctx = {"keys": merged}
        aux, _ = units.linearise(g0, ctx)
        got = units.delta(g0, aux, dg, ctx)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-5)
