"""Fused LM-head losses: cross-entropy and the DPO family, without materialising [tokens, V] logits.

Two backends with the same signatures: Triton (cross_entropy.py, dpo.py) and pure PyTorch (reference.py, the
spec). NANOTULU_KERNELS=triton|torch forces one; by default CUDA tensors take
Triton and everything else the reference. Forcing Triton on CPU tensors needs TRITON_INTERPRET=1 set before
triton is imported (the tests do this).

The package is not called `kernels`: that is the import name of Hugging Face's kernel-hub package, which
transformers >= 5.25 imports, and a `kernels/` folder in the repository root would shadow it.

Precision: fp32 or bf16 (what the trainers use). fp16 works at small sizes, but the Triton path stores the
mean-scaled logits gradient in the input dtype, so at real vocabularies and token counts most of it underflows
in fp16, which loss scaling cannot rescue (the upstream gradient is applied after the GEMMs).
"""
import os

import torch

from nanotulu_kernels import cross_entropy, dpo, reference
from nanotulu_kernels.reference import DPOOutput

__all__ = ["BackendError", "DPOOutput", "fused_linear_cross_entropy", "fused_linear_dpo_loss", "preference_loss",
           "sequence_logprobs", "backend_for", "backend_on"]


class BackendError(ValueError):
    """NANOTULU_KERNELS names no backend, or one that cannot run on the device."""


def backend_on(device):
    """'triton' or 'torch': the backend a call on a tensor on `device` takes. The trainers call it at start-up, so
    that a NANOTULU_KERNELS they cannot honour stops them before any work, not at the first loss."""
    choice = os.environ.get("NANOTULU_KERNELS", "").strip().lower()
    if choice not in ("", "triton", "torch"):
        raise BackendError(f"NANOTULU_KERNELS must be 'triton' or 'torch', got {choice!r}")
    # the words Triton itself reads as on
    interpreted = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")
    if choice == "triton" and device.type != "cuda" and not interpreted:
        raise BackendError(f"NANOTULU_KERNELS=triton on a {device.type} device: Triton's kernels run on a CUDA GPU, "
                           f"or under its interpreter with TRITON_INTERPRET=1 (slow; what the tests use)")
    return choice or ("triton" if device.type == "cuda" else "torch")


def backend_for(tensor):
    return backend_on(tensor.device)


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", z_loss=0.0):
    impl = cross_entropy if backend_for(hidden) == "triton" else reference
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # The trainers' bf16 autocast: the LM head runs in the autocast dtype, as F.linear would under it, and
        # the loss itself with autocast off, so that every dtype inside it is explicit (autocast leaves out=
        # GEMMs alone, and a forward recomputed in backward would otherwise see another autocast state).
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return impl.fused_linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels, ignore_index,
                                                   reduction, z_loss)
    return impl.fused_linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, z_loss)


def sequence_logprobs(hidden, weight, labels, ignore_index=-100):
    return reference.sequence_logprobs(hidden, weight, labels, ignore_index, fused_linear_cross_entropy)


def preference_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, ref_chosen_logps,
                    ref_rejected_logps, loss_type="dpo_norm", beta=5.0, label_smoothing=0.0, simpo_gamma=0.5):
    impl = dpo if backend_for(chosen_logps) == "triton" else reference
    return impl.preference_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, ref_chosen_logps,
                                ref_rejected_logps, loss_type, beta, label_smoothing, simpo_gamma)


def fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, loss_type="dpo_norm",
                          beta=5.0, label_smoothing=0.0, simpo_gamma=0.5, ignore_index=-100):
    return reference.fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, loss_type,
                                           beta, label_smoothing, simpo_gamma, ignore_index,
                                           fused_linear_cross_entropy, preference_loss)
