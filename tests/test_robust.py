"""Right on every machine: speed options through main.py, CPUs without oneDNN bfloat16,
resume across machines, dead networks, flags that work or are refused, portable configs."""
import json
import os
import subprocess
import sys

import pytest
import torch

import loops
import main
import model_utils as mu
import ops
from conftest import ROOT
from test_main import base_args, weights
from test_model_utils import synthetic_sequences

torch.set_num_threads(2)


def run_cli(args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})


@pytest.mark.parametrize("no_onednn", [False, True])
def test_bf16_trains_tests_and_predicts_through_main(tiny_imdb, no_onednn):
    """--bf16 works on any CPU: without oneDNN's bfloat16 kernels (as on AVX2-only CPUs, forced
    here by SEQLEARN_EP_NO_ONEDNN) it falls back to F.linear and says so once."""
    env = {"SEQLEARN_EP_NO_ONEDNN": "1"} if no_onednn else {}
    run = tiny_imdb["tmp"] / "run"
    proc = run_cli(base_args(tiny_imdb, "--epochs", "2", "--bf16", "--save", "--results-dir", str(run)), env)
    assert proc.returncode == 0, proc.stderr
    notices = [l for l in (proc.stdout + proc.stderr).splitlines() if "lacks oneDNN's bfloat16" in l]
    assert len(notices) == (1 if no_onednn else 0) or torch.bfloat16 not in ops.ONEDNN_DTYPES
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.7
    test = run_cli(["--execute", "test", "--load-path", str(run), "--data-dir", str(tiny_imdb["data"]),
                    "--cache-dir", str(tiny_imdb["cache"]), "--bf16"], env)
    assert test.returncode == 0 and "test accuracy" in test.stdout, test.stderr


def test_linear_fallback_equals_onednn():
    x, w, b, add = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3), torch.randn(5, 3)
    want = x @ w.t() + b + add
    torch.testing.assert_close(ops.linear(x, w, b, add), want, rtol=1e-5, atol=1e-5)
    saved = set(ops.ONEDNN_DTYPES)
    try:
        ops.ONEDNN_DTYPES.clear()
        torch.testing.assert_close(ops.linear(x, w, b, add), want, rtol=1e-5, atol=1e-5)
        y = ops.linear(x.bfloat16(), w.bfloat16(), None, add.bfloat16())
        assert y.dtype == torch.bfloat16
    finally:
        ops.ONEDNN_DTYPES.update(saved)


def test_compile_through_main_with_check_thm(tiny_imdb):
    """--compile with --check-thm (the GDU copy takes plain float64 steps) trains and logs."""
    proc = run_cli(base_args(tiny_imdb, "--epochs", "1", "--compile", "--check-thm", "--gdu-samples", "4"),
                   {"SEQLEARN_EP_COMPILE_BACKEND": "eager"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GDU check after epoch 1" in proc.stdout


def test_compiled_steps_do_not_recompile_per_beta_or_batch_size(monkeypatch):
    """A 3-phase epoch with a ragged last batch, then validation and test: a few graphs, far
    from dynamo's recompile limit (it would otherwise fall back to eager silently)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setenv("SEQLEARN_EP_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    train, test = synthetic_sequences(230, seed=1), synthetic_sequences(97, seed=2)
    emb = torch.randn(8, 4)
    model = mu.EPNet("IMDB", 6, 4, [16, 2]).compile_step()
    opt = loops.make_optimizer(model, [0.005] * 3)
    hp = {"alg": "EP", "T": 6, "K": 3, "betas": (0.0, 0.2), "estimator": "symmetric", "batch_size": 20, "tol": None}
    for epoch in range(2):
        loops.train_epoch(model, opt, train, emb, hp, torch.Generator().manual_seed(epoch))
        loops.evaluate(model, test, emb, 6, 30)
        loops.evaluate(model, train, emb, 6, 30)
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 6, dict(counters["stats"])
    assert graphs < torch._dynamo.config.recompile_limit
    torch._dynamo.reset()


def test_resume_of_a_run_saved_with_cuda_rng_state(tiny_imdb):
    """A GPU run's checkpoint carries CUDA RNG states; a CPU-only machine resumes it."""
    run = tiny_imdb["tmp"] / "run"
    common = base_args(tiny_imdb, "--save", "--results-dir", str(run))
    assert main.main(common + ["--epochs", "1"]) == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 3  # as get_rng_state_all() on 3 GPUs
    torch.save(ckpt, run / "checkpoint.pt")
    assert main.main(base_args(tiny_imdb, "--epochs", "2", "--save", "--load-path", str(run))) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert "cuda" not in torch.load(run / "checkpoint.pt", weights_only=True)["rng"]


def test_dead_initial_network_is_refused_before_any_file(tiny_imdb, capsys, monkeypatch):
    monkeypatch.setitem(ops.ACTIVATION_CENTRE, "my_hard_sig", -10.0)  # every output unit starts flat
    run = tiny_imdb["tmp"] / "run"
    assert main.main(base_args(tiny_imdb, "--act", "my_hard_sig", "--epochs", "1", "--save",
                               "--results-dir", str(run))) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fc.1 (output, 2 units)" in err, err
    assert "initialisation" in err and not run.exists()


def test_network_that_dies_in_training_stops_naming_the_layer(tiny_imdb, capsys, monkeypatch):
    real = loops.train_epoch

    def dies(model, *a, **k):  # an update that pushes the output layer onto the flat part
        out = real(model, *a, **k)
        with torch.no_grad():
            model.fc[-1].bias.fill_(-50.0)
        return {**out, "dead": loops.dead_layers(mu.flat_units(model, _free_state(model)))}

    def _free_state(model):
        x = torch.rand(4, model.P * model.L, model.D)[:, None].squeeze(1)
        drive, keys = model.precompute(x)
        return mu.relax(model, model.init_states(4), drive, keys, 5)[0]

    monkeypatch.setattr(loops, "train_epoch", dies)
    run = tiny_imdb["tmp"] / "run"
    assert main.main(base_args(tiny_imdb, "--act", "my_hard_sig", "--epochs", "3", "--save",
                               "--results-dir", str(run))) == 3
    out = capsys.readouterr().out
    assert "the network died in epoch 1" in out and "fc.1 (output, 2 units)" in out


def test_train_epoch_reports_layers_flat_for_the_whole_epoch():
    torch.manual_seed(0)
    train = synthetic_sequences(60, seed=1)
    model = mu.EPNet("IMDB", 6, 4, [8, 2], "my_hard_sig")
    with torch.no_grad():
        model.fc[1].bias.fill_(-20.0)
    opt = loops.make_optimizer(model, [1e-3] * 3)
    hp = {"alg": "EP", "T": 6, "K": 3, "betas": (0.0, 0.2), "estimator": "symmetric", "batch_size": 20, "tol": None}
    stats = loops.train_epoch(model, opt, train, torch.randn(8, 4), hp, torch.Generator().manual_seed(0))
    assert stats["dead"] == [1]
    assert all(p.grad.abs().max() == 0 for p in model.fc[1].parameters())  # nothing to learn from


def test_centred_init_starts_the_output_layer_on_the_working_range():
    torch.manual_seed(0)
    model = mu.EPNet("IMDB", 8, 6, [64, 2], "my_hard_sig")
    x = torch.randn(50, 8, 6)
    assert loops.initial_dead_layers(model, x, 20) == []
    drive, keys = model.precompute(x)
    s, _ = mu.relax(model, model.init_states(50), drive, keys, 20)
    assert not mu.flat_units(model, s)[-1].any()  # no output unit starts flat
    torch.manual_seed(0)
    plain = mu.EPNet("IMDB", 8, 6, [64, 2], "my_hard_sig", init="torch")
    torch.testing.assert_close(model.fc[1].bias, plain.fc[1].bias + 1.0)  # σ's centre for my_hard_sig
    for a, b in zip(model.parameters(), plain.parameters()):
        if a is not model.fc[1].bias:
            assert torch.equal(a, b)


def test_gducheck_on_a_fresh_model_needs_no_learning_rates(tiny_imdb):
    out = tiny_imdb["tmp"] / "gdu"
    args = [a for a in base_args(tiny_imdb) if a not in ("--lrs", "0.03")]
    args[args.index("--fc_layers") + 1] = "32"
    assert main.main(args + ["--execute", "gducheck", "--gdu-samples", "4", "--results-dir", str(out)]) == 0
    assert (out / "gdu_metrics.json").is_file()


@pytest.mark.parametrize("extra,msg", [
    (["--alg", "BPTT", "--bf16"], "--bf16 applies to EP training"),
    (["--alg", "BPTT", "--tol", "1e-3"], "--tol applies to EP training"),
    (["--execute", "gducheck", "--tol", "1e-3"], "--tol does not apply to gducheck"),
    (["--execute", "gducheck", "--bf16"], "--bf16 does not apply to gducheck"),
])
def test_flags_an_algorithm_cannot_honour_are_refused(tiny_imdb, capsys, extra, msg):
    assert main.main(base_args(tiny_imdb, "--epochs", "1", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err


def test_flags_of_the_other_algorithm_are_named_not_silently_ignored(tiny_imdb, capsys):
    assert main.main(base_args(tiny_imdb, "--epochs", "1", "--alg", "BPTT")) == 0  # has --thirdphase --betas
    assert "--thirdphase and --betas only apply to --alg EP" in capsys.readouterr().out
    assert main.main(base_args(tiny_imdb, "--epochs", "1", "--bptt-checkpoint", "2")) == 0
    assert "--bptt-checkpoint only apply to --alg BPTT" in capsys.readouterr().out


def test_predict_input_file_and_bf16(tiny_imdb, capsys):
    run = tiny_imdb["tmp"] / "run"
    assert main.main(base_args(tiny_imdb, "--epochs", "3", "--save", "--results-dir", str(run))) == 0
    texts = tiny_imdb["tmp"] / "texts.txt"
    texts.write_text("great wonderful excellent movie\n\nawful terrible boring bad plot\n")
    capsys.readouterr()
    for extra in ([], ["--bf16"]):
        assert main.main(["--execute", "predict", "--load-path", str(run), "--input-file", str(texts), *extra]) == 0
        lines = [l for l in capsys.readouterr().out.splitlines() if "\t" in l][1:]  # after the header
        assert lines[0].startswith("positive") and lines[1].startswith("negative") and len(lines) == 2


def test_config_records_no_absolute_paths(tiny_imdb):
    run = tiny_imdb["tmp"] / "run"
    assert main.main(base_args(tiny_imdb, "--epochs", "1", "--save", "--results-dir", str(run))) == 0
    config = json.loads((run / "config.json").read_text())
    text = json.dumps(config["data"])
    assert str(tiny_imdb["tmp"]) not in text and str(ROOT) not in text and "mtime_ns" not in text
    files = config["data"]["embeddings"]["files"]
    assert files[0]["base"] == "elsewhere" and len(files[0]["sha256"]) == 64
    for name in ("test_SNLI_25_300", "test_IMDB_400_100"):
        shipped = (ROOT / "saved_models" / name / "config.json").read_text()
        assert '"/' not in shipped, name


def test_weight_decay_shrinks_weights_not_biases_records_and_resumes_exactly(tiny_imdb, capsys):
    import json
    model = mu.EPNet("IMDB", 4, 5, [6, 2])
    opt = loops.make_optimizer(model, [0.1, 0.1, 0.1], weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: only the decoupled decay moves the weights
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))
    tmp = tiny_imdb["tmp"]
    common = base_args(tiny_imdb, "--weight-decay", "0.01", "--save", "--lr-decay")
    assert main.main(common + ["--epochs", "2", "--results-dir", str(tmp / "full")]) == 0
    assert json.loads((tmp / "full" / "config.json").read_text())["hyper"]["weight_decay"] == 0.01
    assert main.main(common + ["--epochs", "1", "--results-dir", str(tmp / "part")]) == 0
    assert main.main(["--load-path", str(tmp / "part"), "--epochs", "2", "--save", "--data-dir",
                      str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"])]) == 0
    a, b = weights(tmp / "full" / "final_model.pt"), weights(tmp / "part" / "final_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main.main(["--load-path", str(tmp / "part"), "--epochs", "3", "--weight-decay", "0", "--data-dir",
                      str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"])]) == 2
    assert "trained with weight decay 0.01" in capsys.readouterr().err
    assert main.main(base_args(tiny_imdb, "--weight-decay", "-1")) == 2
