"""Forward + backward time and peak memory of the LM-head losses: ours vs the naive eager computation,
torch.compile of it, the chunked PyTorch reference, and Liger Kernel when it is installed.

  python bench/fused_losses.py                 # GPU when there is one: SmolLM2 shapes, bf16
  python bench/fused_losses.py --device=cpu    # CPU: reference vs naive at a CPU-sized shape, fp32

Peak memory is reported ABOVE the inputs and their gradients (what the loss itself costs). On CUDA it comes
from the caching allocator's peak; on CPU each measurement runs in a fresh subprocess and reads the peak
resident set (VmHWM, reset through /proc/self/clear_refs after the warm-up) minus the resident set before the
timed call. The Triton paths on CPU (ours, Liger's) run under the interpreter: their memory is real, their time
is not, and they are left out unless --cpu_triton is given.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if "--cpu_triton" in sys.argv or any(a in sys.argv for a in ("--_variant=triton", "--_variant=liger")):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nanotulu_kernels import cross_entropy, dpo, reference  # noqa: E402

VOCAB = 49152


# --- the contenders: each maps (hidden, weight, labels) -> scalar loss ----------------------------------------

def naive_ce(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def liger_ce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss_fn = LigerFusedLinearCrossEntropyLoss()
    return lambda hidden, weight, labels: loss_fn(weight, hidden, labels)


def naive_dpo(hidden, weight, labels, ref_c, ref_r, beta=5.0):
    """dpo_norm on full logits."""
    logps = torch.log_softmax(F.linear(hidden, weight).float(), -1)
    valid = labels != -100
    token = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    mean = token.sum(1) / valid.sum(1)
    b = ref_c.shape[0]
    z = (mean[:b] - mean[b:]) - (ref_c / valid[:b].sum(1) - ref_r / valid[b:].sum(1))
    return -F.logsigmoid(beta * z).mean()


def liger_dpo():
    """dpo_norm (mean log-probs) in Liger. Its forward takes no precomputed reference log-probs (it runs a reference
    model's head itself, or none), so it runs without one: the pair loss differs, the LM-head work timed is the same
    as ours, for which the cached reference log-probs are a small input."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    loss_fn = LigerFusedLinearDPOLoss(beta=5.0, compute_nll_loss=False, use_ref_model=False, average_log_prob=True)

    def run(hidden, weight, labels, ref_c, ref_r):
        out = loss_fn(weight, hidden, labels)
        return out[0] if isinstance(out, tuple) else out
    return run


def make_fn(task, variant):
    if variant == "liger":
        return liger_ce() if task == "ce" else liger_dpo()
    naive = naive_ce if task == "ce" else naive_dpo
    if variant == "eager":
        return naive
    if variant == "compile":
        return torch.compile(naive, dynamic=False)  # else the second shape raced marks N and H dynamic
    if task == "ce":
        return {"reference": reference, "triton": cross_entropy}[variant].fused_linear_cross_entropy
    # the DPO loss is one composition (nanotulu_kernels/__init__.py) of a backend's cross-entropy and pair loss
    pieces = {"reference": (reference.fused_linear_cross_entropy, reference.preference_loss),
              "triton": (cross_entropy.fused_linear_cross_entropy, dpo.preference_loss)}[variant]
    return lambda *inputs: reference.fused_linear_dpo_loss(*inputs, loss_type="dpo_norm", beta=5.0,
                                                           cross_entropy=pieces[0], pair_loss=pieces[1]).loss


def make_inputs(task, tokens, hidden_size, dtype, device, seq_len):
    # drawn on the device: a GPU grid draws billions of numbers, a minute of one CPU core
    g = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(VOCAB, hidden_size, generator=g, device=device) * hidden_size ** -0.5).to(dtype)
    if task == "ce":
        hidden = torch.randn(tokens, hidden_size, generator=g, device=device).to(dtype)
        labels = torch.randint(0, VOCAB, (tokens,), generator=g, device=device)
        labels[::10] = -100
        return [hidden.requires_grad_(), weight.requires_grad_(), labels]
    rows = tokens // seq_len  # 2B sequences: chosen then rejected
    hidden = torch.randn(rows, seq_len, hidden_size, generator=g, device=device).to(dtype)
    labels = torch.randint(0, VOCAB, (rows, seq_len), generator=g, device=device)
    labels[:, : seq_len // 4] = -100  # the prompt
    refs = [-torch.rand(rows // 2, generator=g, device=device) * 100 - seq_len for _ in range(2)]
    return [hidden.requires_grad_(), weight.requires_grad_(), labels, *refs]


# --- measurement ----------------------------------------------------------------------------------------------

def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(task, variant, tokens, hidden_size, dtype, device, seq_len, iters):
    """(median seconds per forward+backward, peak bytes above inputs and gradients)."""
    inputs = make_inputs(task, tokens, hidden_size, dtype, device, seq_len)
    fn = make_fn(task, variant)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        inputs[0].grad = inputs[1].grad = None
        fn(*inputs).backward()

    step()  # warm-up: compile, autotune, allocator caches
    grad_bytes = sum(t.numel() * t.element_size() for t in inputs[:2])
    sync()
    if cuda:
        inputs[0].grad = inputs[1].grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base - grad_bytes
    else:
        inputs[0].grad = inputs[1].grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _rss_bytes("VmRSS")
        step()
        peak = _rss_bytes("VmHWM") - base - grad_bytes
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(peak, 0)


def measure_isolated(args, task, variant, tokens, hidden_size):
    """CPU: one fresh process per measurement, so that one variant's peak does not hide another's."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--_variant={variant}", f"--_task={task}",
           f"--_tokens={tokens}", f"--_hidden={hidden_size}", f"--device={args.device}", f"--dtype={args.dtype}",
           f"--iters={args.iters}", f"--seq_len={args.seq_len}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return None, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
    return json.loads(result.stdout.strip().splitlines()[-1]), None


def matmul_bound(tokens, hidden_size, dtype, device):
    """Three N x H x V GEMMs at this device's measured rate: the floor for any fused linear loss."""
    a = torch.randn(tokens, hidden_size, device=device, dtype=dtype)
    b = torch.randn(VOCAB, hidden_size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b.t()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        a @ b.t()
    torch.cuda.synchronize()
    return 3 * (time.perf_counter() - start) / 5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--tokens", default=None, help="comma list; default 4096,8192,16384,32768 (CUDA), 2048 (CPU)")
    parser.add_argument("--hidden", default=None, help="comma list; default 576,2048 (CUDA), 576 (CPU)")
    parser.add_argument("--seq_len", type=int, default=None, help="DPO row length; default 2048 (CUDA), 512 (CPU)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--tasks", default="ce,dpo")
    parser.add_argument("--variants", default=None, help="comma list of eager,compile,reference,triton,liger")
    parser.add_argument("--cpu_triton", action="store_true",
                        help="CPU: include the interpreted Triton paths (ours and Liger's)")
    parser.add_argument("--_variant"), parser.add_argument("--_task")
    parser.add_argument("--_tokens", type=int), parser.add_argument("--_hidden", type=int)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.iters = args.iters or (10 if cuda else 2)
    args.seq_len = args.seq_len or (2048 if cuda else 512)
    dtype = getattr(torch, args.dtype)

    if args._variant:  # child process of measure_isolated
        t, peak = measure(args._task, args._variant, args._tokens, args._hidden, dtype, args.device,
                          args.seq_len, args.iters)
        print(json.dumps({"time": t, "peak": peak}))
        return

    tokens_list = [int(x) for x in (args.tokens or ("4096,8192,16384,32768" if cuda else "2048")).split(",")]
    hidden_list = [int(x) for x in (args.hidden or ("2048,576" if cuda else "576")).split(",")]
    variants = ["eager", "compile", "reference", "triton", "liger"] if cuda else \
        ["eager", "compile", "reference"] + (["triton", "liger"] if args.cpu_triton else [])
    variants = args.variants.split(",") if args.variants else variants
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"# {device_name}, torch {torch.__version__}, {args.dtype}, V={VOCAB}, "
          f"{time.strftime('%Y-%m-%d')}, median of {args.iters}")
    print("| task | N | H | variant | fwd+bwd ms | x eager | peak MiB above in+grads | % of eager | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    ours_failed = []  # a peer may be absent or run out of memory; our own kernels failing fails the run
    for task in args.tasks.split(","):
        for hidden_size in hidden_list:
            for tokens in tokens_list:
                eager = None
                note = ""
                if cuda:
                    note = f"3-GEMM bound {1e3 * matmul_bound(tokens, hidden_size, dtype, args.device):.1f} ms"
                for variant in variants:
                    if cuda:
                        try:
                            t, peak = measure(task, variant, tokens, hidden_size, dtype, args.device,
                                              args.seq_len, args.iters)
                            err = None
                        except Exception as e:  # noqa: BLE001  (absent Liger, OOM of eager: report, go on)
                            err = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                            torch.cuda.empty_cache()
                    else:
                        res, err = measure_isolated(args, task, variant, tokens, hidden_size)
                        if not err:
                            t, peak = res["time"], res["peak"]
                    if err:
                        print(f"| {task} | {tokens} | {hidden_size} | {variant} | - | - | - | - | {err[:90]} |")
                        if variant in ("reference", "triton"):
                            ours_failed.append(f"{task} N={tokens} H={hidden_size} {variant}")
                        continue
                    eager = eager or (t, peak)
                    print(f"| {task} | {tokens} | {hidden_size} | {variant} | {1e3 * t:.1f} | {t / eager[0]:.2f} | "
                          f"{peak / 2**20:.0f} | {100 * peak / max(eager[1], 1):.1f} | "
                          f"{note if variant == 'triton' else ''} |", flush=True)
    if ours_failed:
        sys.exit(f"failed: {'; '.join(ours_failed)}")


if __name__ == "__main__":
    main()
