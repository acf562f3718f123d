"""Speed of an RLVR step: rollout tokens/s, and the share of a step spent generating vs learning.

    python bench/rlvr.py                                        # CPU: the demo model at the demo's shapes
    python bench/rlvr.py --device cuda --preset smollm2-1.7b --dtype bf16 --prompts 64 --samples 1 \\
        --prompt_len 128 --new_tokens 512 --batch_size 8       # GPU: SmolLM2-1.7B, batch 64, 512 new tokens

A step is what train_rlvr.py does, set up as it sets up: fp32 weights (the KV cache in the compute dtype), --dtype
bf16 running both generation and learning under bf16 autocast (the trainer's --precision), fused AdamW on CUDA. It
generates (KV cache, temperature 1, no stop token so every row makes exactly new_tokens tokens), then takes the
no-grad old and reference log-probs, then one clipped-ratio + k3 update over the batch in micro-batches of
batch_size. Random weights: the speed does not depend on what the model knows.

Decoding is memory-bound: each decode step must read every weight once (and the KV cache so far). The bound
printed is tokens/s = batch / (bytes read per step / peak bandwidth), for the weights alone at --dtype's width
(the issue's target: within 2x of it) and for weights + the average KV cache. The trainer's fp32 weights under
autocast read more than that, so the measured share of the bound includes what that setup costs.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import train_rlvr  # noqa: E402
from model import ModelConfig, Transformer, generate  # noqa: E402

# HBM peak bandwidth (vendor datasheets), bytes/s; the first name contained in the device's name wins, so the PCIe
# and NVL H100s come before the SXM one
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "A100": 2.0e12}


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="demo")
    p.add_argument("--vocab", type=int, default=1024, help="vocab size for the demo preset (the demo tokenizer's)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=40)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64, help="sequences per learning micro-batch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    overrides = {"vocab_size": args.vocab} if args.preset == "demo" else {}
    config = ModelConfig.from_preset(args.preset, **overrides)
    torch.manual_seed(0)
    precision = "bf16" if args.dtype == "bf16" else "fp32"
    with torch.device(device):  # fp32 weights, as train_rlvr.py keeps them
        policy = Transformer(config)
        ref = Transformer(config).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=device.type == "cuda")
    B = args.prompts * args.samples
    gen = torch.Generator(device=device).manual_seed(0)
    prompts = [torch.randint(1, config.vocab_size, (args.prompt_len - i % 8,), generator=gen, device=device).tolist()
               for i in range(B)]
    print(f"{args.preset} ({policy.num_params() / 1e6:.1f}M params, fp32 weights, {precision} compute) on {device}: "
          f"{args.prompts} prompts x {args.samples} samples = {B} sequences, prompt ~{args.prompt_len}, "
          f"{args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")

    times = []
    for step in range(args.steps + 1):  # the first step warms up (allocations, kernels) and is not counted
        sync(device)
        t0 = time.perf_counter()
        with common.autocast(device, precision):
            out = generate(policy, prompts, args.new_tokens, temperature=1.0, stop_token_ids=(), generator=gen)
        sync(device)
        t1 = time.perf_counter()
        samples = [{"prompt_ids": p, "response_ids": r} for p, r in zip(prompts, out.tokens)]
        ids, labels = train_rlvr.collate_rollouts(samples, 0, device)
        mask = (labels != -100).float()
        with torch.no_grad(), common.autocast(device, precision):
            old = train_rlvr.token_logprobs(policy, ids, labels) * mask
            ref_logp = train_rlvr.token_logprobs(ref, ids, labels) * mask
        adv = torch.randn(B, 1, device=device) * mask
        policy.train()
        for i in range(0, B, args.batch_size):
            s = slice(i, i + args.batch_size)
            with common.autocast(device, precision):
                logp = train_rlvr.token_logprobs(policy, ids[s], labels[s])
                pg, _ = train_rlvr.policy_loss(logp, old[s], adv[s], 0.2)
                loss = ((pg + 0.01 * train_rlvr.k3_kl(logp, ref_logp[s])) * mask[s]).sum() / mask.sum()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        if step:
            times.append((t1 - t0, t2 - t1))
    gen_s = sum(t for t, _ in times) / len(times)
    learn_s = sum(t for _, t in times) / len(times)
    tokens = B * args.new_tokens
    print(f"rollout: {gen_s:.3f} s for {tokens} tokens = {tokens / gen_s:,.0f} tokens/s "
          f"({gen_s / args.new_tokens * 1e3:.2f} ms per decode step)")
    print(f"learning (old + ref log-probs, forward/backward, AdamW): {learn_s:.3f} s")
    print(f"step {gen_s + learn_s:.3f} s: generating {gen_s / (gen_s + learn_s):.0%}, "
          f"learning {learn_s / (gen_s + learn_s):.0%}")

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bw = next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)
        if bw is None:
            print(f"no peak bandwidth known for {name}: no bound printed")
            return
        elem = torch.finfo(dtype).bits // 8
        weight_bytes = policy.num_params() * elem
        kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * elem
        avg_len = args.prompt_len + args.new_tokens / 2
        kv_bytes = B * avg_len * kv_per_token
        for what, nbytes in (("weights", weight_bytes), ("weights + KV cache", weight_bytes + kv_bytes)):
            bound = B / (nbytes / bw)
            print(f"bandwidth bound ({what}, {nbytes / 1e9:.2f} GB per decode step at {bw / 1e12:.2f} TB/s on {name}): "
                  f"{bound:,.0f} tokens/s; measured is {tokens / gen_s / bound:.2f}x of it")


if __name__ == "__main__":
    main()
