"""Speed of model.py against transformers' LlamaForCausalLM: a training step and greedy generation.

    python bench/model.py                                   # CPU, small config (tokens/s and ratios)
    python bench/model.py --device cuda --preset smollm2-360m --dtype bf16   # GPU, adds the step's MFU

The training step is forward + cross-entropy + backward + AdamW on the same weights, batch and sequence.
--compile adds both models with every block torch.compile'd (compiling happens before the race).
Generation is greedy with a KV cache on a batch of prompts of unequal length, both sides producing exactly
max_new_tokens tokens (no stop token), so the token counts are identical.
"""

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from model import ModelConfig, Transformer, generate, to_hf_state  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="demo", help="model preset (demo: the CPU pipeline's model)")
    p.add_argument("--layers", type=int, default=0, help="override the preset's number of layers")
    p.add_argument("--vocab", type=int, default=0, help="override the preset's vocab size")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--gen_rounds", type=int, default=None,
                   help="timed generations per model (default 15 on CPU, where the host's speed drifts, 3 on GPU)")
    p.add_argument("--gen_batch", type=int, default=8)
    p.add_argument("--gen_prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: train,generate")
    p.add_argument("--compile", action="store_true",
                   help="also race both models with every block torch.compile'd (the same for both)")
    return p.parse_args()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_model_from(model):
    """A LlamaForCausalLM with exactly our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**{k: v for k, v in model.config.to_hf_dict().items()
                               if k not in ("architectures", "model_type", "torch_dtype")})
    hf = LlamaForCausalLM(hf_config).to(device=model.output_weight.device, dtype=model.output_weight.dtype)
    state = to_hf_state(model.state_dict(), model.config)
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = model.embed_tokens.weight
    hf.load_state_dict(state, strict=True)
    return hf


def race(fns, rounds, device):
    """Median seconds per call of each fn, calls interleaved so that load from other processes hits both alike."""
    times = {name: [] for name in fns}
    for r in range(rounds + 1):  # round 0 warms up: allocator, AdamW state, kernel selection
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def train_step(model, x, y, device, hf=False):
    """One forward + cross-entropy + backward + AdamW step of `model` (ours or transformers')."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))

    def step():
        # use_cache=False: no KV cache in training; the DynamicCache transformers would build fails a guard in each
        # compiled block, and past the recompile limit (8) its blocks ran eagerly in the compiled race
        logits = model(input_ids=x, use_cache=False).logits if hf else model(x)
        F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train(model, hf, args, device):
    B, T = args.batch_size, args.seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (B, T), generator=g).to(device)
    y = x.roll(-1, dims=1)
    model.train(), hf.train()
    steps = {"nanotulu": train_step(model, x, y, device), "transformers": train_step(hf, x, y, device, hf=True)}
    if args.compile:  # regional compilation of both, every block compiled in place
        ours_c, hf_c = copy.deepcopy(model), copy.deepcopy(hf)
        for block in list(ours_c.layers) + list(hf_c.model.layers):
            block.compile()
        steps["nanotulu+compile"] = train_step(ours_c, x, y, device)
        steps["transformers+compile"] = train_step(hf_c, x, y, device, hf=True)
        for name in ("nanotulu+compile", "transformers+compile"):  # compile outside the timed race
            t0 = time.perf_counter()
            steps[name]()
            print(f"train step  {name:20s} compiled in {time.perf_counter() - t0:.1f} s")
    results = race(steps, args.steps, device)
    for name, sec in results.items():
        print(f"train step  {name:20s} {B * T / sec:10.1f} tokens/s  ({sec * 1e3:.1f} ms/step, batch {B}x{T})")
    print(f"train step  speedup        {results['transformers'] / results['nanotulu']:.2f}x (goal >= 1.2x)")
    if args.compile:
        print(f"train step  speedup        {results['transformers'] / results['nanotulu+compile']:.2f}x "
              "(ours compiled vs transformers eager)")
        print(f"train step  speedup        {results['transformers+compile'] / results['nanotulu+compile']:.2f}x "
              "(both compiled)")
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = common.peak_flops(torch.device(device))
        flops = model.flops_per_token(T) * B * T
        for who, sec in results.items():
            mfu = flops / sec / peak if peak else float("nan")
            print(f"train MFU   {who:20s} {100 * mfu:.1f}% of {name} bf16 peak")


def bench_generate(model, hf, args, device):
    g = torch.Generator().manual_seed(1)
    V, B, N = model.config.vocab_size, args.gen_batch, args.new_tokens
    # Unequal prompts (half to full length), left padded for transformers as generate() does internally.
    lengths = [args.gen_prompt_len // 2 + i * (args.gen_prompt_len // 2) // max(1, B - 1) for i in range(B)]
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]
    P = max(lengths)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
    attn = (ids != 0).long()
    model.eval(), hf.eval()

    def ours():
        return generate(model, prompts, N)

    def theirs():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=N, min_new_tokens=N,
                               do_sample=False, pad_token_id=0, eos_token_id=None)

    results = race({"nanotulu": ours, "transformers": theirs}, args.gen_rounds, device)
    for name, sec in results.items():
        print(f"generate    {name:13s} {B * N / sec:10.1f} tokens/s  (batch {B}, {N} new tokens)")
    print(f"generate    speedup        {results['transformers'] / results['nanotulu']:.2f}x (goal >= 2x)")


def main():
    args = parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    overrides = {k: v for k, v in (("num_layers", args.layers), ("vocab_size", args.vocab)) if v}
    config = ModelConfig.from_preset(args.preset, **overrides)
    on_gpu = device.startswith("cuda")
    args.batch_size = args.batch_size or (8 if on_gpu else 4)
    args.seq_len = args.seq_len or (2048 if on_gpu else 128)
    args.steps = args.steps or (10 if on_gpu else 21)
    args.gen_rounds = args.gen_rounds or (3 if on_gpu else 15)
    torch.manual_seed(0)
    model = Transformer(config).to(device=device, dtype=dtype)
    hf = hf_model_from(model)
    print(f"device {device} ({torch.cuda.get_device_name() if on_gpu else f'{torch.get_num_threads()} threads'})"
          f", dtype {args.dtype}, {model.num_params() / 1e6:.1f}M params, layers {config.num_layers}, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}, torch {torch.__version__}")
    skip = set(filter(None, args.skip.split(",")))
    if "train" not in skip:
        bench_train(model, hf, args, device)
    if "generate" not in skip:
        bench_generate(model, hf, args, device)


if __name__ == "__main__":
    main()
