"""benchmark.py runs and reports; the fast dynamics equal the autograd-per-step reference."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import loops
import model_utils as mu
from conftest import tiny_model
import ops

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["samples_per_s", "seconds_per_batch", "free_s", "nudged_s", "update_s", "peak_mem_mb",
        "dtype", "device", "gflops", "roofline_gflops", "roofline_fraction"]


def bench(*flags):
    return subprocess.run([sys.executable, "benchmark.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("flags", [
    ["--dataset", "IMDB", "--seqLen", "6", "--embed-dim", "8", "--fc_layers", "16", "4", "2",
     "--T", "4", "--K", "2", "--batch_size", "3", "--thirdphase", "--compare", "--roofline"],
    ["--dataset", "SNLI", "--seqLen", "5", "--embed-dim", "8", "--fc_layers", "16", "3",
     "--T", "6", "--K", "3", "--batch_size", "4", "--bf16", "--tol", "1e-3", "--batches", "1"],
])
def test_benchmark_prints_one_json_line_with_the_keys(flags):
    run = bench(*flags)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in KEYS:
        assert key in out
    assert out["samples_per_s"] > 0 and out["peak_mem_mb"] > 0 and out["device"] == "cpu"
    if "--compare" in flags:
        assert out["speedup_vs_reference"] > 0 and 0 < out["roofline_fraction"]
    else:
        assert out["dtype"].startswith("bfloat16") and 1 <= out["free_steps"] <= 6
        assert len(out["bf16_grad_rel_err"]) == 8


def test_benchmark_bad_flag_exits_2_with_one_line():
    run = bench("--no-such-flag")
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "error" in run.stderr


@pytest.mark.parametrize("flags", [["--T", "0"], ["--betas", "0", "x"], ["--device", "gpu"],
                                   ["--dataset", "SNLI", "--fc_layers", "10", "2"],
                                   ["--alg", "BPTT", "--T", "5", "--K", "9"], ["--bf16", "--reference"]])
def test_benchmark_bad_values_exit_2_with_one_line(flags, capsys):
    import benchmark
    with pytest.raises(SystemExit) as exit_:
        benchmark.pick_device(benchmark.parse_args(flags).device)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


@pytest.mark.parametrize("bad", [["--T", "0"], ["--K", "-2"], ["--batch_size", "0"], ["--tol", "0"],
                                 ["--anderson", "-1"], ["--fc_layers", "10", "3"], ["--betas", "0.5", "0.5"],
                                 ["--alg", "BPTT", "--T", "5", "--K", "9"], ["--alg", "BPTT", "--tol", "1e-3"],
                                 ["--thirdphase", "--betas", "0", "0"], ["--estimator", "one-sided-negative",
                                                                         "--betas", "0.5", "-0.5"]])
def test_main_and_benchmark_refuse_a_bad_value_with_the_same_message(bad, tiny_imdb, capsys):
    """One validator per flag (flags.py): both tools print the same error for the same value."""
    import benchmark
    import main
    from test_main import base_args
    with pytest.raises(SystemExit):
        benchmark.parse_args(bad)
    bench_err = capsys.readouterr().err.strip().removeprefix("benchmark.py: error: ")
    assert main.main(base_args(tiny_imdb, *bad)) == 2
    main_err = capsys.readouterr().err.strip()
    assert bench_err in main_err and len(main_err.splitlines()) == 1, (bench_err, main_err)


def tiny(dataset, dtype, L=4, D=5, B=3):
    return tiny_model(dataset, (7,), "my_hard_sig", dtype, B=B, L=L, D=D)


@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fast_relaxation_equals_reference_over_many_steps(dataset, dtype, tol):
    model, x, y = tiny(dataset, dtype)
    with torch.no_grad():
        drive, keys = model.precompute(x)
        s0 = model.init_states(3, dtype=dtype)
        for beta, steps in [(0.0, 8), (0.4, 5), (-0.4, 5)]:
            fast, n = mu.relax(model, s0, drive, keys, steps, beta, y)
            ref, _ = mu.relax(model, s0, drive, keys, steps, beta, y, x=x)
            assert n == steps
            for a, b in zip(fast, ref):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            s0 = fast


def test_ep_gradients_fast_equal_reference():
    model, x, y = tiny("SNLI", torch.float64)
    grads = {}
    for reference in (False, True):
        _, info = mu.ep_gradients(model, x, y, 12, 6, (0.0, 0.3), True, reference=reference)
        grads[reference] = [p.grad.clone() for p in model.params()]
        assert info["free_steps"] == 12 and info["nudged_steps"] == 12 and info["free_s"] >= 0
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_linear_matches_f_linear_with_fused_add():
    torch.manual_seed(0)
    x, w, b, add = torch.randn(5, 40), torch.randn(30, 40), torch.randn(30), torch.randn(5, 30)
    torch.testing.assert_close(ops.linear(x, w, b, add), torch.nn.functional.linear(x, w, b) + add)
    torch.testing.assert_close(ops.linear(x, w.t().t()), x @ w.t())
    torch.testing.assert_close(ops.linear(x[:, ::2], w[:, ::2]), x[:, ::2] @ w[:, ::2].t())  # strided


@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
def test_bf16_dynamics_stay_close_to_float32(dataset):
    model, x, y = tiny(dataset, torch.float32, L=6, D=16, B=8)
    grads, outs = {}, {}
    for dt in (None, torch.bfloat16):
        out, _ = mu.ep_gradients(model, x, y, 20, 10, (0.0, 0.5), True, free_dtype=dt)
        grads[dt], outs[dt] = [p.grad.clone() for p in model.params()], out
        assert out.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in model.params())
    torch.testing.assert_close(outs[torch.bfloat16], outs[None], rtol=0.05, atol=0.03)
    for a, b in zip(grads[torch.bfloat16], grads[None]):
        assert (a - b).norm() <= 0.1 * b.norm()
    emb, ids = x.reshape(-1, x.shape[-1]), torch.arange(x[..., 0].numel()).view(x.shape[:-1])
    preds = [loops.predict_outputs(model, ids, emb, 20, 4, free_dtype=dt) for dt in (None, torch.bfloat16)]
    torch.testing.assert_close(preds[1], preds[0], rtol=0.05, atol=0.03)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("dataset", ["IMDB", "SNLI"])
def test_compiled_step_equals_eager(dataset):
    """torch.compile'd dynamics (free and both nudged phases) give the eager states; the EP
    gradients built on them agree."""
    model, x, y = tiny(dataset, torch.float32, L=6, D=16, B=4)
    runs = {}
    for compiled in (False, True):
        if compiled:
            model.compile_step()
        with torch.no_grad():
            drive, keys = model.precompute(x)
            s0, _ = mu.relax(model, model.init_states(4), drive, keys, 15)
            runs[compiled] = [s0] + [mu.relax(model, s0, drive, keys, 8, b, y)[0] for b in (0.4, -0.4)]
        mu.ep_gradients(model, x, y, 15, 8, (0.0, 0.4), True)
        runs[compiled].append([p.grad.clone() for p in model.params()])
        mu.ep_gradients(model, x, y, 15, 8, (0.0, 0.4), True, anderson=5)  # the sweep steps, jointly ±β
        runs[compiled].append([p.grad.clone() for p in model.params()])
        model.merge_keys = True  # the retrieval over MergedKeys: inputs whose tokens repeat
        x2 = torch.cat([x[..., :3, :], x[..., :3, :]], -2)
        mu.ep_gradients(model, x2, y, 15, 8, (0.0, 0.4), True, anderson=5, tol_nudged=1e-3)
        model.merge_keys = False
        runs[compiled].append([p.grad.clone() for p in model.params()])
    assert set(model.compiled) == set(model.STEP_METHODS)
    for eager, comp in zip(runs[False], runs[True]):
        for a, b in zip(comp, eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("segment", [1, 3, 7, 10])
def test_bptt_activation_checkpointing_gives_the_same_gradients(segment):
    model, x, y = tiny("SNLI", torch.float64, L=5, D=8, B=3)
    out, _ = mu.bptt_gradients(model, x, y, 12, 7)
    plain = [p.grad.clone() for p in model.params()]
    out_c, _ = mu.bptt_gradients(model, x, y, 12, 7, checkpoint=segment)
    torch.testing.assert_close(out_c, out)
    for p, g in zip(model.params(), plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_low_precision_tolerance_is_floored_at_machine_epsilon():
    """A tolerance below bfloat16's resolution is raised to its epsilon, not left unreachable."""
    model, x, _ = tiny("IMDB", torch.float32, L=6, D=16, B=4)
    with torch.no_grad():
        drive, keys = [t.bfloat16() for t in model.precompute(x)]
        p = [w.bfloat16() for w in model.params()]
        s = [t.bfloat16() for t in model.init_states(4)]
        _, floored = mu.relax(model, s, drive, keys, 200, tol=1e-9, p=p)
        _, at_eps = mu.relax(model, s, drive, keys, 200, tol=torch.finfo(torch.bfloat16).eps, p=p)
    assert floored == at_eps


def test_benchmark_reference_refuses_speed_options():
    import benchmark
    for flag in (["--tol", "1e-3"], ["--compile"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(["--reference", *flag])


def test_benchmark_fast_fills_only_the_parts_not_given():
    """--fast in benchmark.py resolves as in main.py: an explicit --anderson 0 stays plain steps."""
    import benchmark
    import flags
    fast = benchmark.parse_args(["--fast"])
    assert {k: getattr(fast, k) for k in flags.FAST} == flags.FAST
    mixed = benchmark.parse_args(["--fast", "--anderson", "0", "--tol", "1e-4"])
    assert (mixed.anderson, mixed.tol, mixed.tol_nudged, mixed.sample_exit) == (0, 1e-4, 1e-2, True)
    plain = benchmark.parse_args([])
    assert (plain.anderson, plain.sample_exit) == (0, False)


def test_gpu_check_quick_mode_runs_every_section(tmp_path):
    """tools/gpu_check.py --quick: the CUDA check's CPU mode, so that it keeps working."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    from conftest import REAL_DATA
    data = REAL_DATA if (REAL_DATA / "snli").is_dir() else tmp_path / "none"
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(root / "tools" / "gpu_check.py"), "--quick", "--data-dir", str(data),
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                           # every section must run: its own 450 s budget (a GPU-time cap) skips
                           # the last ones on a loaded CPU, so the test's limit is the timeout
                           "--budget-s", "850"],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["math"]["result"]["ok"]
    assert report["precision"]["result"]["float32"]["max"] < 1e-5
    assert report["speed"]["result"]["SNLI"]["float32_vs_reference"]["samples_per_s"] > 0
    assert "bf16_grad_rel_err" in report["speed"]["result"]["IMDB"]["bf16"]
    if data.name != "none":
        assert report["test"]["result"]["ok"] and report["train"]["result"]["ok"]
    assert report["projection"]["hours_50_epochs_float32"]["IMDB"] > 0


def test_ab_switch_alternates_a_switch_and_restores_it(capsys):
    """tools/ab_switch.py: both settings timed on the same batches, the switch set back after."""
    import json
    import sys
    from pathlib import Path
    import ops
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import ab_switch
    before = ops.ONEDNN_LINEAR
    ab_switch.main(["ops.ONEDNN_LINEAR", "--rounds", "2", "--dataset", "IMDB", "--seqLen", "12", "--embed-dim", "6",
                    "--fc_layers", "7", "2", "--T", "4", "--K", "2", "--batch_size", "3", "--batches", "1", "--fast"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ops.ONEDNN_LINEAR == before and out["default"] == before
    assert len(out["True_rounds"]) == len(out["False_rounds"]) == 2 and out["true_over_false"] > 0
    with pytest.raises(SystemExit, match="not a module-level boolean"):
        ab_switch.main(["ops.linear"])
    with pytest.raises(SystemExit, match="no module 'nosuch'"):
        ab_switch.main(["nosuch.FLAG"])
    with pytest.raises(SystemExit, match="--rounds: expected a positive integer"):
        ab_switch.main(["ops.ONEDNN_LINEAR", "--rounds", "x"])


def test_solver_check_fast_rows_take_tolerances_and_the_bfloat16_options():
    """tools/solver_check.py --fast-tols: TOL,TOL_NUDGED[,bf16-matmul][,bf16] -> ep_gradients' keywords."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import solver_check
    name, kw = solver_check.fast_row("3e-2,1e-1,bf16-matmul,bf16")
    assert name == "--fast --tol 0.03 --tol-nudged 0.1 --bf16-matmul --bf16"
    assert kw == dict(tol=3e-2, tol_nudged=1e-1, anderson=5, sample_exit=True, bf16_matmul=True,
                      free_dtype=torch.bfloat16)
    assert solver_check.fast_row("1e-3,1e-2")[1] == dict(tol=1e-3, tol_nudged=1e-2, anderson=5, sample_exit=True)
    with pytest.raises(ValueError, match="unknown option 'fp8'"):
        solver_check.fast_row("1e-3,1e-2,fp8")
    with pytest.raises(SystemExit) as exit_:
        solver_check.main(["run", "--fast-tols", "1e-3"])
    assert exit_.value.code == 2
