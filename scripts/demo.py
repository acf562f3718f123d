"""The whole SmolTulu recipe on a laptop: SFT -> DPO -> RLVR on the synthetic demo task, evaluated after each stage.

    python scripts/demo.py                 # ~2-3 minutes on 2 CPU cores; a second run reuses finished stages
    python scripts/demo.py --redo          # run every stage again
    python scripts/demo.py --redo=rlvr     # only RLVR (and what depends on it) again

Each stage is the ordinary trainer run as a user would run it (python train_X.py --key=value ...), so the demo
exercises exactly the code paths of a real run. After each stage eval.evaluate_demo scores the held-out split:
  arith      greedy answers to held-out arithmetic word problems, checked by verifiers.gsm8k
  constraint greedy answers to held-out instructions with a verifiable constraint, checked by verifiers.ifeval
  pref       share of held-out preference pairs where the model's mean log-prob of the chosen answer is higher
Output folder (default runs/demo): one run folder per stage, report.md, curves.png (or curves.txt), table.json.

The same seed gives the same table on any x86-64 CPU with AVX2: see pin_cpu_kernels.
"""
import argparse
import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# PyTorch picks each CPU kernel's vector width (AVX2, AVX-512) for the processor it runs on, and the widths round
# differently; a tiny model trained from scratch amplifies that into another table: seed 0's SFT row was
# 55 / 33 / 54 on the first development box and 71 / 52 / 61.5 on an AVX-512 AMD EPYC, which with
# ATEN_CPU_CAPABILITY=avx2 gives 55 / 33 / 54 again (MKL_CBWR made no difference there; it pins MKL's matrix
# products on Intel CPUs likewise).
CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def pin_cpu_kernels():
    """Run PyTorch's and MKL's AVX2 kernels (unless the environment already chooses), in this process and the
    trainers it starts. Must run before torch is imported; no effect on what runs on a GPU."""
    for key, value in CPU_KERNELS.items():
        os.environ.setdefault(key, value)
    # torch.compile's kernel cache does not tell kernel widths apart: C++ compiled by a run with the CPU's own
    # kernels, then loaded by a run pinned to AVX2, crashed with a segfault (torch 2.13, --compile=true), so a
    # pinned run keeps a cache of its own.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(ROOT, "runs", f"torchinductor_{os.environ['ATEN_CPU_CAPABILITY']}"))

STAGES = [  # name, trainer, the stage it starts from
    ("sft", "train_sft.py", None),
    ("dpo", "train_dpo.py", "sft"),
    ("rlvr", "train_rlvr.py", "dpo"),
]
# metrics.jsonl keys worth a curve, per stage
CURVES = {"sft": ["loss", "eval_loss"], "dpo": ["loss", "accuracy", "margins"],
          "rlvr": ["reward", "acc_gsm8k", "acc_ifeval", "kl"]}


def run_child(cmd, **kwargs):
    """subprocess.run, with the child ended (SIGTERM) when this process dies however it dies (on Linux): a trainer
    left running after the demo or the sweep was killed went on writing into the run folder that a rerun writes in."""
    try:  # looked up here, so that the child, between fork and exec, only makes the call
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError, TypeError):  # not Linux
        return subprocess.run(cmd, **kwargs)
    parent = os.getpid()

    def die_with_parent():
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call
            os.kill(os.getpid(), signal.SIGTERM)
    return subprocess.run(cmd, preexec_fn=die_with_parent, **kwargs)


def write_json(path, value):
    """Written whole or not at all: a file cut short by a kill would stop every later run that reads it."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def interrupted_in_one_line(main):
    """main(), a Ctrl-C ending it with one line and status 130 (the trainer under it has said where it stopped)."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"interrupted: {os.path.basename(sys.argv[0])} stopped; the same command again goes on from what was "
              f"finished", file=sys.stderr)
        sys.exit(130)


def run_stage(name, trainer, parent, out, seed, threads, extra_args):
    run_dir = os.path.join(out, name)
    # --overwrite: this script decides which stages to rerun, and a rerun replaces the stage's earlier run
    cmd = [sys.executable, os.path.join(ROOT, trainer), f"--run_dir={run_dir}", f"--seed={seed}",
           f"--demo_seed={seed}", "--overwrite=true"]
    if parent:
        cmd.append(f"--model={os.path.join(out, parent, 'final')}")
    cmd += extra_args.split()
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    status = run_child(cmd, env=env).returncode
    if status != 0:  # the trainer said why above: one line on which stage stopped, not a CalledProcessError traceback
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        raise SystemExit(f"error: the {name} stage failed: {trainer} {how} (its output is above)")
    seconds = time.perf_counter() - t0
    write_json(os.path.join(run_dir, "demo_time.json"),
               {"train_seconds": seconds, "settings": stage_settings(out, parent, seed, extra_args)})
    return seconds


def stage_settings(out, parent, seed, extra_args):
    """What decides a stage's model: its seed and extra arguments, and the model it started from (a hash of the
    parent stage's weights), so that no stage is reused on top of a parent trained again since."""
    start = None
    if parent:
        with open(os.path.join(out, parent, "final", "model.safetensors"), "rb") as f:
            start = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"seed": seed, "args": extra_args.split(), "start": start}


def evaluate_stage(final, seed, limit=None):
    """Held-out scores of one stage's final model, cached beside it."""
    path = os.path.join(final, f"demo_eval_seed{seed}_limit{limit or 'all'}.json")  # final/ is replaced on rerun
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    import data
    import eval as evaluation
    model, tok = evaluation.load_model_and_tokenizer(final)
    scores = evaluation.evaluate_demo(model, tok, data.make_demo_data(seed), limit=limit)
    write_json(path, scores)
    return scores


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves(out, stages):
    """(stage, key, steps, values) for every curve the stages logged."""
    found = []
    for name in stages:
        rows = read_metrics(os.path.join(out, name))
        for key in CURVES[name]:
            # null: nothing to measure that step (the KL of a GRPO step that trained on no group, an accuracy of a
            # dataset the rollout did not sample)
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
            if pts:
                found.append((name, key, [p[0] for p in pts], [p[1] for p in pts]))
    return found


def plot_curves(found, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = os.path.join(out, "curves.txt")
        with open(path, "w") as f:
            for stage, key, steps, values in found:
                f.write(f"{stage}/{key}: first {values[0]:.4g} -> last {values[-1]:.4g} over {steps[-1]} steps "
                        f"(min {min(values):.4g}, max {max(values):.4g})\n")
        return path
    stages = sorted({c[0] for c in found}, key=[s[0] for s in STAGES].index)
    ncols = max(sum(1 for c in found if c[0] == s) for s in stages)
    fig, axes = plt.subplots(len(stages), ncols, figsize=(4 * ncols, 3 * len(stages)), squeeze=False)
    for i, stage in enumerate(stages):
        mine = [c for c in found if c[0] == stage]
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(mine):
                ax.axis("off")
                continue
            _, key, steps, values = mine[j]
            ax.plot(steps, values, lw=1.2)
            ax.set_title(f"{stage.upper()}: {key}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=110)
    return path


def table_markdown(rows):
    lines = ["| stage | arith acc | constraint acc | pref acc | train time |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage'].upper()} | {100 * r['arith_acc']:.1f}% (n={r['arith_n']}) | "
                     f"{100 * r['constraint_acc']:.1f}% (n={r['constraint_n']}) | "
                     f"{100 * r['pref_acc']:.1f}% (n={r['pref_n']}) | {r['train_seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--redo", nargs="?", const="sft", default=None,
                    help="run again from this stage on (default when given without a value: all stages)")
    ap.add_argument("--stages", default="sft,dpo,rlvr", help="stop after the last stage named here")
    ap.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    ap.add_argument("--eval_limit", type=int, default=0, help="held-out examples per metric (0 = all)")
    for name, trainer, _ in STAGES:
        ap.add_argument(f"--{name}_args", default="", help=f"extra --key=value arguments for {trainer}")
    args = ap.parse_args(argv)
    wanted = args.stages.split(",")
    names = [s[0] for s in STAGES]
    unknown = [w for w in wanted + ([args.redo] if args.redo else []) if w not in names]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; stages are {names}")
    if "--objective=reward_model" in args.dpo_args.split():
        ap.error("--dpo_args=--objective=reward_model: the DPO stage is the policy that RLVR starts from and that "
                 "the demo scores; train a reward model with train_dpo.py itself")
    if args.eval_limit < 0:  # a negative limit would leave the last rows out of every stage's scores
        ap.error(f"--eval_limit must be 0 (every example) or more, got {args.eval_limit}")
    if args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    redo_from = names.index(args.redo) if args.redo else len(names)
    last = max(names.index(w) for w in wanted)
    os.makedirs(args.out, exist_ok=True)

    t_start = time.perf_counter()
    rows = []
    upstream_ran = False
    for i, (name, trainer, parent) in enumerate(STAGES[:last + 1]):
        final = os.path.join(args.out, name, "final")
        timing = os.path.join(args.out, name, "demo_time.json")
        # a stage runs when asked to, when it has no finished output, when it was trained under other settings
        # (seed, extra arguments), or when the stage it starts from changed
        extra = getattr(args, f"{name}_args")
        done = os.path.isdir(final) and os.path.exists(timing)
        if done:
            with open(timing) as f:
                before = json.load(f).get("settings")
            now = stage_settings(args.out, parent, args.seed, extra)
            if before != now:
                print(f"=== {name}: trained before with {before}, now {now}: training it again", flush=True)
                done = False
        if i >= redo_from or upstream_ran or not done:
            run_stage(name, trainer, parent, args.out, args.seed, args.threads, extra)
            upstream_ran = True
        else:
            print(f"=== {name}: reusing {final} (--redo={name} to run it again)", flush=True)
        with open(timing) as f:
            seconds = json.load(f)["train_seconds"]
        print(f"=== {name}: evaluating {final}", flush=True)
        rows.append({"stage": name, "train_seconds": seconds,
                     **evaluate_stage(final, args.seed, args.eval_limit or None)})

    import torch  # not at the top: pin_cpu_kernels must run before torch loads
    table = table_markdown(rows)
    figure = plot_curves(curves(args.out, [r["stage"] for r in rows]), args.out)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    report = [
        "# nanotulu demo run", "",
        f"Seed {args.seed}; synthetic arithmetic (GSM8K-style) and constraint (IFEval-style) tasks; "
        f"each stage starts from the previous one's final model. Held-out scores after each stage:", "",
        table, "",
        "arith / constraint: greedy decoding, answers checked by verifiers.py (the RLVR reward's checkers); "
        "pref: held-out pairs where the chosen response has the higher mean log-prob.", "",
        f"torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()} "
        f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')}).", "",
        f"Training curves: `{os.path.basename(figure)}`", "",
    ]
    if figure.endswith(".png"):
        report += [f"![training curves]({os.path.basename(figure)})", ""]
    for name in [r["stage"] for r in rows]:
        with open(os.path.join(args.out, name, "config.json")) as f:
            cfg = json.load(f)
        # (RLVR takes no total_batch_size: its batch is prompts_per_step x num_samples; max_steps, when set,
        # replaces epochs as the length of a run)
        length = "max_steps" if cfg.get("max_steps") else "epochs"
        keys = [k for k in ("lr", "total_batch_size", length, "loss_type", "beta", "algo", "prompts_per_step",
                            "num_samples") if k in cfg and (k != "total_batch_size" or cfg[k])]
        start = os.path.relpath(cfg["model"], args.out) if cfg.get("model") else "from scratch (demo preset)"
        report.append(f"- {name.upper()}: start {start}; " + ", ".join(f"{k}={cfg[k]}" for k in keys))
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("\n" + table)
    print(f"\nreport: {os.path.join(args.out, 'report.md')}   curves: {figure}   "
          f"total {time.perf_counter() - t_start:.0f} s")
    return rows


if __name__ == "__main__":
    pin_cpu_kernels()
    interrupted_in_one_line(main)
