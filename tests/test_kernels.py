"""Fused LM-head losses: Triton (under TRITON_INTERPRET=1, set by conftest.py) vs the PyTorch reference vs the
naive computation (F.linear + F.cross_entropy, log_softmax + gather) that holds the full logits.

On a GPU, `NANOTULU_TEST_DEVICE=cuda python -m pytest tests/test_kernels.py` runs the same tests on CUDA tensors
with the kernels compiled for real (conftest.py then leaves the interpreter off).

Shapes are tiny, and the chunk budget and vocab tile are shrunk so that every call crosses several chunks and
several vocab tiles, with V = 300 not a multiple of the tile.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import nanotulu_kernels as kernels
from nanotulu_kernels import cross_entropy, reference

N, H, V = 48, 32, 300
DEVICE = torch.device(os.environ.get("NANOTULU_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("NANOTULU_TEST_DEVICE=cuda, but torch sees no CUDA device")
BACKENDS = ("triton", "torch")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(cross_entropy, "MAX_BLOCK_V", 64)      # 5 tiles per row, the last one partial
    monkeypatch.setattr(cross_entropy, "LOGITS_BUDGET", 20 * V)  # chunks of 16 rows
    monkeypatch.setattr(reference, "LOGITS_BUDGET", 20 * V)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("NANOTULU_KERNELS", request.param)
    return request.param


def make_inputs(n=N, dtype=torch.float32, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H) * 3).to(DEVICE, dtype).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::ignore_every] = -100   # first row included
    labels[-1] = -100               # and the last
    return hidden, weight, labels.to(DEVICE)


def upstream_grad(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def naive_ce(hidden, weight, labels, reduction="mean", z_loss=0.0, ignore_index=-100):
    """The full-logits computation in fp32: what the fused kernels must equal."""
    logits = F.linear(hidden.float(), weight.float())
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    valid = labels != ignore_index
    loss = loss + z_loss * torch.logsumexp(logits, -1).square() * valid
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum().clamp(min=1)


def loss_and_grads(fn, hidden, weight, upstream=None):
    """Runs fn(hidden, weight) forward + backward on fresh leaves; returns (loss, grad_hidden, grad_weight)."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w)
    (loss if upstream is None else (loss * upstream).sum()).backward()
    return loss.detach(), h.grad, w.grad


def assert_close(actual, expected, rtol, name):
    """Relative to the tensor's largest magnitude: elementwise rtol is meaningless for entries near zero."""
    err = (actual.float() - expected.to(actual.device).float()).abs().max().item()
    scale = max(expected.float().abs().max().item(), 1e-12)
    assert err <= rtol * scale, f"{name}: max abs error {err:.3g} > {rtol} x {scale:.3g}"


# --- fused linear cross-entropy ------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_fp32_matches_naive(backend, reduction):
    hidden, weight, labels = make_inputs()
    # 'none' gets a per-token upstream gradient, the case where gradients cannot be computed in forward
    upstream = upstream_grad(N, 1) if reduction == "none" else None
    got = loss_and_grads(lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels, reduction=reduction),
                         hidden, weight, upstream)
    want = loss_and_grads(lambda h, w: naive_ce(h, w, labels, reduction), hidden, weight, upstream)
    for a, b, name in zip(got, want, ("loss", "grad_hidden", "grad_weight")):
        assert_close(a, b, 1e-5, f"{backend}/{reduction} {name}")
    if reduction == "none":
        assert got[0].dtype == torch.float32 and (got[0][labels == -100] == 0).all()


@pytest.mark.parametrize("budget_rows, computed", [(N, 1), (16, 2)])
def test_reference_recomputes_the_logits_only_when_they_take_several_chunks(monkeypatch, budget_rows, computed):
    """Several chunks: each one's logits are computed again in backward, so that one chunk at a time is alive. One
    chunk is all the logits, alive until the loss's backward either way: computed once."""
    monkeypatch.setattr(reference, "LOGITS_BUDGET", budget_rows * V)
    calls, chunk_losses = [], reference._chunk_token_losses
    monkeypatch.setattr(reference, "_chunk_token_losses", lambda h, *a: calls.append(len(h)) or chunk_losses(h, *a))
    hidden, weight, labels = make_inputs()
    upstream = upstream_grad(N, 1)
    got = loss_and_grads(lambda h, w: reference.fused_linear_cross_entropy(h, w, labels, reduction="none"),
                         hidden, weight, upstream)
    assert sum(calls) == computed * N
    want = loss_and_grads(lambda h, w: naive_ce(h, w, labels, "none"), hidden, weight, upstream)
    for a, b, name in zip(got, want, ("loss", "grad_hidden", "grad_weight")):
        assert_close(a, b, 1e-5, name)


def test_triton_and_reference_agree_with_one_row_per_program(monkeypatch):
    """The GPU launch (one row per program, vocab tile 128, V = 300 = 2 x 128 + 44) vs the reference."""
    monkeypatch.setattr(cross_entropy, "ROWS_PER_PROGRAM", 1)
    monkeypatch.setattr(cross_entropy, "MAX_BLOCK_V", 128)
    hidden, weight, labels = make_inputs(n=12)
    got = loss_and_grads(lambda h, w: cross_entropy.fused_linear_cross_entropy(h, w, labels), hidden, weight)
    want = loss_and_grads(lambda h, w: reference.fused_linear_cross_entropy(h, w, labels), hidden, weight)
    for a, b, name in zip(got, want, ("loss", "grad_hidden", "grad_weight")):
        assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_low_precision_within_eager_error(dtype, monkeypatch):
    """Tolerance: the Triton path rounds three things to the input dtype, as eager PyTorch does: the logits
    chunk (GEMM output), the logits gradient (fp32 math, one rounding) and the GEMM outputs. Each is one
    rounding (2^-9 relative for bf16, 2^-12 for fp16), so the error vs the exact fp32 result on the same
    rounded inputs is a few units of roundoff: we require at most 2 units more than eager's own low-precision
    error (F.linear in dtype + F.cross_entropy), i.e. 'no worse than PyTorch', and below 3% absolute."""
    monkeypatch.setenv("NANOTULU_KERNELS", "triton")
    hidden, weight, labels = make_inputs(dtype=dtype)
    unit = 2.0 ** -9 if dtype == torch.bfloat16 else 2.0 ** -12
    got = loss_and_grads(lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels), hidden, weight)
    exact = loss_and_grads(lambda h, w: naive_ce(h, w, labels), hidden.float(), weight.float())
    eager = loss_and_grads(lambda h, w: F.cross_entropy(F.linear(h, w).float(), labels), hidden, weight)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for g, e, x, name in zip(got, eager, exact, ("loss", "grad_hidden", "grad_weight")):
        scale = x.abs().max().item()
        err, eager_err = (g.float() - x).abs().max().item(), (e.float() - x).abs().max().item()
        assert err <= eager_err + 2 * unit * scale, f"{name}: {err:.3g} vs eager {eager_err:.3g}"
        assert err <= 0.03 * scale, f"{name}: {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_under_autocast_the_lm_head_runs_in_the_autocast_dtype(backend, reduction):
    """The trainers call the loss inside bf16 autocast (on CUDA; CPU autocast behaves alike). Both backends then
    equal F.linear + cross-entropy under the same autocast, to bf16 error, and the fp32 leaves get fp32 grads."""
    hidden, weight, labels = make_inputs()
    upstream = upstream_grad(N, 1) if reduction == "none" else None

    def under_autocast(fn):
        def run(h, w):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                return fn(h, w)
        return run
    got = loss_and_grads(under_autocast(lambda h, w: kernels.fused_linear_cross_entropy(
        h, w, labels, reduction=reduction)), hidden, weight, upstream)
    want = loss_and_grads(under_autocast(lambda h, w: F.cross_entropy(
        F.linear(h, w).float(), labels, reduction=reduction)), hidden, weight, upstream)
    exact = loss_and_grads(lambda h, w: naive_ce(h, w, labels, reduction), hidden, weight, upstream)
    assert got[1].dtype == got[2].dtype == torch.float32
    # bit for bit the loss of the bf16-rounded operands: the LM head ran in bf16, not in fp32
    in_bf16 = kernels.fused_linear_cross_entropy(hidden.detach().bfloat16(), weight.detach().bfloat16(), labels,
                                                 reduction=reduction)
    assert torch.equal(got[0], in_bf16)
    for g, e, x, name in zip(got, want, exact, ("loss", "grad_hidden", "grad_weight")):
        err, eager_err = (g - x).abs().max().item(), (e - x).abs().max().item()
        assert err <= eager_err + 2 * 2.0 ** -9 * x.abs().max().item(), \
            f"{backend} {name}: {err:.3g} vs eager {eager_err:.3g}"


def test_ignored_rows_have_zero_loss_and_zero_gradient(backend):
    hidden, weight, labels = make_inputs(ignore_every=3)
    upstream = upstream_grad(N, 2)
    loss, grad_h, _ = loss_and_grads(
        lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels, reduction="none"), hidden, weight, upstream)
    ignored = labels == -100
    assert (loss[ignored] == 0).all() and (grad_h[ignored] == 0).all()
    assert (loss[~ignored] > 0).all() and (grad_h[~ignored].abs().sum(1) > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_call_gives_zero_loss_and_zero_grads(backend, reduction):
    hidden, weight, _ = make_inputs(n=20)
    labels = torch.full((20,), -100, device=DEVICE)
    loss, grad_h, grad_w = loss_and_grads(
        lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels, reduction=reduction, z_loss=1e-3),
        hidden, weight, torch.ones(20, device=DEVICE) if reduction == "none" else None)
    for t in (loss, grad_h, grad_w):
        assert torch.isfinite(t).all() and (t == 0).all()


def test_a_frozen_lm_head_or_frozen_hidden_states_still_give_the_other_its_gradient(backend):
    """Only the trainable input gets a gradient, and the exact one: 'none' computes in backward the gradients that
    forward recorded as needed."""
    hidden, weight, labels = make_inputs(n=20)
    upstream = upstream_grad(20, 5)
    _, want_h, want_w = loss_and_grads(lambda h, w: naive_ce(h, w, labels, "none"), hidden, weight, upstream)
    for trainable, want in (("hidden", want_h), ("weight", want_w)):
        h, w = hidden.detach().clone(), weight.detach().clone()
        leaf = h if trainable == "hidden" else w
        leaf.requires_grad_()
        (kernels.fused_linear_cross_entropy(h, w, labels, reduction="none") * upstream).sum().backward()
        assert leaf.grad is not None, f"no gradient for the trainable {trainable}"
        assert_close(leaf.grad, want, 1e-5, f"{backend} grad_{trainable}")


def test_custom_ignore_index_inside_the_vocabulary(backend):
    hidden, weight, labels = make_inputs()
    labels = torch.where(labels == -100, 7, labels)
    got = loss_and_grads(lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels, ignore_index=7),
                         hidden, weight)
    want = loss_and_grads(lambda h, w: naive_ce(h, w, labels, ignore_index=7), hidden, weight)
    for a, b, name in zip(got, want, ("loss", "grad_hidden", "grad_weight")):
        assert_close(a, b, 1e-5, name)


def test_none_reduction_with_scalar_upstream_equals_sum(backend):
    """loss.sum().backward() hands 'none' an upstream broadcast from a scalar (stride 0)."""
    hidden, weight, labels = make_inputs()
    got = loss_and_grads(lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels, reduction="none").sum(),
                         hidden, weight)
    want = loss_and_grads(lambda h, w: naive_ce(h, w, labels, "sum"), hidden, weight)
    for a, b, name in zip(got, want, ("loss", "grad_hidden", "grad_weight")):
        assert_close(a, b, 1e-5, name)


def test_gradient_accumulation_over_micro_batches(backend):
    """Two 'sum' calls, backward each into the same leaves, normalised outside by the total token count,
    equal one 'mean' call over the whole batch."""
    hidden, weight, labels = make_inputs()
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    total = (labels != -100).sum()
    for part in (slice(0, 20), slice(20, N)):
        (kernels.fused_linear_cross_entropy(h[part], w, labels[part], reduction="sum") / total).backward()
    _, grad_h, grad_w = loss_and_grads(lambda h, w: naive_ce(h, w, labels), hidden, weight)
    assert_close(h.grad, grad_h, 1e-5, "grad_hidden")
    assert_close(w.grad, grad_w, 1e-5, "grad_weight")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_saved_gradients_survive_a_second_backward(backend, reduction):
    """No gradient is written in place into anything autograd saved: backward twice (retain_graph) gives the
    same gradient twice, and the inputs are untouched."""
    hidden, weight, labels = make_inputs()
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = kernels.fused_linear_cross_entropy(h, w, labels, reduction=reduction).sum() * 3.0
    loss.backward(retain_graph=True)
    first = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss.backward()
    assert torch.equal(first[0], h.grad) and torch.equal(first[1], w.grad)
    assert torch.equal(h, hidden) and torch.equal(w, weight)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss(backend, reduction):
    hidden, weight, labels = make_inputs()
    upstream = upstream_grad(N, 3) if reduction == "none" else None
    got = loss_and_grads(
        lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels, reduction=reduction, z_loss=1e-2),
        hidden, weight, upstream)
    want = loss_and_grads(lambda h, w: naive_ce(h, w, labels, reduction, z_loss=1e-2), hidden, weight, upstream)
    plain = naive_ce(hidden, weight, labels, reduction).detach()
    assert not torch.allclose(want[0], plain)  # the z term is big enough to be seen
    for a, b, name in zip(got, want, ("loss", "grad_hidden", "grad_weight")):
        assert_close(a, b, 1e-5, name)


def test_a_log_sum_exp_whose_square_overflows_fp32_gives_a_finite_loss_without_z_loss(backend):
    """Past |lse| ~ 1.8e19 its square is inf; with z_loss = 0 that term must be 0, not 0 x inf = nan."""
    weight = torch.zeros(V, H)
    weight[:, 0] = torch.arange(V, dtype=torch.float32)
    hidden = torch.zeros(4, H)
    hidden[:, 0] = 3e17  # logits up to ~3e19
    labels = torch.tensor([V - 1, 0, V - 1, 0])
    got = kernels.fused_linear_cross_entropy(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE),
                                             reduction="none")
    want = F.cross_entropy(hidden @ weight.t(), labels, reduction="none")
    assert torch.isfinite(got).all() and torch.allclose(got.cpu(), want)


def test_weight_gradient_summed_in_fp32_across_chunks(monkeypatch):
    """bf16 with three rows per chunk (16 chunks) vs one chunk: the per-chunk weight-gradient products are summed
    in fp32 and rounded to bf16 once, so the result does not depend on the chunking (up to one final bf16
    rounding); summing the same per-chunk products in a bf16 accumulator drifts by many roundings."""
    monkeypatch.setenv("NANOTULU_KERNELS", "triton")
    hidden, weight, labels = make_inputs(dtype=torch.bfloat16)
    grads = {}
    for rows in (N, 3):
        monkeypatch.setattr(cross_entropy, "LOGITS_BUDGET", rows * V)
        grads[rows] = loss_and_grads(
            lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels, reduction="sum"), hidden, weight)[2]
    h, w = hidden.detach(), weight.detach()
    bf16_sum = torch.zeros(V, H, dtype=torch.bfloat16, device=DEVICE)
    for rows in torch.arange(N).split(3):
        logits = F.linear(h[rows], w).float()
        grad = torch.softmax(logits, -1) - F.one_hot(labels[rows].clamp(min=0), V)
        bf16_sum += (grad * (labels[rows] != -100)[:, None]).bfloat16().t() @ h[rows]
    chunking_drift = (grads[3].float() - grads[N].float()).abs()
    bf16_drift = (bf16_sum.float() - grads[N].float()).abs()
    # bf16 spacing at each entry's magnitude, generously, with a floor far below the largest entry's for entries that
    # cancel to near 0, where a GPU's GEMMs for 3 and 48 rows may sum in another order
    one_ulp = 2.0 ** -7 * (grads[N].float().abs() + 1e-3 * grads[N].float().abs().max())
    assert (chunking_drift <= one_ulp).all(), chunking_drift.max()
    assert chunking_drift.mean() < 0.25 * bf16_drift.mean(), (chunking_drift.mean(), bf16_drift.mean())


def test_int64_row_offsets_past_2_pow_31():
    """Rows 2^30 + 64 elements apart, so row 2 starts past 2^31: with int32 offsets the kernel would read and
    write the wrong address. The buffer is 4.3 GB (on CPU virtual memory, of which only the 3 rows are touched; on
    a GPU real memory). Run in a subprocess, on the test device (compiled on a GPU), so that a wild write fails this
    test instead of killing the session."""
    script = textwrap.dedent("""
        import sys
        import torch, torch.nn.functional as F
        from nanotulu_kernels import cross_entropy
        device = sys.argv[1]
        V, stride = 300, 2**30 + 64
        logits = torch.empty(2 * stride + V, dtype=torch.bfloat16, device=device).as_strided((3, V), (stride, 1))
        values = torch.randn(3, V, generator=torch.Generator().manual_seed(0)).bfloat16()
        logits.copy_(values)
        labels = torch.tensor([5, -100, 299])
        loss = torch.empty(3, device=device)
        cross_entropy._launch_rows(logits, labels.to(device), loss, torch.ones((), device=device), True, -100, 0.0)
        want = F.cross_entropy(values.float(), labels, reduction="none")
        grad = torch.softmax(values.float(), -1) - F.one_hot(labels.clamp(min=0), V) * (labels >= 0)[:, None]
        grad[1] = 0
        assert torch.allclose(loss.cpu(), want, atol=1e-5), (loss, want)
        assert torch.allclose(logits.float().cpu(), grad, atol=4e-3), (logits.float().cpu() - grad).abs().max()
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    if DEVICE.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", script, str(DEVICE)], cwd=root, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_kernels_compile_for_a_real_gpu(tmp_path):
    """The interpreter runs code the compiler would reject (it never checks constexpr-ness, block shapes or types
    across a loop). Triton can compile for a GPU it does not have: build both kernels for an H100 (sm_90), down
    to the cubin, with the argument types of their launches (a subprocess, since the interpreter is on here)."""
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from nanotulu_kernels import cross_entropy, dpo

        def compile_for_h100(fn, signature, constexprs):
            signature = {**signature, **{name: "constexpr" for name in constexprs}}
            source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

        for dtype in ("bf16", "fp32"):
            for write_grad in (True, False):
                for block_v in (4096, 64):
                    kernel = compile_for_h100(cross_entropy._cross_entropy_kernel, {
                        "logits_ptr": f"*{dtype}", "logits_row_stride": "i64", "labels_ptr": "*i64",
                        "loss_ptr": "*fp32", "scale_ptr": "*fp32", "scale_stride": "i32", "n_rows": "i32",
                        "n_cols": "i32", "ignore_index": "i32", "z_loss": "fp32"},
                        {"WRITE_GRAD": write_grad, "BLOCK_ROWS": 1, "BLOCK_V": block_v})
                    assert kernel.asm["cubin"], "no cubin"
        pointers = ["pc_ptr", "pr_ptr", "nc_ptr", "nr_ptr", "rc_ptr", "rr_ptr", "loss_ptr", "grad_c_ptr",
                    "grad_r_ptr", "reward_c_ptr", "reward_r_ptr"]
        signature = {name: "*i64" if name in ("nc_ptr", "nr_ptr") else "*fp32" for name in pointers}
        signature.update(num_pairs="i32", beta="fp32", label_smoothing="fp32", simpo_gamma="fp32")
        for loss_type in range(4):
            kernel = compile_for_h100(dpo._preference_kernel, signature, {"LOSS_TYPE": loss_type, "BLOCK": 128})
            assert kernel.asm["cubin"], "no cubin"
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root, TRITON_CACHE_DIR=str(tmp_path))  # compiled afresh, never from a cache
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_bad_inputs_name_the_tensor(backend):
    hidden, weight, labels = make_inputs()
    with pytest.raises(ValueError, match="weight must be"):
        kernels.fused_linear_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="labels must be"):
        kernels.fused_linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="reduction"):
        kernels.fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")


def test_triton_path_refuses_labels_outside_the_vocabulary(monkeypatch):
    """Compiled Triton would read another row's logits for them (the interpreter is no guide here)."""
    monkeypatch.setenv("NANOTULU_KERNELS", "triton")
    hidden, weight, labels = make_inputs()
    for bad in (V, -1):
        wrong = labels.clone()
        wrong[3] = bad
        with pytest.raises(ValueError, match=rf"label {bad} is outside the vocabulary \[0, {V}\)"):
            kernels.fused_linear_cross_entropy(hidden, weight, wrong)


def test_dispatch(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("NANOTULU_KERNELS", raising=False)
    assert kernels.backend_for(x) == "torch"  # CPU tensors default to the reference
    monkeypatch.setenv("NANOTULU_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (NANOTULU_TEST_DEVICE=cuda runs leave it unset)
    assert kernels.backend_for(x) == "triton"
    monkeypatch.setenv("NANOTULU_KERNELS", "cuda")
    with pytest.raises(kernels.BackendError, match="NANOTULU_KERNELS must be 'triton' or 'torch', got 'cuda'"):
        kernels.backend_for(x)
    monkeypatch.setenv("NANOTULU_KERNELS", "triton")  # on the CPU without the interpreter Triton has no driver
    for off in ("0", "off", ""):
        monkeypatch.setenv("TRITON_INTERPRET", off)
        with pytest.raises(kernels.BackendError, match="NANOTULU_KERNELS=triton on a cpu device: .* TRITON_INTERPRET"):
            kernels.backend_for(x)
    monkeypatch.setenv("TRITON_INTERPRET", "true")  # Triton's own words for on
    assert kernels.backend_for(x) == "triton"


# --- sequence log-probs (DPO, reward model, RLVR) ------------------------------------------------------------

def naive_token_logps(hidden, weight, labels):
    logps = torch.log_softmax(F.linear(hidden.float(), weight.float()), -1)
    valid = labels != -100
    return logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid


def make_pairs(pairs=3, seq_len=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, seq_len, H, generator=g)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H) * 3
    labels = torch.randint(0, V, (2 * pairs, seq_len), generator=g)
    prompt = torch.tensor([2, 3, 1, 2, 4, 3])[:2 * pairs]  # prompt lengths differ per row
    labels[torch.arange(seq_len)[None, :] < prompt[:, None]] = -100
    labels[0, -2:] = -100                                  # right padding
    ref_chosen = -torch.rand(pairs, generator=g) * 30 - 20
    ref_rejected = -torch.rand(pairs, generator=g) * 30 - 20
    return tuple(t.to(DEVICE) for t in (hidden, weight, labels, ref_chosen, ref_rejected))


def test_sequence_logprobs_and_per_token_logprobs(backend):
    hidden, weight, labels, _, _ = make_pairs()
    upstream = upstream_grad(6, 4)
    got = loss_and_grads(lambda h, w: kernels.sequence_logprobs(h, w, labels)[0], hidden, weight, upstream)
    want = loss_and_grads(lambda h, w: naive_token_logps(h, w, labels).sum(1), hidden, weight, upstream)
    for a, b, name in zip(got, want, ("logps", "grad_hidden", "grad_weight")):
        assert_close(a, b, 1e-5, name)
    assert torch.equal(kernels.sequence_logprobs(hidden, weight, labels)[1], (labels != -100).sum(1))
    empty = labels.clone()
    empty[1] = -100  # a row with nothing to score: log-prob 0 over 0 tokens
    logps, counts = kernels.sequence_logprobs(hidden, weight, empty)
    assert logps[1].item() == 0 and counts[1].item() == 0
    per_token = -kernels.fused_linear_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(), reduction="none")
    assert_close(per_token, naive_token_logps(hidden, weight, labels).flatten(), 1e-5, "per-token logps")


# --- fused DPO ------------------------------------------------------------------------------------------------

def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def hand_dpo(loss_type, pc, pr, nc, nr, rc, rr, beta, eps, gamma):
    """The pair losses of reference.preference_loss's docstring, one pair at a time in Python floats. Returns
    (loss, chosen_reward, rejected_reward) for the pair."""
    if loss_type != "dpo":  # mean over response tokens
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    if loss_type == "simpo":  # -log sigmoid(beta (avg_c - avg_r) - gamma), no reference
        return -log_sigmoid(beta * (pc - pr) - gamma), beta * pc, beta * pr
    z = (pc - pr) - (rc - rr)
    if loss_type == "ipo":    # (z - 1/(2 beta))^2
        loss = (z - 1 / (2 * beta)) ** 2
    else:                     # -(1-eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
        loss = -(1 - eps) * log_sigmoid(beta * z) - eps * log_sigmoid(-beta * z)
    return loss, beta * (pc - rc), beta * (pr - rr)


def naive_dpo_loss(hidden, weight, labels, ref_c, ref_r, loss_type, beta, eps, gamma):
    """The same formulas in torch on full logits, for autograd to differentiate."""
    logps = naive_token_logps(hidden, weight, labels).sum(1)
    counts = (labels != -100).sum(1).float()
    b = len(ref_c)
    pc, pr, rc, rr = logps[:b], logps[b:], ref_c, ref_r
    if loss_type != "dpo":
        pc, pr, rc, rr = pc / counts[:b], pr / counts[b:], rc / counts[:b], rr / counts[b:]
    if loss_type == "simpo":
        return -F.logsigmoid(beta * (pc - pr) - gamma).mean()
    z = (pc - pr) - (rc - rr)
    if loss_type == "ipo":
        return ((z - 1 / (2 * beta)) ** 2).mean()
    return (-(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)).mean()


@pytest.mark.parametrize("loss_type,beta,eps,gamma", [
    ("dpo", 0.1, 0.0, 0.5), ("dpo", 0.1, 0.2, 0.5), ("dpo_norm", 5.0, 0.0, 0.5), ("dpo_norm", 5.0, 0.1, 0.5),
    ("simpo", 2.0, 0.0, 0.5), ("simpo", 2.0, 0.0, 1.5), ("ipo", 0.5, 0.0, 0.5)])
def test_dpo_losses_match_hand_formula_and_autograd(backend, loss_type, beta, eps, gamma):
    hidden, weight, labels, ref_c, ref_r = make_pairs()
    kwargs = dict(loss_type=loss_type, beta=beta, label_smoothing=eps, simpo_gamma=gamma)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = kernels.fused_linear_dpo_loss(h, w, labels, ref_c, ref_r, **kwargs)
    out.loss.backward()

    logps = naive_token_logps(hidden, weight, labels).sum(1).tolist()
    counts = (labels != -100).sum(1).tolist()
    pairs = [hand_dpo(loss_type, logps[i], logps[i + 3], counts[i], counts[i + 3], ref_c[i].item(),
                      ref_r[i].item(), beta, eps, gamma) for i in range(3)]
    losses, chosen_rewards, rejected_rewards = (torch.tensor(col) for col in zip(*pairs))
    assert abs(out.loss.item() - losses.mean().item()) <= 1e-5 * max(1.0, abs(losses.mean().item()))
    assert_close(out.chosen_logps.detach(), torch.tensor(logps[:3]), 1e-5, "chosen_logps")
    assert_close(out.rejected_logps.detach(), torch.tensor(logps[3:]), 1e-5, "rejected_logps")
    assert_close(out.chosen_rewards, chosen_rewards, 1e-5, "chosen_rewards")
    assert_close(out.rejected_rewards, rejected_rewards, 1e-5, "rejected_rewards")
    assert_close(out.margins, chosen_rewards - rejected_rewards, 1e-5, "margins")
    assert out.accuracy.item() == (chosen_rewards > rejected_rewards).float().mean().item()
    assert not out.chosen_rewards.requires_grad and not out.margins.requires_grad

    _, grad_h, grad_w = loss_and_grads(
        lambda h, w: naive_dpo_loss(h, w, labels, ref_c, ref_r, loss_type, beta, eps, gamma), hidden, weight)
    assert_close(h.grad, grad_h, 1e-5, "grad_hidden")
    assert_close(w.grad, grad_w, 1e-5, "grad_weight")


def test_preference_loss_serves_the_reward_model(backend):
    """Bradley-Terry on scalar scores: loss_type='dpo', beta=1, zero references; gradient -sigmoid(-d)/B."""
    scores = torch.tensor([1.5, -0.3, 0.2, 0.5, 0.4, 2.0], device=DEVICE, requires_grad=True)
    chosen, rejected = scores[:3], scores[3:]
    ones, zeros = torch.ones(3, dtype=torch.long, device=DEVICE), torch.zeros(3, device=DEVICE)
    out = kernels.preference_loss(chosen, rejected, ones, ones, zeros, zeros, loss_type="dpo", beta=1.0)
    out.loss.backward()
    d = (chosen - rejected).detach()
    assert torch.allclose(out.loss, -F.logsigmoid(d).mean(), atol=1e-6)
    assert torch.allclose(scores.grad, torch.cat([-torch.sigmoid(-d), torch.sigmoid(-d)]) / 3, atol=1e-6)
    assert out.accuracy.item() == pytest.approx(1 / 3)  # only the first pair has chosen > rejected


def test_the_preference_loss_gradient_carries_the_upstream_factor(backend):
    """The trainers backpropagate loss / grad_accum: each pair's gradient is scaled by the same factor."""
    scores = torch.tensor([1.5, -0.3, 0.2, 0.5, 0.4, 2.0], device=DEVICE, requires_grad=True)
    chosen, rejected = scores[:3], scores[3:]
    ones, zeros = torch.ones(3, dtype=torch.long, device=DEVICE), torch.zeros(3, device=DEVICE)
    out = kernels.preference_loss(chosen, rejected, ones, ones, zeros, zeros, loss_type="dpo", beta=1.0)
    (out.loss / 4).backward()
    d = (chosen - rejected).detach()
    assert torch.allclose(scores.grad, torch.cat([-torch.sigmoid(-d), torch.sigmoid(-d)]) / 3 / 4, atol=1e-7)


def test_the_reference_log_probs_get_the_policy_gradient_negated_on_both_backends(backend):
    """The trainers pass detached references, but one that requires grad gets its gradient on both backends alike
    (the Triton path returned none): z takes pc - rc and pr - rr, so it is the policy's negated (none for SimPO)."""
    for loss_type in ("dpo", "dpo_norm", "ipo", "simpo"):
        pc, pr, rc, rr = (torch.tensor(v, device=DEVICE, requires_grad=True)
                          for v in ([-6.0, -3.0], [-9.0, -4.0], [-7.0, -2.0], [-8.0, -5.0]))
        counts = torch.tensor([3, 2], device=DEVICE)
        kernels.preference_loss(pc, pr, counts, counts, rc, rr, loss_type=loss_type, beta=2.0).loss.backward()
        if loss_type == "simpo":
            assert rc.grad is None or not rc.grad.any(), loss_type
        else:
            torch.testing.assert_close(rc.grad, -pc.grad, msg=loss_type)
            torch.testing.assert_close(rr.grad, -pr.grad, msg=loss_type)


def test_the_loss_gradient_does_not_depend_on_the_autocast_a_backward_runs_under(backend):
    """A backward() called under bf16 autocast recomputed the logits in bf16 for a loss taken in fp32 (the reference's
    chunks: gradients ~4% off) or failed (the Triton per-token path: an fp32 out= GEMM of bf16 operands)."""
    hidden, weight, labels = make_inputs()
    for reduction in ("none", "mean"):
        grads = []
        for under_autocast in (False, True):
            h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
            loss = kernels.fused_linear_cross_entropy(h, w, labels, reduction=reduction)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=under_autocast):
                (loss * upstream_grad(N, 1) if reduction == "none" else loss).sum().backward()
            grads.append((h.grad, w.grad))
        for a, b, name in zip(*grads, ("grad_hidden", "grad_weight")):
            assert_close(a, b, 1e-6, f"{backend}/{reduction} {name}")


def test_an_empty_response_is_averaged_over_one_token(backend):
    """A response with no scored token (summed log-prob 0) counts as one token in the per-token means: finite
    losses and gradients, the hand formula with a count of 1."""
    counts_c, counts_r = [3, 0], [4, 2]
    for loss_type, beta in (("dpo_norm", 5.0), ("simpo", 2.0), ("ipo", 0.5)):
        pc = torch.tensor([-6.0, 0.0], device=DEVICE, requires_grad=True)
        pr = torch.tensor([-9.0, -4.0], device=DEVICE, requires_grad=True)
        rc, rr = torch.tensor([-7.0, 0.0], device=DEVICE), torch.tensor([-8.0, -5.0], device=DEVICE)
        out = kernels.preference_loss(pc, pr, torch.tensor(counts_c, device=DEVICE),
                                      torch.tensor(counts_r, device=DEVICE), rc, rr, loss_type=loss_type, beta=beta)
        out.loss.backward()
        want = sum(hand_dpo(loss_type, pc[i].item(), pr[i].item(), max(counts_c[i], 1), counts_r[i], rc[i].item(),
                            rr[i].item(), beta, 0.0, 0.5)[0] for i in range(2)) / 2
        assert out.loss.item() == pytest.approx(want, rel=1e-5), loss_type
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), loss_type


def test_dpo_bad_arguments(backend):
    hidden, weight, labels, ref_c, ref_r = make_pairs()
    with pytest.raises(ValueError, match="loss_type"):
        kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, loss_type="kto")
    for beta in (0, float("nan"), float("inf")):  # 0: a constant loss, ipo divides by it; nan, inf: a nan loss
        with pytest.raises(ValueError, match=f"beta must be a finite number > 0, got {beta}"):
            kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, beta=beta)
    with pytest.raises(ValueError, match="simpo_gamma must be a finite number, got nan"):
        kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, loss_type="simpo",
                                      simpo_gamma=float("nan"))
    with pytest.raises(ValueError, match="label_smoothing"):
        kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, loss_type="ipo", label_smoothing=0.1)
    for eps in (0.5, 1.0, -2.0):  # from 0.5 on the loss prefers the rejected answer; below 0 it is unbounded
        with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 0.5\), got {eps}"):
            kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, loss_type="dpo", label_smoothing=eps)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r[:2])


def test_fp32_output_gemm_is_used_only_where_it_reads_a_transposed_operand_right(monkeypatch):
    """The LM-head weight gradient sums logits.t() @ h straight into fp32 where the device's GEMM can; the probe that
    decides runs that call's shape, so a GEMM that misreads a transposed operand is never trusted with it."""
    from nanotulu_kernels import cross_entropy
    cpu = torch.device("cpu")

    def fake_addmm(misread):
        def addmm(acc, a, b, out_dtype, out):
            if misread:  # the storage read row-major, the transpose's strides ignored
                a = torch.as_strided(a, a.shape, (a.shape[1], 1))
            return out.add_(a.float() @ b.float())
        return addmm

    for misread, trusted in ((False, True), (True, False)):
        monkeypatch.setattr(cross_entropy, "_FP32_OUT_GEMM", {})
        monkeypatch.setattr(torch, "addmm", fake_addmm(misread))
        assert cross_entropy._fp32_out_gemm(cpu, torch.bfloat16) is trusted
