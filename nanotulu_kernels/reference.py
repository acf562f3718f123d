"""Readable PyTorch versions of the fused losses: the spec, the CPU path and the baseline.

Same signatures as the Triton path in cross_entropy.py and dpo.py. All arithmetic is fp32 (the weight is
upcast once, so the weight gradient is summed over chunks in fp32 and cast to the parameter's dtype once). The
Triton path keeps each chunk's logits in the input dtype, as Liger's does (and as generation's LM head does), and
takes the loss from them in fp32: on bf16 inputs the two backends differ by the logits' bf16 rounding (a few 1e-2
at most in a log-prob, for logits of a trained model's size), which their tests allow. The
LM head is applied chunk by chunk with activation checkpointing, so at most one chunk of `[rows, V]` logits is
alive at a time in forward and in backward: memory bounded, though slower than the kernels (each chunk's logits
are computed twice, unless one chunk holds them all).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Logits elements one chunk may hold (fp32: 4 bytes each). Module level so tests can shrink it to force
# several chunks on tiny shapes.
LOGITS_BUDGET = 2**24

REDUCTIONS = ("mean", "sum", "none")
LOSS_TYPES = ("dpo", "dpo_norm", "simpo", "ipo")


def check_linear_ce_inputs(hidden, weight, labels, reduction):
    """Shape/dtype checks shared by both backends; no device sync."""
    if hidden.dim() != 2:
        raise ValueError(f"fused_linear_cross_entropy: hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: weight must be [V, H={hidden.shape[1]}], "
                         f"got shape {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: labels must be [N={hidden.shape[0]}], "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fused_linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"fused_linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def chunk_rows(num_rows, vocab_size, budget):
    """Rows per chunk so that rows x V stays within the budget, with chunks of near-equal size."""
    num_chunks = max(1, -(-num_rows * vocab_size // budget))
    return max(1, -(-num_rows // num_chunks))


def _chunk_token_losses(hidden, weight32, labels, ignore_index, z_loss):
    logits = hidden.float() @ weight32.t()
    lse = torch.logsumexp(logits, dim=-1)
    valid = labels != ignore_index
    target = logits.gather(1, torch.where(valid, labels, 0).long().unsqueeze(1)).squeeze(1)
    loss = lse - target + lse * (z_loss * lse)  # not z_loss * lse**2: that is 0 * inf = nan once lse**2 overflows
    return torch.where(valid, loss, 0.0)


class RecomputedChunk(torch.autograd.Function):
    """Activation checkpointing of one chunk, written out: forward keeps only the inputs, backward recomputes
    the chunk's logits and differentiates them. (torch.utils.checkpoint does the same but costs seconds of
    imports on its first call.)"""

    @staticmethod
    def forward(ctx, hidden, weight32, labels, ignore_index, z_loss):
        ctx.save_for_backward(hidden, weight32, labels)
        ctx.ignore_index, ctx.z_loss = ignore_index, z_loss
        return _chunk_token_losses(hidden, weight32, labels, ignore_index, z_loss)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight32, labels = ctx.saved_tensors
        # autocast off: a backward() called under autocast would recompute bf16 logits for a loss taken in fp32
        with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.detach().requires_grad_(), weight32.detach().requires_grad_()
            loss = _chunk_token_losses(h, w, labels, ctx.ignore_index, ctx.z_loss)
            grad_hidden, grad_weight = torch.autograd.grad(loss, (h, w), grad_loss)
        return grad_hidden, grad_weight, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", z_loss=0.0):
    """Cross-entropy of softmax(hidden @ weight.T) against labels, plus z_loss * logsumexp^2 per token.

    Returns a scalar for 'mean' (over non-ignored tokens; 0 when there are none) and 'sum', or [N] fp32 for
    'none' (0 at ignored rows).
    """
    check_linear_ce_inputs(hidden, weight, labels, reduction)
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    weight32 = weight.float()
    rows = chunk_rows(num_rows, vocab_size, LOGITS_BUDGET)
    if rows >= num_rows:
        # One chunk (at most LOGITS_BUDGET fp32 elements, 64 MiB): keep its logits for backward rather than
        # compute them twice, ~5% of a CPU SFT step at the demo's size. (Recomputing bounds the memory only
        # between this forward and its backward: in SFT and DPO nothing runs there; in PPO, the value model.)
        loss = _chunk_token_losses(hidden, weight32, labels, ignore_index, z_loss)
    else:
        loss = torch.cat([RecomputedChunk.apply(hidden[start:start + rows], weight32, labels[start:start + rows],
                                                ignore_index, z_loss) for start in range(0, num_rows, rows)])
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (labels != ignore_index).sum().clamp(min=1)


def sequence_logprobs(hidden, weight, labels, ignore_index=-100, cross_entropy=None):
    """Summed label log-probs per sequence: ([B] fp32, number of non-ignored tokens [B] long).

    hidden [B, T, H], labels [B, T] (already shifted). Differentiable w.r.t. hidden and weight. Per-token
    log-probs (RLVR) are -fused_linear_cross_entropy(..., reduction='none'). The composition is the same for
    every backend: `cross_entropy` is the backend's fused linear cross-entropy (default: this file's).
    """
    cross_entropy = cross_entropy or fused_linear_cross_entropy
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"sequence_logprobs: expected hidden [B, T, H] and labels [B, T], got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    batch, seq_len, dim = hidden.shape
    token_loss = cross_entropy(hidden.reshape(-1, dim), weight, labels.reshape(-1), ignore_index=ignore_index,
                               reduction="none")
    return -token_loss.view(batch, seq_len).sum(1), (labels != ignore_index).sum(1)


@dataclass
class DPOOutput:
    loss: torch.Tensor              # scalar, mean over pairs
    chosen_logps: torch.Tensor      # [B] summed policy log-probs of the chosen responses
    rejected_logps: torch.Tensor    # [B]
    chosen_rewards: torch.Tensor    # [B] beta * (policy - ref) in the loss's normalisation, detached
    rejected_rewards: torch.Tensor  # [B]
    margins: torch.Tensor           # [B] chosen_rewards - rejected_rewards
    accuracy: torch.Tensor          # scalar, mean(chosen_rewards > rejected_rewards)


def check_preference_args(loss_type, beta, label_smoothing, simpo_gamma=0.0):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"preference loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not (math.isfinite(beta) and beta > 0):  # (nan and inf passed a plain > 0 test, for a nan loss)
        raise ValueError(f"preference loss: beta must be a finite number > 0, got {beta}")
    if not math.isfinite(simpo_gamma):
        raise ValueError(f"preference loss: simpo_gamma must be a finite number, got {simpo_gamma}")
    if not 0.0 <= label_smoothing < 0.5:  # at 0.5 the loss no longer tells chosen from rejected; past it, it flips
        raise ValueError(f"preference loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("dpo", "dpo_norm"):
        raise ValueError(f"preference loss: label_smoothing applies to dpo/dpo_norm only, got {loss_type!r} "
                         f"with label_smoothing={label_smoothing}")


def preference_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, ref_chosen_logps,
                    ref_rejected_logps, loss_type="dpo_norm", beta=5.0, label_smoothing=0.0, simpo_gamma=0.5):
    """The pairwise loss (Tulu 3's DPO family, written out below) from summed log-probs and token counts.

    z = (logp_c - logp_r) - (ref_c - ref_r), eps = label_smoothing:
      dpo:      -(1-eps) log sigmoid(beta z) - eps log sigmoid(-beta z), logps summed over response tokens
      dpo_norm: the same with every logp the mean over response tokens
      simpo:    -log sigmoid(beta (avg_c - avg_r) - gamma), no reference
      ipo:      (z - 1/(2 beta))^2 with mean logps
    A reward model's Bradley-Terry loss is loss_type='dpo', beta=1, zero references, scores as logps.
    """
    check_preference_args(loss_type, beta, label_smoothing, simpo_gamma)
    pc, pr = chosen_logps.float(), rejected_logps.float()
    rc, rr = ref_chosen_logps.float(), ref_rejected_logps.float()
    if loss_type != "dpo":  # mean over response tokens; an empty response counts as one token of logp 0
        nc, nr = chosen_tokens.clamp(min=1).float(), rejected_tokens.clamp(min=1).float()
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    if loss_type == "simpo":
        u = beta * (pc - pr) - simpo_gamma
        losses = -F.logsigmoid(u)
        chosen_rewards, rejected_rewards = beta * pc, beta * pr
    else:
        z = (pc - pr) - (rc - rr)
        if loss_type == "ipo":
            losses = (z - 1 / (2 * beta)).square()
        else:
            losses = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return DPOOutput(loss=losses.mean(), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                     chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                     margins=chosen_rewards - rejected_rewards,
                     accuracy=(chosen_rewards > rejected_rewards).float().mean())


def split_pairs(hidden, labels, ref_chosen_logps, ref_rejected_logps):
    """Checks the concatenated [chosen; rejected] batch layout and returns the number of pairs."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or hidden.shape[0] % 2 or hidden.shape[0] == 0:
        raise ValueError(f"fused_linear_dpo_loss: expected hidden [2B, T, H] (B >= 1) and labels [2B, T], got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    pairs = hidden.shape[0] // 2
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if ref.shape != (pairs,):
            raise ValueError(f"fused_linear_dpo_loss: {name} must be [B={pairs}], got {tuple(ref.shape)}")
    return pairs


def fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, loss_type="dpo_norm",
                          beta=5.0, label_smoothing=0.0, simpo_gamma=0.5, ignore_index=-100, cross_entropy=None,
                          pair_loss=None):
    """DPO-family loss from the policy's final hidden states [2B, T, H] (chosen rows first) and the LM head.

    `cross_entropy` and `pair_loss` are the backend's fused pieces (default: this file's references)."""
    pairs = split_pairs(hidden, labels, ref_chosen_logps, ref_rejected_logps)
    check_preference_args(loss_type, beta, label_smoothing, simpo_gamma)
    logps, tokens = sequence_logprobs(hidden, weight, labels, ignore_index, cross_entropy)
    return (pair_loss or preference_loss)(logps[:pairs], logps[pairs:], tokens[:pairs], tokens[pairs:], ref_chosen_logps,
                           ref_rejected_logps, loss_type, beta, label_smoothing, simpo_gamma)
