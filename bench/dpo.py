"""DPO step time and peak memory: the fused LM-head DPO loss (kernels.fused_linear_dpo_loss) vs the naive path
(full [2B, T, V] logits -> log_softmax -> gather), the way most DPO trainers compute it.

    python bench/dpo.py                        # CPU: 'demo'-shaped model with SmolLM2's 49152 vocab
    python bench/dpo.py --device=cuda          # GPU: SmolLM2-1.7B shape, bf16 autocast, Triton kernels

Each variant runs in its own process so that peak memory is that variant's alone: on CPU the growth of the
process's peak RSS over the step loop, on CUDA torch.cuda.max_memory_allocated over the step loop.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nanotulu_kernels as kernels  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

IGNORE = -100


def naive_dpo_loss(model, input_ids, labels, ref_c, ref_r, beta):
    """dpo_norm from materialised logits: what the fused kernel avoids."""
    logits = model(input_ids).float()
    logp = torch.log_softmax(logits, -1)
    mask = labels != IGNORE
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    n = mask.sum(1).clamp(min=1)
    avg, B = tok.sum(1) / n, input_ids.shape[0] // 2
    z = (avg[:B] - avg[B:]) - (ref_c / n[:B] - ref_r / n[B:])
    return -F.logsigmoid(beta * z).mean()


def fused_dpo_loss(model, input_ids, labels, ref_c, ref_r, beta):
    hidden = model(input_ids, return_hidden=True)
    return kernels.fused_linear_dpo_loss(hidden, model.output_weight, labels, ref_c, ref_r, loss_type="dpo_norm",
                                         beta=beta).loss


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        config = ModelConfig.from_preset("smollm2-1.7b")
    else:
        config = ModelConfig.from_preset("demo", vocab_size=49152)
    model = Transformer(config).to(device)
    model.gradient_checkpointing = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    B, T = args.pairs, args.seq_len
    input_ids = torch.randint(0, config.vocab_size, (2 * B, T), device=device)
    labels = torch.full((2 * B, T), IGNORE, device=device)
    labels[:, T // 2:-1] = input_ids[:, T // 2 + 1:]  # the second half is the response
    ref_c, ref_r = -torch.rand(B, device=device) * 100, -torch.rand(B, device=device) * 100
    loss_fn = fused_dpo_loss if args.variant == "fused" else naive_dpo_loss
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)

    def step(ids=input_ids, lab=labels):
        with amp:
            loss = loss_fn(model, ids, lab, ref_c, ref_r, 5.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # warm-up on 8-token rows: allocates gradients and the optimizer state, but no large activations, so that the
    # peak measured next is the step's own
    step(input_ids[:, -8:], labels[:, -8:])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_bytes()
    t = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / args.steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    print(json.dumps({"variant": args.variant, "step_s": dt, "peak_extra_mib": peak / 2**20,
                      "tokens_per_s": 2 * B * T / dt, "loss": losses[-1], "params_m": model.num_params() / 1e6,
                      "backend": kernels.backend_for(input_ids)}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--pairs", type=int, default=None, help="pairs per step (default: cpu 4, cuda 2)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: cpu 256, cuda 2048)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    args.pairs = args.pairs or (2 if args.device == "cuda" else 4)
    args.seq_len = args.seq_len or (2048 if args.device == "cuda" else 256)
    if args.variant:
        return run_variant(args)
    results, failed = {}, []
    for variant in ("naive", "fused"):
        cmd = [sys.executable, os.path.abspath(__file__), f"--device={args.device}", f"--pairs={args.pairs}",
               f"--seq_len={args.seq_len}", f"--steps={args.steps}", f"--variant={variant}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{variant}: failed\n{out.stderr[-2000:]}")
            failed.append(variant)
            continue
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    shape = f"{args.pairs} pairs x 2 x {args.seq_len} tokens"
    print(f"DPO step (dpo_norm, forward + backward + AdamW) on {args.device}, {shape}")
    print("| path  | backend | params (M) | step (s) | tokens/s | peak extra memory (MiB) |")
    print("|-------|---------|-----------:|---------:|---------:|------------------------:|")
    for name, r in results.items():
        print(f"| {name:<5} | {r['backend']:<7} | {r['params_m']:10.1f} | {r['step_s']:8.3f} | "
              f"{r['tokens_per_s']:8.0f} | {r['peak_extra_mib']:23.0f} |")
    if len(results) == 2:
        n, f = results["naive"], results["fused"]
        print(f"fused vs naive: {n['step_s'] / f['step_s']:.2f}x step speed, "
              f"{n['peak_extra_mib'] / max(f['peak_extra_mib'], 1e-9):.2f}x less peak memory; "
              f"loss naive {n['loss']:.5f} fused {f['loss']:.5f}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
