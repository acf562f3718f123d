"""Throughput of scripts/decontaminate.py on synthetic tulu-like data (the real mixture is ~940k conversations).

    python bench/decontaminate.py [--rows 100000] [--workdir /tmp/decontam_bench] [--ifeval PATH]

Writes ~1.8 KB conversations of Zipfian pseudo-words with capitals and punctuation, 1% of them quoting a 10-word
span of an eval question, plus 3,000 synthetic GSM8K-style questions and the 541 real IFEval prompts as eval
sets (--ifeval: google/IFEval's input_data.jsonl; by default the project's copy in ../shared/data next to the
repository); then runs the script and prints its timing. Every planted row must be found and nothing else.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IFEVAL = os.path.join(ROOT, "..", "shared", "data", "ifeval_input_data.jsonl")  # the default of --ifeval


def make_data(workdir, rows, seed=0):
    rng = np.random.default_rng(seed)
    vocab_size = 60000
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(vocab_size)]
    zipf = np.cumsum(1.0 / np.arange(1, vocab_size + 1) ** 1.07)
    zipf /= zipf[-1]
    punct = np.array(["", "", "", "", "", "", ",", ".", "?", "!", ":"])

    def text(num_words):
        ids = np.minimum(np.searchsorted(zipf, rng.random(num_words)), vocab_size - 1)
        words = [vocab[i] + p for i, p in zip(ids, punct[rng.integers(0, len(punct), num_words)])]
        words[0] = words[0].capitalize()
        return " ".join(words)

    os.makedirs(workdir, exist_ok=True)
    questions = [text(int(rng.integers(25, 70))) for _ in range(3000)]
    with open(os.path.join(workdir, "gsm8k.jsonl"), "w") as f:
        for q in questions:
            f.write(json.dumps({"question": q, "answer": "#### 1"}) + "\n")
    planted = 0
    with open(os.path.join(workdir, "train.jsonl"), "w") as f:
        for i in range(rows):
            turns = int(rng.integers(1, 4))
            msgs = []
            for _ in range(turns):
                msgs.append({"role": "user", "content": text(int(rng.integers(15, 60)))})
                msgs.append({"role": "assistant", "content": text(int(rng.integers(60, 220) / turns))})
            if rng.random() < 0.01:
                words = questions[int(rng.integers(len(questions)))].split()
                start = int(rng.integers(0, len(words) - 10))
                msgs[0]["content"] += " " + " ".join(words[start:start + 10])
                planted += 1
            f.write(json.dumps({"id": f"synth-{i}", "source": "bench", "messages": msgs}) + "\n")
    return planted


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--workdir", default="/tmp/decontam_bench")
    ap.add_argument("--ifeval", default=IFEVAL, help="the IFEval prompts (google/IFEval input_data.jsonl)")
    args = ap.parse_args()
    if not os.path.isfile(args.ifeval):
        ap.error(f"--ifeval {args.ifeval}: no such file (google/IFEval's input_data.jsonl)")
    planted = make_data(args.workdir, args.rows)
    train = os.path.join(args.workdir, "train.jsonl")
    report = os.path.join(args.workdir, "report.json")
    size_mb = os.path.getsize(train) / 1e6
    t0 = time.perf_counter()
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "decontaminate.py"), f"--train={train}", "--eval",
           f"gsm8k={os.path.join(args.workdir, 'gsm8k.jsonl')}", f"ifeval={args.ifeval}", f"--report={report}",
           "--no_progress"]
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    with open(report) as f:
        found = json.load(f)["train_rows_contaminated"]
    print(f"\n{args.rows} rows ({size_mb:.0f} MB): {wall:.1f} s wall, {args.rows / wall:,.0f} rows/s, "
          f"{size_mb / wall:.1f} MB/s; planted {planted}, flagged {found}; "
          f"940k rows at this rate: {940_000 / (args.rows / wall) / 60:.1f} min")


if __name__ == "__main__":
    main()
