"""The command line end to end on tiny data: train, save, test, resume, and every user mistake."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
import registry
from conftest import ROOT


def base_args(f, *extra):
    return ["--dataset", "IMDB", "--data-dir", str(f["data"]), "--embeddings", str(f["vectors"]),
            "--cache-dir", str(f["cache"]), "--seqLen", "8", "--fc_layers", "16", "2",
            "--lrs", "0.03", "0.03", "0.03", "--T", "12", "--K", "6", "--betas", "0", "0.5",
            "--thirdphase", "--batch_size", "10", "--val-split", "0.2", "--seed", "1", *extra]


def run_cli(args, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_train_save_then_test_reproduces_recorded_accuracy(tiny_imdb, capsys):
    run = tiny_imdb["tmp"] / "run"
    assert main.main(base_args(tiny_imdb, "--epochs", "5", "--save", "--results-dir", str(run))) == 0
    for name in ["command.txt", "config.json", "checkpoint.pt", "best_model.pt", "final_model.pt",
                 "metrics.json", "accuracy.png", "embeddings.npz"]:
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ["train_acc", "val_acc", "test_acc", "epoch_time_s", "samples_per_s"]:
        assert len(metrics[key]) == 5
    assert metrics["test_accuracy"] > 0.7  # sentiment words are easy to pick up (chance: 0.5 on 160)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["fc_layers"] == [16, 2] and config["hyper"]["thirdphase"] is True
    assert "main.py" in (run / "command.txt").read_text()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 5 and set(ckpt) >= {"optimizer", "rng", "history", "config"}
    capsys.readouterr()
    # the architecture comes from the checkpoint: no architecture flags needed
    assert main.main(["--execute", "test", "--load-path", str(run), "--data-dir", str(tiny_imdb["data"]),
                      "--cache-dir", str(tiny_imdb["cache"])]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {metrics['test_accuracy']:.4f}" in out
    # early stopping at evaluation reports the steps it used
    assert main.main(["--execute", "test", "--load-path", str(run), "--data-dir", str(tiny_imdb["data"]),
                      "--cache-dir", str(tiny_imdb["cache"]), "--tol", "1e-3"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("test accuracy")][0]
    used = float(line.split(" steps used on average")[0].rsplit(" ", 1)[1])
    assert 1 <= used <= 12 and "(--tol 0.001)" in line


def test_resume_after_epoch_one_equals_uninterrupted_run(tiny_imdb):
    full, part = tiny_imdb["tmp"] / "full", tiny_imdb["tmp"] / "part"
    common = base_args(tiny_imdb, "--save", "--lr-decay")
    assert main.main(common + ["--epochs", "2", "--results-dir", str(full)]) == 0
    assert main.main(common + ["--epochs", "1", "--results-dir", str(part)]) == 0
    assert main.main(common + ["--epochs", "2", "--load-path", str(part)]) == 0
    a, b = weights(full / "final_model.pt"), weights(part / "final_model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((part / "metrics.json").read_text())
    assert ma["train_acc"] == mb["train_acc"] and ma["test_accuracy"] == mb["test_accuracy"]


def test_bptt_trains_through_the_cli(tiny_imdb, capsys):
    assert main.main(base_args(tiny_imdb, "--alg", "BPTT", "--epochs", "2")) == 0
    assert "final test accuracy" in capsys.readouterr().out


def test_predict_prints_label_and_outputs(tiny_imdb, capsys):
    run = tiny_imdb["tmp"] / "run"
    assert main.main(base_args(tiny_imdb, "--epochs", "3", "--save", "--results-dir", str(run))) == 0
    capsys.readouterr()
    assert main.main(["--execute", "predict", "--load-path", str(run), "--text",
                      "great wonderful excellent movie", "awful terrible boring bad plot"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "label\tscore:negative\tscore:positive\tknown_words\ttext"
    assert lines[1].startswith("positive\t") and lines[2].startswith("negative\t")
    assert lines[1].endswith("\t4/4\tgreat wonderful excellent movie")
    capsys.readouterr()
    long = "great " * 100
    assert main.main(["--execute", "predict", "--load-path", str(run), "--text", long, "zzz qqq"]) == 0
    out = capsys.readouterr()
    rows = out.out.strip().splitlines()
    assert rows[1].endswith("more characters]") and "no word(s) the model knows" in out.out + out.err


def test_existing_run_folder_is_not_overwritten(tiny_imdb, capsys):
    run = tiny_imdb["tmp"] / "run"
    assert main.main(base_args(tiny_imdb, "--epochs", "1", "--save", "--results-dir", str(run))) == 0
    before = (run / "checkpoint.pt").read_bytes()
    assert main.main(base_args(tiny_imdb, "--epochs", "1", "--save", "--results-dir", str(run))) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert main.main(base_args(tiny_imdb, "--epochs", "1", "--save", "--results-dir", str(run),
                               "--overwrite")) == 0


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hand-made evil pickle
def test_malicious_truncated_and_foreign_checkpoints_are_refused(tiny_imdb, capsys):
    tmp = tiny_imdb["tmp"]
    marker = tmp / "pwned"
    evil = tmp / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": main.CHECKPOINT_FORMAT, "model": Evil(str(marker))}, f)
    torch.save({"format": main.CHECKPOINT_FORMAT, "model": Evil(str(marker))}, tmp / "evil2.pt")
    run = tmp / "run"
    assert main.main(base_args(tiny_imdb, "--epochs", "1", "--save", "--results-dir", str(run))) == 0
    good = (run / "best_model.pt").read_bytes()
    (tmp / "trunc.pt").write_bytes(good[: len(good) // 2])
    torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")
    capsys.readouterr()
    cases = {"evil.pt": "refusing", "evil2.pt": "refusing", "trunc.pt": "corrupted or truncated",
             "foreign.pt": "not a checkpoint of this tool", "missing": "no such file"}
    for name, msg in cases.items():
        code = main.main(["--execute", "test", "--load-path", str(tmp / name),
                          "--data-dir", str(tiny_imdb["data"])])
        err = capsys.readouterr().err.strip()
        assert code == 2 and msg in err and len(err.splitlines()) == 1, (name, err)
    assert not marker.exists()
    code = main.main(["--execute", "test", "--load-path", str(run), "--dataset", "SNLI"])
    assert code == 2 and "does not match" in capsys.readouterr().err


BAD_ARGS = [
    (["--lrs", "0.1", "0.1"], "needs 3 learning rates"),
    (["--act", "relu6"], "invalid choice"),
    (["--dataset", "MNIST"], "invalid choice"),
    (["--alg", "BPTT", "--K", "20"], "cannot exceed --T"),
    (["--seqLen", "0"], "--seqLen must be positive"),
    (["--fc_layers", "0", "2"], "--fc_layers sizes must be positive"),
    (["--T", "-1"], "--T must be positive"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--betas", "0", "0"], "β2 to differ"),
    (["--embeddings", "/nonexistent/vectors.bin"], "/nonexistent/vectors.bin"),
]


@pytest.mark.parametrize("extra,msg", BAD_ARGS, ids=[m for _, m in BAD_ARGS])
def test_bad_arguments_exit_2_with_one_line(tiny_imdb, extra, msg):
    argv = base_args(tiny_imdb, "--epochs", "1")
    # later flags override earlier ones in argparse, so appending replaces the good value
    res = run_cli(argv + extra)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    err = [l for l in res.stderr.strip().splitlines() if l.startswith("error") or "error:" in l]
    assert err and msg in res.stderr, res.stderr


def test_unwritable_results_dir_is_a_clear_error(tiny_imdb, capsys):
    blocker = tiny_imdb["tmp"] / "file"
    blocker.write_text("x")
    code = main.main(base_args(tiny_imdb, "--epochs", "1", "--save", "--results-dir", str(blocker / "run")))
    assert code == 2 and "cannot write to the run folder" in capsys.readouterr().err


def test_divergence_guard_names_the_phase_and_keeps_last_checkpoint(tiny_imdb, capsys):
    run = tiny_imdb["tmp"] / "run"
    args = base_args(tiny_imdb, "--save", "--results-dir", str(run), "--act", "tanh")
    assert main.main(args + ["--epochs", "1"]) == 0
    good = (run / "checkpoint.pt").read_bytes()
    code = main.main(args + ["--epochs", "3", "--load-path", str(run), "--lrs", "1e38", "1e38", "1e38"])
    out = capsys.readouterr()
    assert code == 3 and "diverged" in out.out + out.err and "non-finite" in out.out + out.err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert ckpt["epoch"] == 1 and (run / "checkpoint.pt").read_bytes() == good  # untouched


def test_kill_9_then_resume_ends_like_an_uninterrupted_run(tiny_imdb):
    full, killed = tiny_imdb["tmp"] / "full", tiny_imdb["tmp"] / "killed"
    common = base_args(tiny_imdb, "--save", "--epochs", "4", "--test-every", "0")
    assert run_cli(common + ["--results-dir", str(full)]).returncode == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *common, "--results-dir", str(killed)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (killed / "checkpoint.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside a later epoch, or between epochs
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(killed / "checkpoint.pt", weights_only=True)  # intact and loadable
    assert 1 <= ckpt["epoch"] <= 4
    assert run_cli(common + ["--load-path", str(killed)]).returncode == 0
    a, b = weights(full / "final_model.pt"), weights(killed / "final_model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_exits_cleanly_with_the_last_complete_epoch_saved(tiny_imdb):
    run = tiny_imdb["tmp"] / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"),
                             *base_args(tiny_imdb, "--save", "--epochs", "200", "--results-dir", str(run))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "last complete epoch is kept" in out + err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 1 <= ckpt["epoch"] < 200


def test_gducheck_cli_writes_metrics_and_plots_and_check_thm_logs(tiny_imdb):
    run = tiny_imdb["tmp"] / "run"
    assert main.main(base_args(tiny_imdb, "--epochs", "2", "--save", "--results-dir", str(run),
                               "--check-thm", "--gdu-samples", "4")) == 0
    gdu_log = json.loads((run / "metrics.json").read_text())["gdu"]
    assert [m["epoch"] for m in gdu_log] == [1, 2] and "fc.0.weight" in gdu_log[0]["layers"]
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    cwd = os.getcwd()
    os.chdir(tiny_imdb["tmp"])  # the default output folder is results/... under the working directory
    try:
        assert main.main(["--execute", "gducheck", "--load-path", str(run), "--data-dir", str(tiny_imdb["data"]),
                          "--cache-dir", str(tiny_imdb["cache"]), "--T", "30", "--K", "8", "--save",
                          "--gdu-samples", "4"]) == 0
    finally:
        os.chdir(cwd)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # --load-path is only read
    out = next((tiny_imdb["tmp"] / "results" / "IMDB").glob("*/*_cpu_gducheck"))
    metrics = json.loads((out / "gdu_metrics.json").read_text())
    assert metrics["T"] == 30 and metrics["K"] == 8
    assert set(metrics["layers"]["proj.0"]) == {f"{kind}_{curve}" for kind in ("rel_rmse", "sign_agreement")
                                                for curve in ("one_sided", "one_sided_negative", "symmetric")}
    assert metrics["estimator"] == "symmetric"
    for png in ["gdu_summary.png", "convergence.png", "gdu_proj.0.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_tiny_snli(folder, n=60, seed=0):
    import random
    rng = random.Random(seed)
    labels = ["neutral", "contradiction", "entailment"]
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        rows = []
        for i in range(n):
            label = labels[i % 3]
            word = {"neutral": "maybe", "contradiction": "never", "entailment": "surely"}[label]
            rows.append({"gold_label": label, "sentence1": f"a man {rng.choice(['runs', 'sits'])} here .",
                         "sentence2": f"the man {word} {rng.choice(['runs', 'sits'])} ."})
        (folder / f"snli_1.0_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_snli_train_and_test_through_the_cli(tmp_path, capsys):
    from conftest import write_vectors
    data = write_tiny_snli(tmp_path / "data")
    vec = write_vectors(tmp_path / "v.txt", ["a", "man", "runs", "sits", "here", "the", "maybe", "never",
                                             "surely", "."])
    run = tmp_path / "run"
    args = ["--dataset", "SNLI", "--data-dir", str(data), "--embeddings", str(vec), "--cache-dir",
            str(tmp_path / "c"), "--seqLen", "6", "--fc_layers", "12", "3", "--lrs", *["0.01"] * 6,
            "--T", "12", "--K", "6", "--betas", "0", "0.5", "--thirdphase", "--batch_size", "12",
            "--epochs", "6", "--save", "--results-dir", str(run)]
    assert main.main(args) == 0
    recorded = json.loads((run / "metrics.json").read_text())["test_accuracy"]
    assert recorded > 0.6  # the hypothesis word gives the label away
    capsys.readouterr()
    assert main.main(["--execute", "test", "--load-path", str(run), "--data-dir", str(data),
                      "--cache-dir", str(tmp_path / "c")]) == 0
    assert f"test accuracy {recorded:.4f}" in capsys.readouterr().out
    assert main.main(["--execute", "predict", "--load-path", str(run), "--premise", "a man runs here .",
                      "--hypothesis", "the man never sits ."]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split("\t")[:4] == ["label", "score:neutral", "score:contradiction", "score:entailment"]
    assert rows[1].split("\t")[0] in registry.get("SNLI").classes


def test_export_stores_half_precision_weights_and_test_reproduces_its_accuracy(tiny_imdb, capsys):
    run, out = tiny_imdb["tmp"] / "run", tiny_imdb["tmp"] / "shipped"
    assert main.main(base_args(tiny_imdb, "--epochs", "2", "--save", "--results-dir", str(run))) == 0
    data = ["--data-dir", str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"])]
    capsys.readouterr()
    assert main.main(["--execute", "export", "--load-path", str(run), "--results-dir", str(out),
                      "--T", "20", *data]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "best_model.pt", "command.txt",
                                                    "config.json", "embeddings.npz", "metrics.json"]
    ckpt = torch.load(out / "best_model.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["export"]["eval"]["T"] == 20 and metrics["export"]["trained_with"]["T"] == 12
    assert len(metrics["val_acc"]) == 2                      # the run's curves travel along
    # test on the export, with no flags: the stored evaluation settings give the recorded number
    capsys.readouterr()
    assert main.main(["--execute", "test", "--load-path", str(out), *data]) == 0
    assert f"test accuracy {metrics['test_accuracy']:.4f} ({metrics['test_correct']}/" in capsys.readouterr().out
    # a second export into the same folder is refused without --overwrite
    assert main.main(["--execute", "export", "--load-path", str(run), "--results-dir", str(out), *data]) == 2


def test_benchmark_times_a_trained_run_on_its_training_data(tiny_imdb):
    """benchmark.py --load-path: the run's weights and samples, the fast path with --tol against
    the original (float32, fixed T and K, autograd per step)."""
    run = tiny_imdb["tmp"] / "run"
    assert main.main(base_args(tiny_imdb, "--epochs", "1", "--save", "--results-dir", str(run))) == 0
    bench = subprocess.run(
        [sys.executable, str(ROOT / "benchmark.py"), "--load-path", str(run), "--data-dir",
         str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"]), "--T", "12", "--K", "6",
         "--betas", "0", "0.5", "--thirdphase", "--batch_size", "10", "--batches", "2",
         "--tol", "1e-4", "--compare"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert bench.returncode == 0, bench.stderr
    out = json.loads(bench.stdout)
    assert out["inputs"].startswith("training data of") and out["tol"] == 1e-4
    assert out["reference"]["free_steps"] == 12 and out["reference"]["nudged_steps"] == 12
    assert 1 <= out["free_steps"] <= 12 and out["speedup_vs_reference"] > 0
    conflict = subprocess.run(
        [sys.executable, str(ROOT / "benchmark.py"), "--load-path", str(run), "--data-dir",
         str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"]), "--seqLen", "9"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert conflict.returncode == 2 and "conflicts" in conflict.stderr


def test_bptt_with_activation_checkpointing_trains_like_without(tiny_imdb):
    runs = {}
    for c in ("0", "3"):
        run = tiny_imdb["tmp"] / f"bptt{c}"
        assert main.main(base_args(tiny_imdb, "--alg", "BPTT", "--epochs", "1", "--save",
                                   "--results-dir", str(run), "--bptt-checkpoint", c)) == 0
        runs[c] = weights(run / "final_model.pt")
    for k in runs["0"]:
        torch.testing.assert_close(runs["3"][k], runs["0"][k], rtol=1e-5, atol=1e-6)
    assert main.main(base_args(tiny_imdb, "--alg", "BPTT", "--bptt-checkpoint", "-1")) == 2


def test_kill_during_the_first_epoch_leaves_nothing(tiny_imdb):
    """SIGTERM (like Ctrl-C) before any epoch completed: no half-made run folder is left."""
    run = tiny_imdb["tmp"] / "run"
    args = base_args(tiny_imdb, "--save", "--epochs", "3", "--results-dir", str(run))
    args[args.index("--T") + 1], args[args.index("--K") + 1] = "3000", "1000"  # a slow first epoch
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "config.json").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "no epoch had completed" in out + err and not run.exists()
