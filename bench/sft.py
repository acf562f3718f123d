"""SFT training throughput: our Transformer + fused cross-entropy vs transformers' LlamaForCausalLM, same batches,
and on a GPU also vs the same model with Liger Kernel's patches (when liger-kernel is installed).

    python bench/sft.py                    # CPU: the demo config (demo model, packed demo data, 16 x 128)
    python bench/sft.py --device=cuda      # GPU: SmolLM2-1.7B shape (random weights), seq 2048, bf16 autocast
    python bench/sft.py --compile          # both models with every block torch.compile'd (train_sft.py --compile)

Each side runs full optimizer steps (forward, loss, backward, AdamW) on identical token batches; prints tokens/s,
MFU on a GPU (model.flops_per_token over the device's bf16 peak) and the ratio ours / transformers.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
import train_sft  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def demo_batches(n, batch_size, seq_len):
    """Packed demo rows exactly as the demo run sees them (plain causal for both sides: transformers has no
    per-document mask without flash-attn varlen, so doc_ids are dropped from the comparison)."""
    demo = data.make_demo_data(0)
    tok = data.build_demo_tokenizer(demo)
    examples = data.tokenize_sft(demo["sft_train"], tok, "tulu", seq_len, progress=False)
    cfg = train_sft.SFTConfig(max_seq_len=seq_len, packing=True)
    items, collate = train_sft.make_batches(cfg, examples)
    if n * batch_size > len(items):
        sys.exit(f"the demo data packs into {len(items)} rows of {seq_len} tokens: at most "
                 f"{len(items) // batch_size} steps (warm-up included) at batch {batch_size}, not {n}")
    batches = [collate(items[i * batch_size:(i + 1) * batch_size], tok.pad_id) for i in range(n)]
    return tok.vocab_size, [(b["input_ids"], b["labels"]) for b in batches]


def random_batches(n, batch_size, seq_len, vocab_size):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((batch_size, 1), -100)], dim=1)  # pre-shifted, as the collator
        out.append((ids, labels))
    return out


def run(step, batches, device, warmup):
    for ids, labels in batches[:warmup]:
        step(ids.to(device), labels.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for ids, labels in batches[warmup:]:
        step(ids.to(device), labels.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return sum(ids.numel() for ids, _ in batches[warmup:]) / dt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 10 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=0, help="default: 16 on CPU, 4 on GPU")
    p.add_argument("--seq_len", type=int, default=0, help="default: 128 on CPU, 2048 on GPU")
    p.add_argument("--skip_hf", action="store_true")
    p.add_argument("--compile", action="store_true", help="compile every block of both models (warmup compiles)")
    args = p.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    steps = args.steps or (20 if on_gpu else 10)
    batch_size = args.batch_size or (4 if on_gpu else 16)
    seq_len = args.seq_len or (2048 if on_gpu else 128)
    if on_gpu:
        config = ModelConfig.from_preset("smollm2-1.7b")
        batches = random_batches(steps + args.warmup, batch_size, seq_len, config.vocab_size)
    else:
        vocab, batches = demo_batches(steps + args.warmup, batch_size, seq_len)
        config = ModelConfig.from_preset("demo", vocab_size=vocab)
    print(f"device {device} ({torch.cuda.get_device_name(device) if on_gpu else f'{torch.get_num_threads()} threads'})"
          f", batch {batch_size} x {seq_len}, {steps} timed steps{', blocks compiled' if args.compile else ''}")

    torch.manual_seed(0)
    ours = Transformer(config).to(device)
    if args.compile:
        common.compile_blocks(ours)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=on_gpu)
    flops = ours.flops_per_token(seq_len)
    peak = common.peak_flops(device)

    def our_step(ids, labels):
        with common.autocast(device):
            loss = train_sft.token_loss_sum(ours, {"input_ids": ids, "labels": labels})
        (loss / (labels != -100).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def report(name, tps):  # printed as soon as measured: a peer that fails later does not take it along
        mfu = f", MFU {flops * tps / peak:.1%}" if peak else ""
        ratio = f"; ours / {name}: {ours_tps / tps:.2f}x" if name != "nanotulu" else ""
        print(f"{name:>17}: {tps:10.0f} tokens/s{mfu}{ratio}", flush=True)

    ours_tps = run(our_step, batches, device, args.warmup)
    report("nanotulu", ours_tps)
    failed = []
    if not args.skip_hf:
        # the same initial weights for transformers, through the HF layout our save_pretrained writes; deleted
        # however the run ends (gpu_checks.sh stops a step past its limit with SIGINT)
        hf_dir = tempfile.mkdtemp(prefix="bench_sft_")
        try:
            ours.cpu().save_pretrained(hf_dir)
            del ours, opt
            if on_gpu:
                torch.cuda.empty_cache()
            # transformers as its users train it (labels in, HF's own shift and loss), and with Liger's kernels
            # patched in (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) where liger-kernel is installed: GPU
            # only, its kernels are Triton
            peers = ["transformers"] + (["transformers+liger"] if on_gpu else [])
            for name in peers:
                try:
                    hf_step = hf_train_step(hf_dir, device, liger=name.endswith("liger"), compile=args.compile)
                    report(name, run(hf_step, batches, device, args.warmup))
                except ImportError as e:
                    print(f"{name:>17}: skipped ({e.name} is not installed)")
                except Exception as e:  # out of memory, a compile error: said, and the run exits non-zero
                    print(f"{name:>17}: failed ({type(e).__name__}: {e})", flush=True)
                    failed.append(name)
                hf_step = None
                if on_gpu:
                    torch.cuda.empty_cache()
        finally:
            shutil.rmtree(hf_dir)  # 6.8 GB at the GPU's 1.7B shape
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def hf_train_step(hf_dir, device, liger=False, compile=False):
    """A full optimizer step of transformers' LlamaForCausalLM (optionally Liger-patched) on our batches."""
    if liger:
        from liger_kernel.transformers import AutoLigerKernelForCausalLM as auto_model
    else:
        from transformers import AutoModelForCausalLM as auto_model
    hf = auto_model.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    hf.train()
    if compile:
        for block in hf.model.layers:
            block.compile()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step(ids, labels):
        # our labels are already shifted (labels[t] is the target of position t); transformers shifts them itself
        unshifted = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)
        with common.autocast(device):
            # use_cache=False: a training step needs no KV cache, and the DynamicCache it would pass each compiled
            # block fails a guard per layer, so that all but the first 8 blocks ran eagerly (the recompile limit)
            loss = hf(input_ids=ids, labels=unshifted, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


if __name__ == "__main__":
    main()
