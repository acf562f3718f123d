"""Fused linear cross-entropy in Triton: the LM head and its loss without ever holding [N, V] logits.

The N tokens are processed in chunks whose logits fit a fixed budget. Per chunk:
  logits = h @ W^T                      (GEMM 1, input dtype, fp32 accumulate)
  _cross_entropy_kernel                 one program per row: online log-sum-exp over vocab tiles, the label's
                                        logit, the loss, then the row overwritten in place with its gradient
                                        (softmax * (1 + 2 z lse) - onehot) * scale, computed in fp32
  grad_h = G @ W                        (GEMM 2)
  grad_W += G^T @ h                     (GEMM 3, fp32 output summed over chunks in an fp32 buffer)
The chunk buffer is private to this loop, never a tensor autograd saved, so writing the gradient over it is
safe. For 'mean' and 'sum' the upstream gradient is a scalar, so the gradients are computed during forward
and only scaled in backward (3 GEMMs in all). For 'none' the upstream is one number per token, unknown in
forward, so forward computes losses only and backward recomputes each chunk with the per-token upstream as
the scale (4 GEMMs); an upstream broadcast from a scalar (loss.sum().backward()) arrives with stride 0 and is
read through its stride, never assumed contiguous.
"""
import os
import warnings

import torch
import triton
import triton.language as tl

from nanotulu_kernels.reference import check_linear_ce_inputs, chunk_rows

# Logits elements one chunk may hold: 2^26 bf16 = 128 MiB, about 1365 rows at V = 49152, which keeps the
# GEMMs large enough to run at full rate. Tests shrink both constants to force several chunks and tiles.
LOGITS_BUDGET = 2**26
MAX_BLOCK_V = 4096
# On a GPU one row per program (a row is 49152 logits, plenty of work). The interpreter pays per operation,
# not per element, so there a program takes a block of rows.
ROWS_PER_PROGRAM = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 1


@triton.jit
def _cross_entropy_kernel(logits_ptr, logits_row_stride, labels_ptr, loss_ptr, scale_ptr, scale_stride,
                          n_rows, n_cols, ignore_index, z_loss, WRITE_GRAD: tl.constexpr,
                          BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    # int64 row offsets: row * row_stride exceeds 2^31 as soon as N x V does (44k tokens at V = 49152).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows[:, None] * logits_row_stride
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = (labels != ignore_index) & row_mask
    safe_labels = tl.where(valid, labels, 0)

    # Pass 1: online log-sum-exp, a running max and sum per lane, merged at the end; and the label's logit, taken
    # from the tiles as they pass rather than loaded afterwards: pass 2 overwrites the row in place, and on a GPU
    # the warps that own other columns may already be writing while a later load is still in flight.
    m = tl.full([BLOCK_ROWS, BLOCK_V], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_ROWS, BLOCK_V], tl.float32)
    target = tl.zeros([BLOCK_ROWS], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(row_ptrs + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        target += tl.sum(tl.where(cols[None, :] == safe_labels[:, None], x, 0.0), 1)
        m_new = tl.maximum(m, x)
        # lanes that have seen only padding keep m = -inf; guard the exp against (-inf) - (-inf) = nan
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    # rows past n_rows (last program of a block) saw only padding: give them a harmless lse of 0
    m_row = tl.where(row_mask, tl.max(m, 1), 0.0)
    total = tl.where(row_mask, tl.sum(d * tl.exp(m - m_row[:, None]), 1), 1.0)
    lse = m_row + tl.log(total)

    loss = lse - target + z_loss * lse * lse
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_mask)

    if WRITE_GRAD:
        # Pass 2: d(loss)/d(logits) = softmax * (1 + 2 z lse) - onehot, in fp32 so that the true class's
        # p - 1 does not cancel in bf16; ignored rows get scale 0, so zeros.
        scale = tl.load(scale_ptr + rows * scale_stride, mask=row_mask, other=0.0).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)[:, None]
        lse2 = lse[:, None]
        coef = 1.0 + 2.0 * z_loss * lse2
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            x = tl.load(row_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse2) * coef - tl.where(cols[None, :] == safe_labels[:, None], 1.0, 0.0)
            tl.store(row_ptrs + cols[None, :], (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_rows(logits, labels, loss, scale, write_grad, ignore_index, z_loss):
    n_rows, vocab_size = logits.shape
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    _cross_entropy_kernel[(triton.cdiv(n_rows, ROWS_PER_PROGRAM),)](
        logits, logits.stride(0), labels, loss, scale, scale.stride(0) if scale.dim() else 0, n_rows,
        vocab_size, ignore_index, z_loss, WRITE_GRAD=write_grad, BLOCK_ROWS=ROWS_PER_PROGRAM, BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4)


def chunked_cross_entropy(hidden, weight, labels, ignore_index, z_loss, scale, need_hidden_grad,
                          need_weight_grad):
    """Per-token losses [N] fp32 and, when asked, grad_hidden (input dtype) and grad_weight (fp32) of
    sum_i scale_i * loss_i, where scale is a 0-dim tensor or one value per token (any stride)."""
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    loss = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    write_grad = need_hidden_grad or need_weight_grad
    rows = chunk_rows(num_rows, vocab_size, LOGITS_BUDGET)
    for start in range(0, num_rows, rows):
        end = min(num_rows, start + rows)
        h = hidden[start:end]
        logits = h @ weight.t()
        chunk_scale = scale[start:end] if scale.dim() else scale
        _launch_rows(logits, labels[start:end], loss[start:end], chunk_scale, write_grad, ignore_index, z_loss)
        if need_hidden_grad:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_weight_grad:
            _accumulate_fp32(grad_weight, logits.t(), h)
    return loss, grad_hidden, grad_weight


_FP32_OUT_GEMM = {}


def _fp32_out_gemm(device, dtype):
    """Whether this device's GEMM of `dtype` (bf16 / fp16) operands can accumulate straight into an fp32 tensor
    (out_dtype, CUDA in recent torch). Probed once per device and dtype on a tiny product laid out as the real call
    (a transposed first operand: logits.t() @ h) with values that tell a transposed read from a right one, checked
    against the fp32 result."""
    if (device, dtype) not in _FP32_OUT_GEMM:
        a = torch.arange(6, dtype=dtype, device=device).view(3, 2).t()
        b = torch.arange(6, dtype=dtype, device=device).view(3, 2)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        expected = acc + a.float() @ b.float()
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            works = torch.equal(acc, expected)
        except (RuntimeError, NotImplementedError, TypeError):
            works = False
        _FP32_OUT_GEMM[device, dtype] = works
        if device.type == "cuda" and not works:  # expected on CPU; on a GPU it costs speed
            warnings.warn(f"torch {torch.__version__} on {device}: no {dtype} GEMM with a right fp32 output, so the "
                          "LM-head weight gradient upcasts each logits chunk to fp32 (same result, slower; a newer "
                          "torch has addmm(out_dtype=))")
    return _FP32_OUT_GEMM[device, dtype]


def _accumulate_fp32(acc, a, b):
    """acc += a @ b with acc fp32. A low-precision product is never rounded to bf16 before the sum: where
    the GEMM cannot write fp32 directly, the operands are upcast (CPU, older torch)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _fp32_out_gemm(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, z_loss, need_hidden_grad, need_weight_grad):
        ctx.reduction, ctx.ignore_index, ctx.z_loss = reduction, ignore_index, z_loss
        ctx.need = (need_hidden_grad, need_weight_grad)
        if reduction == "none":
            ones = torch.ones((), dtype=torch.float32, device=hidden.device)
            loss, _, _ = chunked_cross_entropy(hidden, weight, labels, ignore_index, z_loss, ones, False, False)
            ctx.save_for_backward(hidden, weight, labels)
            return loss
        if reduction == "mean":  # divide by the valid count on device: no .item(), no host sync
            scale = 1.0 / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        loss, grad_hidden, grad_weight = chunked_cross_entropy(hidden, weight, labels, ignore_index, z_loss,
                                                               scale, need_hidden_grad, need_weight_grad)
        if grad_weight is not None:  # the fp32 sum is done: keep only the weight-dtype gradient alive
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss.sum() * scale

    @staticmethod
    def backward(ctx, grad_output):
        need_hidden_grad, need_weight_grad = ctx.need
        if ctx.reduction == "none":
            hidden, weight, labels = ctx.saved_tensors
            with torch.autocast(hidden.device.type, enabled=False):  # as in the forward, whatever backward runs under
                _, grad_hidden, grad_weight = chunked_cross_entropy(
                    hidden, weight, labels, ctx.ignore_index, ctx.z_loss, grad_output.to(torch.float32),
                    need_hidden_grad, need_weight_grad)
        else:
            # Out of place: the saved gradients must survive a second backward (retain_graph=True).
            grad_hidden, grad_weight = ctx.saved_tensors
            if grad_hidden is not None:
                grad_hidden = grad_hidden * grad_output
            if grad_weight is not None:
                grad_weight = grad_weight * grad_output
        # autograd casts an fp32 weight gradient to the weight's dtype
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", z_loss=0.0):
    """Triton path of kernels.fused_linear_cross_entropy (see nanotulu_kernels/reference.py for the spec)."""
    check_linear_ce_inputs(hidden, weight, labels, reduction)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) "
                         f"must share a dtype")
    # Compiled Triton has no bounds checks: a label outside [0, V) would read another row's logits (or fault).
    # One small reduction and a sync per call; the reference's gather fails on its own.
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
    if out_of_range.any():
        raise ValueError(f"fused_linear_cross_entropy: label {labels[out_of_range][0].item()} is outside the "
                         f"vocabulary [0, {weight.shape[0]}) and is not ignore_index={ignore_index}")
    grad_on = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(hidden, weight, labels.contiguous(), ignore_index, reduction,
                                            float(z_loss), grad_on and hidden.requires_grad,
                                            grad_on and weight.requires_grad)
