"""bench/fused_losses.py races contenders that must all compute the same loss: check that they do (loss and both
gradients against the naive eager one), so that a GPU run times what it claims to time. Liger is not a test
dependency; its contenders were checked by hand (bench/RESULTS.md). bench/gpu_checks.sh refuses a misspelt step,
exits non-zero when a step fails, and starts only the steps that fit its --budget."""
import importlib.util
import os
import re
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_kernels = load_bench("fused_losses")


@pytest.mark.parametrize("task", ["ce", "dpo"])
@pytest.mark.parametrize("variant", ["reference", "triton"])
def test_every_kernel_bench_contender_computes_the_eager_loss_and_gradients(task, variant):
    inputs = bench_kernels.make_inputs(task, tokens=64, hidden_size=16, dtype=torch.float32, device="cpu",
                                       seq_len=16)
    results = {}
    for name in ("eager", variant):
        copies = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        loss = bench_kernels.make_fn(task, name)(*copies)
        loss.backward()
        results[name] = (loss.detach(), copies[0].grad, copies[1].grad)
    for got, want in zip(results[variant], results["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gpu_checks_refuses_an_unknown_step_and_names_the_steps(tmp_path):
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_checks.sh"), str(tmp_path), "kernels", "modle360"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "unknown step 'modle360'; the steps: kernels model360 model1.7b fused_losses dpo sft rlvr" in out.stderr
    assert os.listdir(tmp_path) == []  # refused before running anything


def gpu_checks_with_failing_python(tmp_path, *args, step_seconds=0):
    """gpu_checks.sh where python3 runs nothing: it exits 3, after step_seconds when it runs a bench script (so each
    step it starts fails; the version probes answer at once)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(f'#!/bin/sh\ncase "$1" in bench/*) sleep {step_seconds};; esac\nexit 3\n')
    (fake / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_checks.sh"), str(tmp_path / "logs"), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_gpu_checks_exits_non_zero_when_a_step_fails(tmp_path):
    out = gpu_checks_with_failing_python(tmp_path, "dpo")
    assert out.returncode == 1  # the caller sees it, not only the summary
    assert "dpo: exit 3" in (tmp_path / "logs" / "summary.txt").read_text()


def test_gpu_checks_starts_only_the_steps_whose_limit_fits_what_is_left_of_the_budget(tmp_path):
    """A device call has a hard time limit: a step that could outlast the budget is skipped and said so, never
    started and cut off with the logs unwritten. model1.7b's limit (180 s + 10) fits 192 s alone, but not after
    model360 took 4 of them."""
    out = gpu_checks_with_failing_python(tmp_path, "--budget", "192", "model360", "model1.7b", step_seconds=4)
    summary = (tmp_path / "logs" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("model360: exit 3")
    assert re.fullmatch(r"model1\.7b: skipped, its 180 s limit \(\+ 10 s\) does not fit the 18\d s left of "
                        r"--budget 192", summary[1]), summary
    assert out.returncode == 1 and not (tmp_path / "logs" / "model1.7b.log").exists()


def test_gpu_checks_exits_3_when_steps_were_only_skipped_and_refuses_a_budget_that_is_no_number(tmp_path):
    out = gpu_checks_with_failing_python(tmp_path, "--budget", "100", "model360")
    assert out.returncode == 3 and "model360: skipped" in (tmp_path / "logs" / "summary.txt").read_text()
    bad = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_checks.sh"), str(tmp_path / "x"), "--budget",
                          "soon"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--budget needs a number of seconds, got 'soon'" in bad.stderr
