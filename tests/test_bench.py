"""bench/fused_losses.py races contenders that must all compute the same loss: check that they do (loss and both
gradients against the naive eager one), so that a GPU run times what it claims to time. Liger is not a test
dependency; its contenders were checked by hand (bench/RESULTS.md). bench/gpu_checks.sh refuses a misspelt step and exits non-zero when a step fails."""
import importlib.util
import os
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
    assert "unknown step 'modle360'; the steps: kernels fused_losses model360 model1.7b sft dpo rlvr" in out.stderr
    assert os.listdir(tmp_path) == []  # refused before running anything


def test_gpu_checks_exits_non_zero_when_a_step_fails(tmp_path):
    # a step that fails (here: its python3 is not one that runs anything): the caller sees it, not only the summary
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\nexit 3\n")
    (fake / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_checks.sh"), str(tmp_path / "logs"), "dpo"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1
    assert "dpo: exit 3" in (tmp_path / "logs" / "summary.txt").read_text()
