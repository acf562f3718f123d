"""The paper's ablation: train a stage over a grid of learning rates x effective batch sizes, evaluate every point.

SmolTulu's claim: the ratio lr / effective batch decides whether a small model gets better at reasoning (ARC,
GSM8K: higher ratios) or at pattern recognition (HellaSwag, IFEval: lower ratios). This script trains one run per
grid point (an ordinary trainer invocation, one after another; a torchrun job per point with --nproc_per_node),
evaluates it, and writes sweep.csv, sweep.md and one contour plot per metric over (log batch, log lr) with lines
of constant lr/batch drawn in, as in the paper's figures (over (log batch, log lr/batch) for a --ratios grid).

    # CPU demo grid (3 x 3 on the synthetic task; 9 points took 400 s on 2 cores with --batch_sizes=2,4,8)
    python scripts/sweep.py
    # SFT of SmolLM2-135M on tulu-3-sft-mixture, 8 GPUs per point: ratios from 2.3e-8 (below Tulu 3's 3.9e-8) to
    # 3.4e-5 (above SmolTulu SFT-1130's 1.1e-5)
    python scripts/sweep.py --stage=sft --config=configs/sft_smoltulu_1130.json --nproc_per_node=8 \\
        --model=PATH/SmolLM2-135M --data='PATH/tulu-3-sft-mixture/data/*.parquet' \\
        --lrs=3e-6,1e-5,3e-5,9e-5,2.7e-4 --batch_sizes=8,32,128 --eval_tasks=arc,gsm8k,hellaswag,ifeval \\
        --eval_data_dir=PATH/evals --out=runs/sweep_135m
    # ratios at a fixed batch instead of learning rates: lr = ratio x batch
    python scripts/sweep.py --ratios=1e-6,1e-5,1e-4 --batch_sizes=16

Resumable: a point whose result file exists is not run again, and one run with other settings (stage, preset,
data, seed, trainer options, evaluation) is an error rather than a stale row; a point that fails is reported in
the table (status 'failed', its log in the point's folder) and the others go on. Every other --key=value after
the known options is passed to the trainer unchanged (e.g. --epochs=1 --max_seq_len=1024), except those the
grid sets. "batch" is the trainer's effective batch: rows per optimizer step, which are packed rows of several
conversations when the preset packs (the demo presets do; the paper's presets do not). As the demo does, it runs
PyTorch's AVX2 CPU kernels, so that the CPU grid gives the same table on any x86-64 CPU with AVX2 (scripts/demo.py).
"""
import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from demo import interrupted_in_one_line, pin_cpu_kernels, run_child, write_json  # noqa: E402  (scripts/: on the path)

TRAINERS = {"sft": "train_sft.py", "dpo": "train_dpo.py"}
DEMO_CONFIGS = {"sft": "configs/sweep_demo_sft.json", "dpo": "configs/dpo_demo.json"}
DEFAULT_BATCHES = {"sft": "4,8,16", "dpo": "8,16,32"}  # multiples of the demo presets' per-device batch (2, 8)
DEFAULT_LRS = {"sft": "1e-3,3e-3,9e-3", "dpo": "3e-5,1e-4,3e-4"}  # around the demo presets' (4e-3 packed; 1e-4)
GRID_KEYS = ("lr", "lr_bs_ratio", "total_batch_size", "grad_accum", "run_dir", "seed", "config", "model", "data")
DEMO_METRICS = ["arith_acc", "constraint_acc", "pref_acc"]


def numbers(text, flag, kind):
    """The comma-separated positive numbers of a grid flag; ValueError naming the flag for anything else."""
    values = []
    for item in text.split(","):
        try:
            value = kind(item)
        except ValueError:
            raise ValueError(f"{flag}: {item.strip()!r} is not a {'whole ' if kind is int else ''}number") from None
        if not 0 < value < float("inf"):
            raise ValueError(f"{flag}: {item.strip()!r} is not positive")
        values.append(value)
    return values


def grid(args):
    """(lr, batch, lr_bs_ratio) for every point."""
    batches = numbers(args.batch_sizes, "--batch_sizes", int)
    if args.ratios:  # (12 digits: 1e-4 x 3 is 0.00030000000000000003 in floats, a folder name and --lr of its own)
        return [(float(f"{r * b:.12g}"), b, r) for r in numbers(args.ratios, "--ratios", float) for b in batches]
    return [(lr, b, lr / b) for lr in numbers(args.lrs, "--lrs", float) for b in batches]


def point_name(lr, batch):
    return f"lr{lr!r}_bs{batch}"  # repr: two learning rates never share a folder


def train_command(args, run_dir, lr, batch, passthrough):
    launcher = [sys.executable]
    if args.nproc_per_node > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc_per_node}"]
    # --overwrite: a point is only trained again when it has no result or its training failed (--retry_failed);
    # --resume: from its last checkpoint, where it has one (an interrupted point of a preset that checkpoints), else
    # from the start
    # --lr_bs_ratio=0: the grid's lr is the one trained with, whatever ratio a preset sets (a command-line --lr
    # turns a preset's ratio off already; this says so in the command)
    cmd = launcher + [os.path.join(ROOT, TRAINERS[args.stage]), f"--run_dir={run_dir}", f"--lr={lr!r}",
                      "--lr_bs_ratio=0", f"--total_batch_size={batch}", f"--seed={args.seed}", "--overwrite=true",
                      "--resume=true"]
    if args.config:
        cmd.insert(len(launcher) + 1, f"--config={args.config}")
    for key in ("model", "data"):
        if getattr(args, key):
            cmd.append(f"--{key}={getattr(args, key)}")
    return cmd + passthrough


def evaluate(args, final, run_dir):
    """Metric name -> value for one trained point."""
    if args.eval_data_dir:
        out = os.path.join(run_dir, "eval.json")
        cmd = [sys.executable, os.path.join(ROOT, "eval.py"), f"--model={final}", f"--tasks={args.eval_tasks}",
               f"--data_dir={args.eval_data_dir}", f"--out={out}"]
        if args.eval_limit:
            cmd.append(f"--limit={args.eval_limit}")
        run_child(cmd, check=True)
        with open(out) as f:
            summary = json.load(f)["summary"]
        return {task: res["value"] for task, res in summary.items()}
    import data
    import eval as evaluation
    model, tok = evaluation.load_model_and_tokenizer(final)
    demo_seed, _ = evaluation.demo_seed_of(*evaluation.run_config_of(final))  # the split the trainer held out
    scores = evaluation.evaluate_demo(model, tok, data.make_demo_data(demo_seed), limit=args.eval_limit or None)
    return {k: scores[k] for k in DEMO_METRICS}


def trainer_options(passthrough):
    """--key=value options -> {key: value}, a repeated key's last value winning as in the trainers: the same options
    in another order make the same point."""
    return dict((key.replace("-", "_"), value) for key, value in (p[2:].split("=", 1) for p in passthrough))


def point_settings(args, lr, batch, passthrough):
    """Everything that decides a point's numbers: a stored result counts only under the same settings. The preset
    and the data files count by what they hold (the preset's values; each file's size and modification time), so
    that editing either in place does not leave stale rows."""
    import data
    keys = ("stage", "config", "model", "data", "seed", "eval_data_dir", "eval_limit", "nproc_per_node") + \
        (("eval_tasks",) if args.eval_data_dir else ())
    with open(args.config) as f:
        preset = json.load(f)
    files = [[f, os.path.getsize(f), os.path.getmtime(f)] for f in data.data_files(args.data)] if args.data else []
    # The model a point starts from and the benchmark files likewise (a model retrained into the same --model
    # folder left the old rows standing); kept out of demo points' settings, which stored neither.
    folders = {key: folder_files(getattr(args, key), MODEL_FILES if key == "model" else None)
               for key in ("model", "eval_data_dir") if getattr(args, key)}
    return {"lr": lr, "batch": batch, "trainer_options": trainer_options(passthrough), "preset": preset,
            "data_files": files, **{f"{key}_files": listed for key, listed in folders.items()},
            **{k: getattr(args, k) for k in keys}}


# What a model folder's model is (not what else is kept there, such as the demo's cached scores)
MODEL_FILES = re.compile(r"(generation_)?config\.json|model.*\.safetensors(\.index\.json)?|tokenizer(_config)?\.json|"
                         r"special_tokens_map\.json|chat_template\.jinja")


def folder_files(folder, names=None):
    """[relative path, size, modification time] of every file under `folder` (those whose name `names` matches),
    in a fixed order."""
    return sorted([os.path.relpath(os.path.join(root, name), folder), os.path.getsize(os.path.join(root, name)),
                   os.path.getmtime(os.path.join(root, name))]
                  for root, _, found in os.walk(folder) for name in found if names is None or names.fullmatch(name))


ATTEMPT = "--- attempt "  # train.log's line before each attempt at a point


def why_training_failed(run_dir):
    """The trainer's own error line from its log (under torchrun, above torchrun's report), and where the log is."""
    path = os.path.join(run_dir, "train.log")
    with open(path, errors="replace") as log:
        lines = [line.strip() for line in log if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith(ATTEMPT)]
    lines = lines[starts[-1] + 1 if starts else 0:]  # the last attempt's (the log keeps every attempt's)
    said = [line for line in lines if re.match(r"(rank \d+ of this node: )?error: |\w+(Error|Exception): ", line)]
    last = (said or lines or ['no output'])[-1]
    # an interrupted point whose checkpoints were trained otherwise (the preset or an option changed since)
    hint = f"; delete {run_dir} to train this point from the start" if re.search(
        r"error: --resume: .*(trained with other settings|is not the one the run|are not the ones the run)", last) else ""
    return f"{last} (log: {path}){hint}"


def run_point(args, lr, batch, ratio, passthrough):
    name = point_name(lr, batch)
    run_dir = os.path.join(args.out, name)
    result_path = os.path.join(run_dir, "sweep_point.json")
    settings = point_settings(args, lr, batch, passthrough)
    trained_seconds = None
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
        old = result.get("settings", {})
        if not settings["eval_data_dir"]:  # demo points: eval_tasks is not used (earlier sweeps stored its default)
            old.pop("eval_tasks", None)
        if isinstance(old.get("trainer_options"), list):  # earlier sweeps stored them as given
            old["trainer_options"] = trainer_options(old["trainer_options"])
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise SystemExit(f"{result_path}: this point was run with other settings (stored, now): {diff}; "
                             "pass another --out or delete the folder")
        if result["status"] == "ok" or not args.retry_failed:
            print(f"--- {name}: done before ({result['status']}), skipped", flush=True)
            return result
        # training finished and only the evaluation failed (a benchmark file missing, say): its model is reused
        if os.path.isdir(os.path.join(run_dir, "final")):
            trained_seconds = result.get("train_seconds")
    os.makedirs(run_dir, exist_ok=True)
    result = {"point": name, "lr": lr, "batch": batch, "lr_bs_ratio": ratio, "settings": settings}
    phase = f"training (log: {os.path.join(run_dir, 'train.log')})"
    try:
        if trained_seconds is None:
            cmd = train_command(args, run_dir, lr, batch, passthrough)
            print(f"--- {name}: {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            with open(os.path.join(run_dir, "train.log"), "a") as log:  # after an interrupted attempt's, if any
                # (on a line of its own: a killed attempt may have left its last line unfinished)
                log.write(f"\n{ATTEMPT}{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
                log.flush()
                run_child(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
            trained_seconds = round(time.perf_counter() - t0, 1)
        else:
            print(f"--- {name}: trained before, evaluated again", flush=True)
        result["train_seconds"] = trained_seconds
        phase = "evaluation (its output is above)"
        result["metrics"] = evaluate(args, os.path.join(run_dir, "final"), run_dir)
        result["status"] = "ok"
    except (subprocess.CalledProcessError, OSError, RuntimeError, ValueError) as e:
        result["status"] = "failed"
        if isinstance(e, subprocess.CalledProcessError) and phase.startswith("training"):
            result["error"] = f"training failed (exit {e.returncode}): {why_training_failed(run_dir)}"
        else:
            result["error"] = f"{type(e).__name__} in {phase}: {e}"
        print(f"--- {name}: FAILED: {result['error']}", flush=True)
    write_json(result_path, result)
    return result


def write_tables(results, out):
    metrics = sorted({m for r in results for m in r.get("metrics", {})})
    header = ["point", "lr", "batch", "lr_bs_ratio", "status", "train_seconds"] + metrics
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in results:
            w.writerow([r["point"], r["lr"], r["batch"], r["lr_bs_ratio"], r["status"], r.get("train_seconds", "")]
                       + [r.get("metrics", {}).get(m, "") for m in metrics])
    lines = ["| " + " | ".join(["lr", "batch", "lr/batch", *metrics, "status"]) + " |",
             "|" + "---|" * (len(metrics) + 4)]
    for r in sorted(results, key=lambda r: (r["lr_bs_ratio"], r["batch"])):
        vals = [f"{100 * r['metrics'][m]:.1f}" if m in r.get("metrics", {}) else "-" for m in metrics]
        lines.append("| " + " | ".join([f"{r['lr']:.3g}", str(r["batch"]), f"{r['lr_bs_ratio']:.3g}", *vals,
                                        r["status"]]) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write("Metrics in %, rows sorted by lr / effective batch (batch: rows per optimizer step, packed rows when "
                "the preset packs).\n\n" + table + "\n")
    return metrics, table


def plot_contours(results, metrics, out, by_ratio=False):
    """One contour plot per metric over (log10 batch, log10 lr), with constant lr/batch lines; `by_ratio` (a grid of
    --ratios, whose learning rates differ at every batch) over (log10 batch, log10 lr/batch) instead."""
    for name in os.listdir(out):  # an earlier grid's plots would stand beside this grid's table
        if name.startswith("contour_") and name.endswith(".png"):
            os.remove(os.path.join(out, name))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("matplotlib is not installed: no plots (the tables are written)")
        return []
    ok = [r for r in results if r["status"] == "ok"]
    rate = "lr_bs_ratio" if by_ratio else "lr"
    lrs = sorted({r[rate] for r in ok})
    batches = sorted({r["batch"] for r in ok})
    if len(lrs) < 2 or len(batches) < 2:
        print(f"fewer than 2 distinct {'ratios' if by_ratio else 'learning rates'} or batch sizes finished: no "
              f"contour plots")
        return []
    x, y = np.log10(batches), np.log10(lrs)
    paths = []
    for metric in metrics:
        z = np.full((len(lrs), len(batches)), np.nan)
        for r in ok:
            if metric in r["metrics"]:
                z[lrs.index(r[rate]), batches.index(r["batch"])] = 100 * r["metrics"][metric]
        fig, ax = plt.subplots(figsize=(5.2, 4.2))
        if np.isfinite(z).sum() >= 4 and np.nanmax(z) > np.nanmin(z):
            cs = ax.contourf(x, y, np.ma.masked_invalid(z), levels=12, cmap="viridis")
            fig.colorbar(cs, ax=ax, label=f"{metric} (%)")
        for i, lr in enumerate(y):
            for j, b in enumerate(x):
                if np.isfinite(z[i, j]):
                    ax.annotate(f"{z[i, j]:.1f}", (b, lr), ha="center", va="center", fontsize=8, color="white",
                                bbox=dict(boxstyle="round,pad=0.15", fc="black", alpha=0.45, lw=0))
        ratios = sorted({r["lr_bs_ratio"] for r in ok})
        decades = range(math.floor(math.log10(ratios[0])), math.ceil(math.log10(ratios[-1])) + 1)
        # lines at round ratios, which their labels say (none where the ratios are the rows)
        for ratio in [] if by_ratio else [m * 10.0 ** e for e in decades for m in (1, 2, 5)]:
            ax.plot(x, np.log10(ratio) + x, "w--", lw=0.8, alpha=0.8)  # log lr = log ratio + log batch
            # label the line where it leaves the plot (right edge or top), inside it, so the colorbar hides none
            bx = min(x[-1], y[-1] - np.log10(ratio))
            if bx > x[0] and np.log10(ratio) + bx > y[0]:
                ax.annotate(f"{ratio:.0e}", (bx, np.log10(ratio) + bx), ha="right", va="top", fontsize=7,
                            color="white")
        ax.set_xlim(x[0], x[-1])
        ax.set_ylim(y[0], y[-1])
        ax.set_xlabel("log10 effective batch (rows per step)")
        ax.set_ylabel("log10 lr / batch" if by_ratio else "log10 learning rate")
        ax.set_title(f"{metric}: lr = ratio x batch" if by_ratio else f"{metric}: dashed lines = constant lr/batch")
        fig.tight_layout()
        path = os.path.join(out, f"contour_{metric.replace('/', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    # allow_abbrev off: --lr (a trainer option the grid sets) must not be taken for --lrs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--stage", choices=sorted(TRAINERS), default="sft")
    ap.add_argument("--config", default="", help="trainer preset (default, without --data: the stage's CPU demo "
                                                  "sweep preset)")
    ap.add_argument("--model", default="")
    ap.add_argument("--data", default="")
    ap.add_argument("--lrs", default=None, help="learning rates (default, for the demo presets: "
                                                "1e-3,3e-3,9e-3 for SFT, 3e-5,1e-4,3e-4 for DPO)")
    ap.add_argument("--batch_sizes", default=None, help="effective batches (default: sft 4,8,16; dpo 8,16,32)")
    ap.add_argument("--ratios", default="", help="lr/batch ratios instead of --lrs (lr = ratio x batch)")
    ap.add_argument("--nproc_per_node", type=int, default=1, help="> 1: each point is a torchrun job")
    ap.add_argument("--eval_tasks", default=None, help="eval.py's --tasks, with --eval_data_dir (default "
                                                        "arc,gsm8k,hellaswag,ifeval)")
    ap.add_argument("--eval_data_dir", default="", help="benchmark files for eval.py ('' = the demo held-out split)")
    ap.add_argument("--eval_limit", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retry_failed", action="store_true",
                    help="run failed points again: trained again where training failed, else evaluated again")
    ap.add_argument("--out", default=None, help="default: runs/sweep_<stage>")
    args, passthrough = ap.parse_known_args(argv)
    bad = [p for p in passthrough if not (p.startswith("--") and "=" in p)]
    if bad:
        ap.error(f"arguments for the trainer must be --key=value, got {bad}")
    grid_set = [p for p in passthrough if p[2:].split("=", 1)[0].replace("-", "_") in GRID_KEYS]
    if grid_set:
        ap.error(f"{grid_set}: set by the sweep for every point (use --lrs / --ratios / --batch_sizes / --seed / "
                 "--config / --model / --data)")
    if "--objective=reward_model" in passthrough:
        ap.error("--objective=reward_model: the sweep scores each point as a policy; a reward model's score is its "
                 "held-out pair accuracy, which train_dpo.py logs (eval_accuracy in its metrics.jsonl)")
    if args.data and not args.config:
        ap.error("--data needs --config, the trainer preset for real data (e.g. configs/sft_smoltulu_1130.json); "
                 "without one the trainer would take its CPU demo preset")
    if args.data and not args.eval_data_dir:
        ap.error("--data needs --eval_data_dir, the benchmark files to score each point on (without it the points "
                 "would be scored on the synthetic demo task)")
    if args.eval_tasks and not args.eval_data_dir:
        ap.error("--eval_tasks needs --eval_data_dir, the benchmark files (without it the points are scored on the "
                 "synthetic demo task)")
    args.eval_tasks = args.eval_tasks or ("arc,gsm8k,hellaswag,ifeval" if args.eval_data_dir else "")
    if args.lrs and args.ratios:
        ap.error("--lrs and --ratios both set the learning rates: give one")
    if args.config and not (args.lrs or args.ratios):  # (a paper preset's lr is ~100 times below the demo's)
        ap.error("--config needs --lrs or --ratios: the default learning rates are the demo presets'")
    args.lrs = args.lrs or DEFAULT_LRS[args.stage]
    if not args.config:
        args.config = os.path.join(ROOT, DEMO_CONFIGS[args.stage])
    args.batch_sizes = args.batch_sizes or DEFAULT_BATCHES[args.stage]
    args.out = args.out or os.path.join(ROOT, "runs", f"sweep_{args.stage}")
    if args.stage == "dpo" and not args.model:
        ap.error("--stage=dpo needs --model (an SFT model folder, e.g. runs/sft_demo/final)")
    if args.nproc_per_node < 1:  # else run as one process, under a setting that says otherwise
        ap.error(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    if args.eval_limit < 0:  # a negative limit would leave the last rows out of the demo split's scores
        ap.error(f"--eval_limit must be 0 (every example) or more, got {args.eval_limit}")
    try:  # the preset and the data are read before the first point runs; checked now, not as a traceback then
        with open(args.config) as f:
            json.load(f)
    except OSError as e:
        ap.error(f"--config={args.config}: {e.strerror}")
    except ValueError as e:
        ap.error(f"--config={args.config}: not a JSON preset ({e})")
    if args.data:
        import data
        try:
            data.data_files(args.data)
        except data.DataError as e:
            ap.error(f"--data={e}")
    try:
        points = grid(args)
    except ValueError as e:
        ap.error(str(e))
    os.makedirs(args.out, exist_ok=True)

    print(f"{len(points)} points: lr x batch = " + ", ".join(point_name(lr, b) for lr, b, _ in points), flush=True)
    t0 = time.perf_counter()
    results = [run_point(args, lr, b, ratio, passthrough) for lr, b, ratio in points]
    metrics, table = write_tables(results, args.out)
    plots = plot_contours(results, metrics, args.out, by_ratio=bool(args.ratios))
    failed = [r["point"] for r in results if r["status"] != "ok"]
    print("\n" + table)
    print(f"\n{len(results) - len(failed)}/{len(results)} points ok in {time.perf_counter() - t0:.0f} s; "
          f"tables in {args.out}/sweep.csv|md; plots: {', '.join(os.path.basename(p) for p in plots) or 'none'}")
    if failed:
        print(f"failed points (see their train.log): {failed}")
    return results


if __name__ == "__main__":
    pin_cpu_kernels()  # as the demo: the same seed gives the same table on any x86-64 with AVX2
    sys.exit(1 if any(r["status"] != "ok" for r in interrupted_in_one_line(main)) else 0)  # failed points: above
