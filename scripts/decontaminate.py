r"""Contamination analysis: n-gram overlap between training data and eval sets (SmolTulu paper, Table 1).

An eval example is contaminated when it shares at least one n-gram (default 8 words) with any training row, and
a training row is contaminated when it shares one with any eval example. Words are normalised first: lowercased,
punctuation (and '_') deleted, split on whitespace. N-grams never span two messages, nor two fields of an eval
example, because a match there would be an artefact of how we glue texts together, not a copied passage.

    python scripts/decontaminate.py --train='tulu-3-sft-mixture/data/*.parquet' \
        --eval gsm8k=gsm8k/test.jsonl ifeval=ifeval_input_data.jsonl mmlu_pro=mmlu_pro/test.parquet \
        --n=8 --out_clean=sft_clean.jsonl --report=contamination.json

Training rows may be SFT / RLVR rows (`messages`) or preference rows (`chosen`, `rejected`, optional `prompt`),
detected per row. Only user turns are read by default (--roles=user), as open-instruct's decontamination indexes
only the prompts; --roles=all reads every turn (a plain-string `prompt` counts as a user turn, plain-string
`chosen` / `rejected` as assistant turns). Eval files are read in each task's published format (see
EVAL_FIELDS); sets of other names need --eval_field, which a set named after a known task does not read.

Why it is fast: only words that occur in some eval example can be part of a shared n-gram, so the vocabulary is
built from the eval sets alone; a training word is one dict lookup (unknown words map to 0 and break the window),
and n-grams are hashed to 64 bits with numpy over a whole batch of rows at once (n vectorised multiply-adds of
random per-word values), then looked up in the sorted array of eval n-gram hashes with searchsorted.
"""
import argparse
import fnmatch
import glob
import json
import os
import re
import sys
import time
import unicodedata
from itertools import repeat

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DATA_SUFFIXES, ROLES, DataError, data_files, lone_surrogate, read_rows  # noqa: E402  (jsonl / json / parquet)

# Text fields of each eval task as published (HF datasets / the task's own release). Nested values (ARC's
# choices {text, label}) contribute every string inside them, each as its own segment.
EVAL_FIELDS = {
    "gsm8k": ("question",),
    "ifeval": ("prompt",),
    "arc": ("question", "choices"),
    "hellaswag": ("ctx",),
    "piqa": ("goal",),
    "mmlu": ("question",),
    "mmlu_pro": ("question",),
    "bbh": ("input",),
    "popqa": ("question",),
}


class DecontaminationError(ValueError):
    """Bad input; the message names the file, line/row and what is wrong."""


# -----------------------------------------------------------------------------
# texts of a row

def _strings(value):
    """Every string inside a (possibly nested) field value, each as its own segment."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, (list, tuple)):
        return []
    return [s for v in value for s in _strings(v)]


def _message_texts(messages, where, key, roles, string_role):
    """Contents of the messages whose role is in `roles` (None: every message)."""
    if isinstance(messages, str):  # some preference sets store `chosen` / `prompt` as plain text
        _check_text(messages, where, f"'{key}'")
        return [messages] if roles is None or string_role in roles else []
    if not isinstance(messages, (list, tuple)):
        raise DecontaminationError(f"{where}: '{key}' must be a list of messages, got {type(messages).__name__}")
    texts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DecontaminationError(f"{where}: '{key}'[{i}] must be a message with a string 'content', got {m!r:.80}")
        if m.get("role") not in ROLES:  # a turn of no known role would go unread, and its row be called clean
            raise DecontaminationError(f"{where}: '{key}'[{i}] has role {m.get('role')!r}, not one of "
                                       f"{', '.join(ROLES)}")
        _check_text(m["content"], where, f"'{key}'[{i}]")
        if roles is None or m["role"] in roles:
            texts.append(m["content"])
    return texts


def _check_text(text, where, what):  # the trainers refuse such a row, and the clean copy could not hold it
    at = lone_surrogate(text)
    if at is not None:
        raise DecontaminationError(f"{where}: {what} has an unpaired surrogate at character {at}")


def train_texts(row, where, roles=("user",)):
    """Text segments of an SFT / RLVR row (messages) or a preference row (chosen + rejected [+ prompt]): the
    turns whose role is in `roles` (None: all)."""
    if not isinstance(row, dict):
        raise DecontaminationError(f"{where}: expected an object, got {type(row).__name__}")
    if "messages" in row:
        return _message_texts(row["messages"], where, "messages", roles, "user")
    if "chosen" in row and "rejected" in row:
        # a null prompt is no prompt, as in the trainers' loader (Tulu's rows hold it in chosen and rejected)
        texts = _message_texts(row["prompt"], where, "prompt", roles, "user") if row.get("prompt") is not None else []
        return texts + [t for key in ("chosen", "rejected")
                        for t in _message_texts(row[key], where, key, roles, "assistant")]
    raise DecontaminationError(f"{where}: row has neither 'messages' nor 'chosen'/'rejected' (keys: {sorted(row)})")


def task_family(name):
    """The known task whose published fields an eval set of this name reads (arc_easy -> arc), or None."""
    if name in EVAL_FIELDS:
        return name
    return max((k for k in EVAL_FIELDS if name.startswith(k + "_")), key=len, default=None)


def eval_fields(name, field=None):
    """The task's published text fields; arc_easy / bbh_date_understanding etc. use their family's fields. `field`
    (--eval_field) is for eval sets of other names only."""
    family = task_family(name)
    if family is not None:
        return EVAL_FIELDS[family]
    if field is not None:
        return tuple(field.split(","))
    raise DecontaminationError(f"eval set '{name}': unknown task (known: {', '.join(EVAL_FIELDS)}); pass --eval_field")


def load_eval_set(name, spec, field=None):
    """-> list of examples, each a list of text segments."""
    fields = eval_fields(name, field)
    examples = []
    for where, row in read_rows(spec):
        if not isinstance(row, dict):
            raise DecontaminationError(f"{where}: eval set '{name}' row must be an object, got {type(row).__name__}")
        missing = [f for f in fields if f not in row]
        if missing:
            raise DecontaminationError(f"{where}: eval set '{name}' row lacks field(s) {missing} (keys: {sorted(row)})")
        texts = [s for f in fields for s in _strings(row[f])]
        if not any(t.strip() for t in texts):  # would count as a clean example with nothing in it
            raise DecontaminationError(f"{where}: eval set '{name}' row has no text in field(s) {list(fields)}")
        examples.append(texts)
    return examples


# -----------------------------------------------------------------------------
# n-gram hashing

_PUNCT = re.compile(r"[^\w\s]+|_+")
# The same deletion for ASCII text as a str.translate table, 2-3x faster than the regex; most training text is ASCII.
_ASCII_PUNCT = {c: None for c in range(128) if _PUNCT.fullmatch(chr(c))}


def normalise(text):
    if text.isascii():
        return text.lower().translate(_ASCII_PUNCT).split()
    # NFKC first: a decomposed "café" keeps its accent (not deleted as a stray mark), full-width letters match
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).casefold()).split()


def encode(docs, vocab):
    """docs: list of lists of text segments -> (word ids int64, doc index of each position).
    Id 0 marks a word absent from the vocabulary and the break after every segment, so a window holding a 0
    is never a shared n-gram, and windows never cross segments or documents."""
    words, lengths = [], []
    for segments in docs:
        start = len(words)
        for seg in segments:
            words += normalise(seg)
            words.append(None)  # never a vocab key, so it maps to 0
        lengths.append(len(words) - start)
    ids = np.fromiter(map(vocab.get, words, repeat(0)), dtype=np.int64, count=len(words))
    return ids, np.repeat(np.arange(len(docs)), lengths)


def ngram_hashes(ids, owner, values, mults):
    """64-bit hashes of every n-gram free of 0 ids, and the doc each belongs to (n = len(mults))."""
    n = len(mults)
    num = len(ids) - n + 1
    if num <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    v = values[ids]
    h = v[:num] * mults[0]  # uint64 arithmetic wraps mod 2**64, which is what a hash wants
    for k in range(1, n):
        h += v[k:k + num] * mults[k]
    zeros = np.concatenate([[0], np.cumsum(ids == 0)])
    ok = zeros[n:] == zeros[:num]  # no 0 inside the window
    return h[ok], owner[:num][ok]


class EvalIndex:
    """The eval sets' n-grams as a sorted array of hashes; `scan` marks the training rows (and eval n-grams) hit."""

    def __init__(self, eval_sets, n=8, seed=0):
        if n < 1:
            raise DecontaminationError(f"n must be >= 1, got {n}")
        self.n = n
        self.names = list(eval_sets)
        docs = [ex for examples in eval_sets.values() for ex in examples]
        self.bounds = np.cumsum([0] + [len(examples) for examples in eval_sets.values()])
        self.vocab = {}
        for segments in docs:
            for seg in segments:
                for w in normalise(seg):
                    self.vocab.setdefault(w, len(self.vocab) + 1)
        rng = np.random.default_rng(seed)
        top = np.iinfo(np.uint64).max
        self.values = rng.integers(0, top, size=len(self.vocab) + 1, dtype=np.uint64, endpoint=True)
        self.mults = rng.integers(0, top, size=n, dtype=np.uint64, endpoint=True) | np.uint64(1)
        ids, owner = encode(docs, self.vocab)
        h, self.example_of = ngram_hashes(ids, owner, self.values, self.mults)
        self.hashes, self.ngram_of = np.unique(h, return_inverse=True)  # ngram_of: window -> index in hashes
        # A 2**24-entry table of the hashes' top bits rejects almost every training n-gram with one random read,
        # so only the few candidates pay for a binary search.
        self.prefilter = np.zeros(1 << 24, bool)
        self.prefilter[self.hashes >> np.uint64(40)] = True
        self.has_ngram = np.zeros(len(docs), bool)
        self.has_ngram[self.example_of] = True
        self.hit = np.zeros(len(self.hashes), bool)

    def scan(self, docs):
        """docs: list of lists of text segments -> bool per doc: shares an n-gram with some eval example."""
        contaminated = np.zeros(len(docs), bool)
        if len(self.hashes) == 0:
            return contaminated
        h, doc = ngram_hashes(*encode(docs, self.vocab), self.values, self.mults)
        candidate = self.prefilter[h >> np.uint64(40)]
        h, doc = h[candidate], doc[candidate]
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        found = self.hashes[pos] == h
        self.hit[pos[found]] = True
        contaminated[doc[found]] = True
        return contaminated

    def report(self):
        """Per eval set: examples, contaminated count and share, indices, and examples too short for any n-gram."""
        example_hit = np.zeros(len(self.has_ngram), bool)
        example_hit[self.example_of[self.hit[self.ngram_of]]] = True
        out = {}
        for name, lo, hi in zip(self.names, self.bounds[:-1], self.bounds[1:]):
            hit = example_hit[lo:hi]
            out[name] = {
                "examples": int(hi - lo),
                "contaminated": int(hit.sum()),
                "share": float(hit.mean()) if hi > lo else 0.0,
                "too_short": int((~self.has_ngram[lo:hi]).sum()),
                "contaminated_indices": np.flatnonzero(hit).tolist(),
            }
        return out


def decontaminate(rows, eval_sets, n=8, batch_size=2048, out_clean=None, progress=True, roles=("user",)):
    """rows: iterable of (where, row). Streams the rows in batches; writes the uncontaminated ones to `out_clean`
    (a text file object, jsonl) when given. roles: the training turns read (None: all). Returns the report dict."""
    index = EvalIndex(eval_sets, n=n)
    num_rows, removed = 0, []
    bar = tqdm(unit=" rows", smoothing=0.1, disable=not progress)

    def flush(batch):
        contaminated = index.scan([train_texts(row, where, roles) for where, row in batch])
        for (where, row), bad in zip(batch, contaminated):
            if bad:
                removed.append(where)
            elif out_clean is not None:
                out_clean.write(json.dumps(row, ensure_ascii=False) + "\n")
        bar.update(len(batch))

    batch = []
    for item in rows:
        batch.append(item)
        if len(batch) == batch_size:
            flush(batch)
            num_rows += len(batch)
            batch = []
    if batch:
        flush(batch)
        num_rows += len(batch)
    bar.close()
    return {
        "n": n,
        "roles": "all" if roles is None else list(roles),
        "train_rows": num_rows,
        "train_rows_contaminated": len(removed),
        "contaminated_train_rows": removed,
        "eval": index.report(),
    }


# -----------------------------------------------------------------------------
# CLI

def parse_eval_args(items):
    specs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DecontaminationError(f"--eval expects NAME=PATH, got '{item}'")
        if name in specs:
            raise DecontaminationError(f"--eval: eval set '{name}' given twice")
        specs[name] = path
    return specs


def read_as_training_data(path, train, train_files):
    """Whether `path` is one of the training files, or would be read as one by a later run on the same --train
    (a file written into the --train folder, or matched by its glob)."""
    if any(os.path.exists(path) and os.path.samefile(path, f) for f in train_files):
        return True
    if not path.endswith(DATA_SUFFIXES):
        return False
    path = os.path.abspath(path)
    if os.path.isdir(train):
        return os.path.dirname(path) == os.path.abspath(train)
    return glob.has_magic(train) and fnmatch.fnmatch(path, os.path.abspath(train))


def output_problem(path):
    """Why no file can be written at `path`, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"its folder {folder} does not exist"
    if os.path.isdir(path):
        return "a folder, not a file"
    if not os.access(folder, os.W_OK):
        return f"its folder {folder} is not writable"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="training data: a jsonl/json/parquet file, folder or glob")
    p.add_argument("--eval", nargs="+", required=True, metavar="NAME=PATH",
                   help=f"eval sets; NAME picks the text fields ({', '.join(EVAL_FIELDS)}, or with a _suffix)")
    p.add_argument("--eval_field", default=None, help="text field(s), comma separated, for eval sets of other names "
                                                      "(a set named after a known task reads that task's fields)")
    p.add_argument("--n", type=int, default=8, help="n-gram length in normalised words")
    p.add_argument("--roles", default="user", help="training turns to read: comma-separated roles, or all")
    p.add_argument("--batch_size", type=int, default=2048, help="training rows hashed per numpy batch")
    p.add_argument("--out_clean", default=None, help="write the uncontaminated training rows here (jsonl)")
    p.add_argument("--report", default=None, help="write the full report here (json)")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)

    roles = None if args.roles == "all" else tuple(r.strip() for r in args.roles.split(","))
    unknown = sorted(set(roles or ()) - set(ROLES))
    if unknown:  # a misspelt role reads no text, and every row would pass as clean
        p.error(f"--roles: unknown {', '.join(map(repr, unknown))} (roles: {', '.join(ROLES)}, or all)")
    for flag in ("out_clean", "report"):  # now, not once the scan is over (--report is written last)
        path = getattr(args, flag)
        problem = output_problem(path) if path else None
        if problem:
            p.error(f"--{flag}={path}: {problem}")
    specs = parse_eval_args(args.eval)
    if args.eval_field and all(task_family(name) for name in specs):  # it would be read by none of them
        p.error(f"--eval_field={args.eval_field}: every --eval set is named after a known task, which reads its own "
                f"field(s) (" + "; ".join(f"{name}: {','.join(eval_fields(name))}" for name in specs) + "); "
                "--eval_field is for eval sets of other names (e.g. --eval mine=PATH)")
    eval_sets = {name: load_eval_set(name, spec, args.eval_field) for name, spec in specs.items()}
    train_files = data_files(args.train)
    if args.out_clean and read_as_training_data(args.out_clean, args.train, train_files):
        p.error(f"--out_clean={args.out_clean} is, or would be, one of the --train={args.train} files: write the clean "
                f"rows elsewhere")
    train_bytes = sum(os.path.getsize(f) for f in train_files)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if args.out_clean:  # written whole or not at all: a temporary file, renamed once every row is in
        try:
            with open(args.out_clean + ".tmp", "w", encoding="utf-8") as f:
                report = decontaminate(read_rows(args.train), eval_sets, args.n, args.batch_size, f,
                                       not args.no_progress, roles)
            if report["train_rows"] == 0:
                raise DataError(args.train, "holds no training rows: nothing to check")
            os.replace(args.out_clean + ".tmp", args.out_clean)
        except BaseException:  # a bad row, Ctrl-C: no half-written file left beside it
            if os.path.exists(args.out_clean + ".tmp"):
                os.remove(args.out_clean + ".tmp")
            raise
    else:
        report = decontaminate(read_rows(args.train), eval_sets, args.n, args.batch_size, None, not args.no_progress,
                               roles)
        if report["train_rows"] == 0:
            raise DataError(args.train, "holds no training rows: nothing to check")
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    report.update(train=args.train, eval_files=parse_eval_args(args.eval), out_clean=args.out_clean,
                  seconds=elapsed, cpu_seconds=cpu, train_mb=train_bytes / 1e6,
                  rows_per_s=report["train_rows"] / elapsed, mb_per_s=train_bytes / 1e6 / elapsed)

    print(f"\n{args.n}-gram contamination of {args.train} ({report['train_rows']:,} rows)")
    # "no n-gram": no single field (segment) of the example has n words, so it cannot be matched
    print(f"{'eval set':<24} {'examples':>9} {'contaminated':>13} {'percent':>8} {'no n-gram':>12}")
    for name, r in report["eval"].items():
        print(f"{name:<24} {r['examples']:>9,} {r['contaminated']:>13,} {100 * r['share']:>7.2f}% {r['too_short']:>12,}")
    removed = report["train_rows_contaminated"]
    print(f"training rows sharing an n-gram with an eval set: {removed:,} "
          f"({100 * removed / max(report['train_rows'], 1):.3f}%)" + (f"; clean rows written to {args.out_clean}" if args.out_clean else ""))
    # CPU time too: on a shared machine the wall clock mostly measures the neighbours
    print(f"throughput: {report['rows_per_s']:,.0f} rows/s, {report['mb_per_s']:.1f} MB/s "
          f"({elapsed:.1f} s wall, {cpu:.1f} s CPU = {report['train_rows'] / max(cpu, 1e-9):,.0f} rows/s per CPU second)")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    try:
        main()
    except (DecontaminationError, DataError) as e:
        sys.exit(f"error: {e}")
