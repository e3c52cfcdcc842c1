"""A new dataset is one registry entry plus its reader: a synthetic sequence task added that way
trains, tests and predicts through main.py, and benchmark.py and the model take it as they take
IMDB and SNLI."""
import json
import random

import pytest
import torch

import benchmark
import main
import model_utils as mu
import registry
import sources
from conftest import write_vectors

WORDS = ["up", "down", "the", "a", "of", "and", "then", "so"]


def toy_reader(n_per_split=400, seed=0):
    """Sequences of filler words with 'up' and 'down' mixed in; the label says which is more
    frequent (ties never occur): a counting task the retrieval must read off the sequence."""
    def find(data_dir, cache_dir, options, log, splits=None):
        def read(builder, log):
            rng = random.Random(seed)
            for split in ("train", "test"):
                for i in range(n_per_split):
                    n_up = rng.randint(0, 5)
                    n_down = rng.choice([k for k in range(6) if k != n_up])
                    toks = ["up"] * n_up + ["down"] * n_down + [rng.choice(WORDS[2:]) for _ in range(4)]
                    rng.shuffle(toks)
                    builder.add(split, (i,), int(n_up > n_down), (" ".join(toks),))
        return sources.Source("toy", {"n_per_split": n_per_split, "seed": seed}, read)
    return find


@pytest.fixture
def toy():
    spec = registry.register(registry.Dataset(
        name="TOYCOUNT", classes=("more down", "more up"), fields=("sequence",), projections=((0, 0),),
        seq_len=14, find_source=toy_reader(),
        paper={"fc_layers": [16, 2], "seqLen": 14, "lrs": [0.01, 0.01, 0.01], "T": 20, "K": 8,
               "betas": [0.0, 0.5], "batch_size": 16}))
    yield spec
    del registry.REGISTRY[spec.name]


def test_a_registered_synthetic_task_trains_tests_and_predicts_through_main(toy, tmp_path, capsys):
    vectors = write_vectors(tmp_path / "vectors.txt", WORDS, dim=6)
    data = ["--data-dir", str(tmp_path), "--embeddings", str(vectors), "--cache-dir", str(tmp_path / "cache")]
    run = tmp_path / "run"
    # every other hyperparameter comes from the entry's paper configuration
    assert main.main(["--dataset", "TOYCOUNT", "--thirdphase", "--epochs", "8", "--seed", "0", "--val-split", "0.2",
                      "--save", "--results-dir", str(run), *data]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.9, metrics["test_accuracy"]   # chance: 0.5; seeds 0-2 gave 0.98-1.0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["dataset"] == "TOYCOUNT" and config["hyper"]["T"] == 20
    capsys.readouterr()
    assert main.main(["--execute", "test", "--load-path", str(run), *data]) == 0
    assert f"test accuracy {metrics['test_accuracy']:.4f}" in capsys.readouterr().out
    assert main.main(["--execute", "predict", "--load-path", str(run), "--text", "up up up the down",
                      "down down the a down up"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].split("\t")[:3] == ["label", "score:more down", "score:more up"]
    assert [r.split("\t")[0] for r in rows[1:3]] == ["more up", "more down"]


def test_registry_entries_drive_the_model_and_the_benchmark(toy, capsys):
    three = registry.register(registry.Dataset(
        name="TRIPLE", classes=("a", "b", "c", "d"), fields=("x", "y", "z"),
        projections=((0, 1), (2, 2)), seq_len=5, find_source=toy_reader(), gamma=0.3,
        paper={"fc_layers": [9, 4], "seqLen": 5, "lrs": [1e-3] * 4, "T": 6, "K": 3,
               "betas": [0.0, 0.2], "batch_size": 4}))
    try:
        model = mu.EPNet("TRIPLE", 5, 6, [9, 4]).double()
        assert (model.P, model.n_inputs, model.gamma) == (2, 3, 0.3)
        x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
        s = [t.requires_grad_(True) for t in [torch.rand_like(t) for t in model.init_states(4, dtype=x.dtype)]]
        auto = torch.autograd.grad(model.phi(x, s).sum(), s)
        closed = model.grad_states([t.detach() for t in s], model.precompute(x)[0])
        for a, c in zip(auto, closed):
            torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
        mu.ep_gradients(model, x, torch.tensor([0, 1, 2, 3]), 6, 3, (0.0, 0.2), True)
        assert all(torch.isfinite(p.grad).all() for p in model.params())
        benchmark.main(["--dataset", "TRIPLE", "--embed-dim", "6", "--batches", "1"])
        out = json.loads(capsys.readouterr().out)
        assert out["batch_size"] == 4 and out["samples_per_s"] > 0
    finally:
        del registry.REGISTRY[three.name]
    with pytest.raises(ValueError, match="choose from IMDB, SNLI"):
        registry.get("NOPE")
