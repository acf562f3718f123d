"""Fused DPO-family loss in Triton.

The expensive part, the policy's per-sequence label log-probs, goes through the fused linear cross-entropy
(nanotulu_kernels/cross_entropy.py, reduction 'none'), so no [tokens, V] logits are ever held. The pair loss is a small
kernel that computes, per pair, the loss of reference.preference_loss, its gradient with respect to the two
summed log-probs, and the rewards; the gradient flows back into sequence_logprobs as a per-token upstream.
"""
import torch
import triton
import triton.language as tl

from nanotulu_kernels.reference import DPOOutput, LOSS_TYPES, check_preference_args

BLOCK_PAIRS = 128


@triton.jit
def _log_sigmoid(x):
    # stable for both signs, without libdevice: log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|))
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _preference_kernel(pc_ptr, pr_ptr, nc_ptr, nr_ptr, rc_ptr, rr_ptr, loss_ptr, grad_c_ptr, grad_r_ptr,
                       reward_c_ptr, reward_r_ptr, num_pairs, beta, label_smoothing, simpo_gamma,
                       LOSS_TYPE: tl.constexpr, BLOCK: tl.constexpr):
    # LOSS_TYPE: 0 dpo, 1 dpo_norm, 2 simpo, 3 ipo (the order of reference.LOSS_TYPES)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    pc = tl.load(pc_ptr + offs, mask=mask, other=0.0)
    pr = tl.load(pr_ptr + offs, mask=mask, other=0.0)
    rc = tl.load(rc_ptr + offs, mask=mask, other=0.0)
    rr = tl.load(rr_ptr + offs, mask=mask, other=0.0)
    # d(normalised logp)/d(summed logp): 1 for summed logps, 1/count for means (an empty response counts 1)
    inv_c = tl.full([BLOCK], 1.0, tl.float32)
    inv_r = tl.full([BLOCK], 1.0, tl.float32)
    if LOSS_TYPE != 0:
        inv_c = 1.0 / tl.maximum(tl.load(nc_ptr + offs, mask=mask, other=1).to(tl.float32), 1.0)
        inv_r = 1.0 / tl.maximum(tl.load(nr_ptr + offs, mask=mask, other=1).to(tl.float32), 1.0)
    pc, pr, rc, rr = pc * inv_c, pr * inv_r, rc * inv_c, rr * inv_r

    if LOSS_TYPE == 2:  # simpo: -log sigmoid(u), u = beta (avg_c - avg_r) - gamma; d/du = -sigmoid(-u)
        u = beta * (pc - pr) - simpo_gamma
        loss = -_log_sigmoid(u)
        dlogits = -beta * tl.exp(_log_sigmoid(-u))
        reward_c, reward_r = beta * pc, beta * pr
    else:
        z = (pc - pr) - (rc - rr)
        if LOSS_TYPE == 3:  # ipo: (z - 1/(2 beta))^2
            loss = (z - 0.5 / beta) * (z - 0.5 / beta)
            dlogits = 2.0 * (z - 0.5 / beta)
        else:  # dpo / dpo_norm with label smoothing eps
            loss = -(1.0 - label_smoothing) * _log_sigmoid(beta * z) - label_smoothing * _log_sigmoid(-beta * z)
            dlogits = beta * (-(1.0 - label_smoothing) * tl.exp(_log_sigmoid(-beta * z))
                              + label_smoothing * tl.exp(_log_sigmoid(beta * z)))
        reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
    # the loss is the mean over pairs, so each pair's gradient carries 1/num_pairs
    dlogits = dlogits / num_pairs
    tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(grad_c_ptr + offs, dlogits * inv_c, mask=mask)
    tl.store(grad_r_ptr + offs, -dlogits * inv_r, mask=mask)
    tl.store(reward_c_ptr + offs, reward_c, mask=mask)
    tl.store(reward_r_ptr + offs, reward_r, mask=mask)


class PreferenceLossFunction(torch.autograd.Function):
    """Mean pair loss from summed log-probs; also returns the (non-differentiable) rewards."""

    @staticmethod
    def forward(ctx, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, ref_chosen_logps,
                ref_rejected_logps, loss_type, beta, label_smoothing, simpo_gamma):
        num_pairs = chosen_logps.shape[0]
        f32 = dict(dtype=torch.float32, device=chosen_logps.device)
        inputs = [t.to(torch.float32).contiguous() for t in
                  (chosen_logps, rejected_logps)] + [chosen_tokens.contiguous(), rejected_tokens.contiguous()] + \
                 [t.to(torch.float32).contiguous() for t in (ref_chosen_logps, ref_rejected_logps)]
        losses, grad_c, grad_r, reward_c, reward_r = (torch.empty(num_pairs, **f32) for _ in range(5))
        _preference_kernel[(triton.cdiv(num_pairs, BLOCK_PAIRS),)](
            *inputs, losses, grad_c, grad_r, reward_c, reward_r, num_pairs, float(beta), float(label_smoothing),
            float(simpo_gamma), LOSS_TYPE=LOSS_TYPES.index(loss_type), BLOCK=BLOCK_PAIRS)
        ctx.save_for_backward(grad_c, grad_r)
        ctx.mark_non_differentiable(reward_c, reward_r)
        ctx.loss_type = loss_type
        return losses.mean(), reward_c, reward_r

    @staticmethod
    def backward(ctx, grad_loss, _grad_reward_c, _grad_reward_r):
        grad_c, grad_r = ctx.saved_tensors
        # The reference log-probs enter every loss but SimPO's as the policy's do with the sign flipped (z takes
        # pc - rc and pr - rr, each over the same token count), so their gradients are the policy's negated.
        ref_grads = (None, None) if ctx.loss_type == "simpo" else (-grad_c * grad_loss, -grad_r * grad_loss)
        return grad_c * grad_loss, grad_r * grad_loss, None, None, *ref_grads, None, None, None, None


def preference_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, ref_chosen_logps,
                    ref_rejected_logps, loss_type="dpo_norm", beta=5.0, label_smoothing=0.0, simpo_gamma=0.5):
    """Triton path of kernels.preference_loss (formulas in nanotulu_kernels/reference.py)."""
    check_preference_args(loss_type, beta, label_smoothing, simpo_gamma)
    loss, chosen_rewards, rejected_rewards = PreferenceLossFunction.apply(
        chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, ref_chosen_logps, ref_rejected_logps,
        loss_type, beta, label_smoothing, simpo_gamma)
    return DPOOutput(loss=loss, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                     chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                     margins=chosen_rewards - rejected_rewards,
                     accuracy=(chosen_rewards > rejected_rewards).float().mean())
