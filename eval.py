r"""
The paper's benchmark table from a checkpoint, scored the way SmolLM2's lighteval setup scores it.

    python eval.py --model=runs/sft_smoltulu_1130/final --tasks=gsm8k,ifeval,arc,hellaswag,piqa,mmlu_pro,bbh \
        --data_dir=evals/
    python eval.py --model=... --tasks=arc,piqa --data_dir=evals/ --limit=100 --batch_size=32 --out=arc.json
    python eval.py        # no --data_dir: the synthetic demo tasks' held-out split on runs/sft_demo/final

Local copies of the datasets, in the format the hub publishes them. Each split may be a `.jsonl`, `.json`
or `.parquet` file, or hub-style parquet shards (`test-00000-of-00001.parquet`) next to where the file
would be, in one of these forms and one of the places listed (a second copy is refused, not ignored); every entry
under bbh/ must be a subtask; paths are relative to --data_dir:

    task       files                                   fields (hub dataset)
    gsm8k      gsm8k/test, gsm8k/train (few-shot pool)  question, answer '... #### 42'  (openai/gsm8k, main)
               (or gsm8k/main/test, gsm8k/main/train)
    ifeval     ifeval/train, ifeval/input_data or      key, prompt, instruction_id_list, kwargs  (google/IFEval)
               ifeval/ifeval_input_data
    arc        arc/ARC-Easy/test, arc/ARC-Challenge/test
                                                       question, choices{text,label}, answerKey  (allenai/ai2_arc)
    hellaswag  hellaswag/validation                    ctx_a, ctx_b, activity_label, endings, label  (Rowan/hellaswag)
    piqa       piqa/validation                         goal, sol1, sol2, label  (ybisk/piqa)
    mmlu_pro   mmlu_pro/test (or mmlu_pro/data/test)   question, options, answer_index, category  (TIGER-Lab/MMLU-Pro)
    bbh        bbh/<subtask> or bbh/<subtask>/test     input, target  (lukaemon/bbh: one file per subtask)

Every row the tasks read is checked before the first task generates or scores anything, and a bad one stops the run
naming its file, line and field: each text field a string with no lone surrogate (a BBH target not blank), each list
of choices a list of at least 2 strings (ARC's labels distinct), a label a whole number in ASCII digits that indexes a
choice, a GSM8K answer with one '#### <number>', and IFEval's kwargs the arguments each instruction takes, each of its
kind (verifiers.IFEVAL_ARGS). An MMLU-Pro answer letter that disagrees with answer_index is said; answer_index is
scored.

How each task is scored (SmolLM2's lighteval tasks, huggingface/smollm text/evaluation/tasks.py, run as its README
runs the instruct models: `lighteval ... --use_chat_template`):
- The prompt. Each task has a query and, few-shot, examples of (query, target). With the chat template (the
  default, --use_chat_template=true; every model this project trains is a chat model) the prompt is what
  lighteval's PromptManager.get_examples builds: each example a user turn (its query) and an assistant turn (its
  target), then the query as a user turn, rendered with the model's chat template (--template; chatml adds SmolLM2's
  default system turn) and the generation prompt. --use_chat_template=false gives lighteval's raw-text prompt, for
  a base model: query + target per example, then the query, joined by blank lines.
- Multiple choice by log-likelihood, 0-shot: the summed log-prob of each continuation after the prompt; acc takes
  the argmax of the sum, acc_norm of the sum divided by the choice's length in characters (its leading space not
  counted). As lighteval's tok_encode_pair, all trailing whitespace of the prompt (a chat prompt's final '\n')
  moves into the continuation, and the continuation's tokens are those that follow the prompt's own tokens in the
  encoding of the whole text. Queries | continuations, with the text as published:
      ARC, PIQA  "Question: {q}\nAnswer:" | " {choice}"  (ARC: the mean of Easy and Challenge)
      MMLU-Pro   "The following are multiple choice questions (with answers) about {category}.\n\n{q}\n"
                 "A. {option}\nB. ...\nAnswer:" | "A", "B", ...
      HellaSwag  smollm's, "{label}: {ctx_a} {Ctx_b} " | " {ending}", WikiHow brackets removed, nothing
                 stripped: without the chat template the trailing space moves into each continuation ("  {ending}")
- GSM8K, 5-shot, greedy, at most 256 new tokens: examples "Question: {q}\nAnswer:" | " {worked answer}", a fresh
  draw of 5 for each question as lighteval's random_sampling_from_train makes it (one Random(--seed), default
  lighteval's 42, shuffles the test rows' order and then draws for each row in that order; a --limit run keeps
  the full run's prompts). The pool is gsm8k/train; without that file, the first 5 test rows, which are then not
  scored (fewer than 6 test rows is an error); every pool row is checked as a scored row is. The headline is
  lighteval's quasi_exact_match_gsm8k ('qem'): the number after the first "#### " in the output, commas removed,
  must equal the reference's as text ("#### 72.00" or an answer without "####" scores 0);
  'last_number_acc' (verifiers.gsm8k: the last number, by value) is printed next to it, and the gap between the
  two counts answers the format check fails.
- IFEval, 0-shot: the prompt as a user turn in the chat template (with either --use_chat_template), greedy until
  the end of the turn, at most 1280 new tokens; verifiers' IFEval checks give prompt- and instruction-level
  accuracy, strict and loose; the headline is their mean.
- BBH, 3-shot, every row of each subtask scored: examples "Question: {input}\nAnswer: " | "{target}" from
  lighteval's balanced sampler as smollm's BBH tasks use it (few-shot split = evaluation split): a pool of 4 rows
  taken label by label in turn from Random(0), of which each scored row gets the first 3 that are not itself.
  Generation is greedy, up to 2048 tokens in all less the prompt (smollm sets no generation_size; its command sets
  max_model_length=2048); the score is exact match of the whole stripped output; the headline is the mean over
  subtasks.
- Stopping. Without the chat template GSM8K and BBH stop at smollm's stop sequences "Question:" and "Question" (or
  eos); with it, lighteval passes no stop sequences ("for chat models, generation stops with EOS token"), so they
  stop at the end of the assistant turn, or the cap.

Output: the table (task, metric, value, n) on stdout, and a JSON file (--out, default <model>/eval_results.json)
with every metric and, per example, its question (GSM8K, BBH) or prompt (IFEval) as the data gives it, or the
task's formatted query (the multiple-choice tasks; not the few-shot or chat rendering), the model's output or
choice, the reference and the score.
"""

import argparse
import glob
import itertools
import json
import os
import random
import re
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import verifiers
from data import (DataError, Tokenizer, check_vocab, lone_surrogate, make_demo_data, read_rows, render_chat,
                  render_chat_text, resolve_template, stop_token_ids)
from model import CheckpointError, Transformer, generate

DEMO_MODEL = "runs/sft_demo/final"
ALL_TASKS = ("gsm8k", "ifeval", "arc", "hellaswag", "piqa", "mmlu_pro", "bbh")
LIGHTEVAL_MAX_LENGTH = 2048  # max_model_length in smollm's lighteval command: bounds BBH's uncapped generations
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------------------------------------
# Loading

def load_model_and_tokenizer(path, device="cpu", dtype=torch.float32):
    """(Transformer in eval mode, Tokenizer) from an HF-layout folder written by save_pretrained."""
    if not os.path.exists(path):  # (what is there, but not a model, from_pretrained names)
        raise FileNotFoundError(f"no model at {path}: expected a folder with config.json, model weights and "
                                f"tokenizer.json (as written by save_pretrained)")
    problem = common.reward_model_problem(path)  # it would load, as the causal LM it is not
    if problem:
        raise FileNotFoundError(f"{path}: {problem}")
    model = Transformer.from_pretrained(path, dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(path)
    check_vocab(tok, model.config.vocab_size, path)
    return model.eval(), tok


def find_split(data_dir, rel):
    """Path (or hub-shard glob) of the split `rel` under data_dir, or None. A split there in two formats is refused,
    as the trainers' loader refuses it: which copy is the one meant would be a guess."""
    base = os.path.join(data_dir, rel)
    found = [c for c in (base + ".jsonl", base + ".json", base + ".parquet") if os.path.isfile(c)]
    shards = base + "-*.parquet"
    found += [shards] if glob.glob(shards) else []
    if len(found) > 1:
        raise DataError(base, f"the split is there in {len(found)} formats ({', '.join(found)}): keep one of them")
    return found[0] if found else None


def find_one_split(data_dir, rels):
    """find_split of the one of rels, the places a split may be, that is there; None if none is, and an error if
    more than one is."""
    found = [path for path in (find_split(data_dir, rel) for rel in rels) if path is not None]
    if len(found) > 1:
        raise DataError(data_dir, f"holds the same split twice ({', '.join(found)}): keep one of them")
    return found[0] if found else None


# The splits each task reads, under --data_dir (a tuple lists alternatives); BBH reads a folder of subtasks.
TASK_SPLITS = {"arc": [("arc/ARC-Easy/test",), ("arc/ARC-Challenge/test",)], "hellaswag": [("hellaswag/validation",)],
               "piqa": [("piqa/validation",)],
               "mmlu_pro": [("mmlu_pro/test", "mmlu_pro/data/test")],  # TIGER-Lab/MMLU-Pro's shards are under data/
               "gsm8k": [("gsm8k/test", "gsm8k/main/test")],  # openai/gsm8k keeps its shards under main/
               "ifeval": [("ifeval/train", "ifeval/input_data", "ifeval/ifeval_input_data")], "bbh": []}


def require_split(data_dir, *rels):
    path = find_one_split(data_dir, rels)
    if path is not None:
        return path
    expected = " or ".join(os.path.join(data_dir, rel) + ".jsonl|.json|.parquet|-*.parquet" for rel in rels)
    raise FileNotFoundError(f"missing evaluation data: expected {expected}")


def load_rows(path, limit=None):
    rows = list(itertools.islice(read_rows(path), limit))
    if not rows:  # would score 0 and, in ARC's mean of two subsets, halve the other's score
        raise DataError(path, "no rows")
    return rows


def gold_index(value, num_choices, where, name):
    """The gold answer as an index into the choices, refusing one that indexes none (PIQA's unlabelled test split
    has -1): it would silently score as a wrong answer."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):  # HellaSwag's labels are strings
        value = int(value)  # (ASCII digits only: str.isdigit takes "²", which int() refuses, and "٣", which it reads)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(where, f"{name} must be a whole number, got {value!r}")
    if not 0 <= value < num_choices:
        raise DataError(where, f"{name} {value} does not index its {num_choices} choices")
    return value


def field(row, key, where):
    if key not in row:
        raise DataError(where, f"missing field {key!r} (has {sorted(row)})")
    if row[key] is None:
        raise DataError(where, f"field {key!r} is null")
    return row[key]


def check_text(value, where, name):
    """value, refused unless it is a string the tokenizer can encode: a number or a list would go into the prompt as
    its repr, and a lone surrogate would fail in the tokenizer, far from its row."""
    if not isinstance(value, str):
        raise DataError(where, f"{name} must be a string, got {type(value).__name__} {value!r:.80}")
    at = lone_surrogate(value)
    if at is not None:
        raise DataError(where, f"{name} has a lone surrogate {value[at]!r} at character {at}, which no tokenizer "
                               f"encodes")
    return value


def text_field(row, key, where):
    return check_text(field(row, key, where), where, key)


def choice_list(value, where, name):
    """value, refused unless it is a list of at least 2 strings: a string or a dict in its place would be scored as
    its characters or keys, and a row with one choice scores correct whatever the model prefers."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(where, f"{name} must be a list of strings, got {value!r:.80}")
    if len(value) < 2:
        raise DataError(where, f"{name} has {len(value)} choice(s): a row needs at least 2, else it scores correct "
                               f"whatever the model prefers")
    for i, v in enumerate(value):
        check_text(v, where, f"{name}[{i}]")
    return list(value)


# ----------------------------------------------------------------------------------------------------------
# Log-likelihood of continuations

def encode_pair(tok, context, continuation):
    """Token ids of (context, continuation) as lighteval's tok_encode_pair makes them: the context's trailing
    whitespace moves into the continuation (BPE vocabularies merge a space or newline with the word after it;
    a chat context ends in '\n'), the context is encoded on its own and the continuation is what follows it in
    the encoding of the whole text."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
    if not ctx:  # the first continuation token needs something to be predicted from
        ctx = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after {context[-40:]!r}")
    return ctx, cont


@torch.no_grad()
def continuation_logprobs(model, requests, batch_size, pad_id=0, desc="loglikelihood"):
    """Summed log-prob of each continuation given its context. requests: list of (ctx_ids, cont_ids). Requests whose
    inputs are the same (the choices of a question that differ in their last token only: MMLU-Pro's letters, ten
    requests of one question) share one forward; batch_size counts forwards."""
    max_len = model.config.max_position_embeddings
    device = model.embed_tokens.weight.device
    seqs = [(ctx + cont)[-(max_len + 1):] for ctx, cont in requests]  # as lm-eval: the context loses its oldest
    n_conts = [min(len(cont), len(s) - 1) for (_, cont), s in zip(requests, seqs)]  # tokens, not the answer
    sharing = {}  # a forward's inputs -> the requests it serves
    for i, s in enumerate(seqs):
        sharing.setdefault(tuple(s[:-1]), []).append(i)
    forwards = list(sharing.items())
    out = [0.0] * len(requests)
    # longest first: the first batch shows an out-of-memory at once, and batches pad little
    forwards.sort(key=lambda f: -len(f[0]))
    for start in tqdm(range(0, len(forwards), batch_size), desc=desc, leave=False):
        batch = forwards[start:start + batch_size]
        inputs = torch.full((len(batch), max(len(ids) for ids, _ in batch)), pad_id, dtype=torch.long)
        for b, (ids, _) in enumerate(batch):
            inputs[b, :len(ids)] = torch.tensor(ids)
        hidden = model(inputs.to(device), return_hidden=True)
        # The head runs on the continuation positions only: [B, T, V] logits of a long few-shot batch take
        # gigabytes. A request's last n inputs predict its n continuation tokens.
        members = [(b, i) for b, (_, served) in enumerate(batch) for i in served]
        owner = torch.tensor([k for k, (_, i) in enumerate(members) for _ in range(n_conts[i])], dtype=torch.long)
        rows = torch.tensor([b for b, i in members for _ in range(n_conts[i])], dtype=torch.long, device=device)
        positions = torch.tensor([p for _, i in members for p in range(len(seqs[i]) - 1 - n_conts[i],
                                                                        len(seqs[i]) - 1)],
                                 dtype=torch.long, device=device)
        targets = torch.tensor([t for _, i in members for t in seqs[i][len(seqs[i]) - n_conts[i]:]], dtype=torch.long,
                               device=device)
        logprobs = F.log_softmax(model.logits(hidden[rows, positions]).float(), dim=-1)
        token_logprobs = logprobs.gather(1, targets[:, None]).squeeze(1).cpu()
        # summed on the CPU: a CUDA index_add_ adds in whatever order its atomics land, and a near tie between two
        # choices must not flip from run to run
        sums = torch.zeros(len(members)).index_add_(0, owner, token_logprobs)
        for (_, i), total in zip(members, sums.tolist()):
            out[i] = total
    return out


def score_multiple_choice(model, tok, docs, batch_size, desc, contexts=None):
    """docs: dicts with query, choices (continuation strings), gold; contexts: the prompt each doc is scored after
    (default: its query). Adds logprobs, pred, pred_norm, acc, acc_norm."""
    contexts = [doc["query"] for doc in docs] if contexts is None else contexts
    requests = [encode_pair(tok, context, choice) for doc, context in zip(docs, contexts) for choice in doc["choices"]]
    logprobs = continuation_logprobs(model, requests, batch_size, pad_id=tok.pad_id or 0, desc=desc)
    k = 0
    for doc in docs:
        lps = logprobs[k:k + len(doc["choices"])]
        k += len(doc["choices"])
        # acc_norm: per character, not counting the space that only separates the answer from the prompt
        chars = [max(1, len(c[1:] if c.startswith(" ") else c)) for c in doc["choices"]]
        normed = [lp / n for lp, n in zip(lps, chars)]
        doc["logprobs"] = lps
        doc["pred"] = max(range(len(lps)), key=lps.__getitem__)
        doc["pred_norm"] = max(range(len(normed)), key=normed.__getitem__)
        doc["acc"] = float(doc["pred"] == doc["gold"])
        doc["acc_norm"] = float(doc["pred_norm"] == doc["gold"])
    return docs


def mc_summary(docs):
    n = len(docs)
    return {"acc": sum(d["acc"] for d in docs) / max(n, 1), "acc_norm": sum(d["acc_norm"] for d in docs) / max(n, 1),
            "n": n}


# ----------------------------------------------------------------------------------------------------------
# Generation until a stop string

@torch.no_grad()
def generate_until(model, tok, prompts, max_new_tokens, stop_strings=(), stop_ids=(), batch_size=16,
                   chunk=64, desc="generate"):
    """Greedy continuations of token-id prompts, cut at the first stop string. Returns list of str.

    max_new_tokens: one cap for every prompt, or a list of one per prompt. Stop strings are text, not tokens, so
    generation runs in chunks and each row stops once its decoded text contains one; without stop strings a row
    runs to its cap or a stop token in one go."""
    max_len = model.config.max_position_embeddings
    caps = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    outputs = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[start:start + batch_size]
        new = {i: [] for i in idx}
        active = list(idx)
        while active:
            # the rows still going have generated equally many tokens; the smallest cap left bounds this call
            left = min(caps[i] - len(new[i]) for i in active)
            # past the context window the prompt slides out from the left, as lighteval truncates long prompts
            budget = min(chunk if stop_strings else left, left, max_len // 2)
            rows = [(prompts[i] + new[i])[-(max_len - budget):] for i in active]
            gen = generate(model, rows, max_new_tokens=budget, temperature=0.0, stop_token_ids=stop_ids,
                           pad_token_id=tok.pad_id or 0)
            still = []
            for i, toks, stopped in zip(active, gen.tokens, gen.stopped):
                new[i].extend(toks[:-1] if stopped else toks)
                text = tok.decode(new[i])
                cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
                outputs[i] = text
                if not stopped and cut < 0 and len(new[i]) < caps[i]:
                    still.append(i)
            active = still
    return outputs


# ----------------------------------------------------------------------------------------------------------
# Tasks. Each returns {"metric", "value", "n", "metrics": {...}, "examples": [...]}.

# The prompts are those of SmolLM2's lighteval tasks (huggingface/smollm, text/evaluation/tasks.py), character
# for character: the dataset's text goes in as published, never stripped or re-capitalised.

def qa_query(question):
    return f"Question: {question}\nAnswer:"


def few_shot_context(ctx, shots, query):
    """The prompt lighteval's PromptManager.get_examples builds from few-shot (query, target) pairs and the query.
    Chat mode: each example a user turn (its query) and an assistant turn (its target), then the query as a user
    turn, rendered with the chat template and the generation prompt. Raw text: query + target per example, then the
    query, joined by blank lines."""
    if not ctx.use_chat_template:
        return "\n\n".join([q + t for q, t in shots] + [query])
    messages = []
    for q, t in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": t}]
    messages.append({"role": "user", "content": query})
    return render_chat_text(ctx.tok, messages, ctx.template, add_generation_prompt=True)


def score_zero_shot(ctx, docs, desc):
    """score_multiple_choice after each doc's query as the task's 0-shot prompt (in the chat template or not)."""
    score_multiple_choice(ctx.model, ctx.tok, docs, ctx.batch_size, desc,
                          contexts=[few_shot_context(ctx, [], doc["query"]) for doc in docs])


def generation_stops(ctx, stop_strings):
    """(stop strings, stop token ids) for a generative task. lighteval passes a task's stop sequences only without
    the chat template; with it, generation ends at the end of the assistant turn (its models' greedy_until:
    "for chat models, generation stops with EOS token"), and not at generation_config.json's other eos ids, which
    the tokenizer's eos it passes to generate replaces."""
    if ctx.use_chat_template:
        return (), stop_token_ids(ctx.tok, ctx.template, generation_config=False)
    return stop_strings, [ctx.tok.eos_id]


def task_arc(ctx):
    subsets = {}
    for subset, rels in zip(("ARC-Easy", "ARC-Challenge"), TASK_SPLITS["arc"]):
        docs = subsets[subset] = []
        for where, row in load_rows(require_split(ctx.data_dir, *rels), ctx.limit):
            choices = field(row, "choices", where)
            if not isinstance(choices, dict):
                raise DataError(where, f"choices must be {{'text': [...], 'label': [...]}}, got {choices!r:.80}")
            labels = choice_list(field(choices, "label", where), where, "choices.label")
            texts = choice_list(field(choices, "text", where), where, "choices.text")
            if len(labels) != len(texts):
                raise DataError(where, f"{len(labels)} choice labels for {len(texts)} choice texts")
            if len(set(labels)) != len(labels):  # the answerKey would name whichever comes first
                raise DataError(where, f"choices.label {labels} holds a label twice")
            key = text_field(row, "answerKey", where).strip()
            if key not in labels:
                raise DataError(where, f"answerKey {key!r} is not one of the choice labels {labels}")
            docs.append({"id": row.get("id", where), "query": qa_query(text_field(row, "question", where)),
                         "choices": [" " + t for t in texts], "gold": labels.index(key)})
    yield  # rows checked
    metrics, examples = {}, []
    for subset, docs in subsets.items():
        score_zero_shot(ctx, docs, subset)
        metrics[subset] = mc_summary(docs)
        examples += [dict(d, subset=subset) for d in docs]
    value = sum(metrics[s]["acc_norm"] for s in metrics) / len(metrics)  # lighteval averages the two subsets
    return {"metric": "acc_norm", "value": value, "n": len(examples), "metrics": metrics, "examples": examples}


def hellaswag_preprocess(text):
    # smollm's (lm-eval's, with its strip() commented out); the brackets are WikiHow artifacts ("[header]",
    # "[step]") in the published text
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def task_hellaswag(ctx):
    docs = []
    for where, row in load_rows(require_split(ctx.data_dir, *TASK_SPLITS["hellaswag"][0]), ctx.limit):
        # str.capitalize also lowercases the rest ("John" -> "john"), as lm-eval and lighteval do; smollm's trailing
        # space is kept: raw-text scoring moves it into each continuation, a chat prompt keeps it in the user turn
        context = f"{text_field(row, 'ctx_a', where)} {text_field(row, 'ctx_b', where).capitalize()} "
        label = field(row, "label", where)
        if str(label).strip() == "":
            raise DataError(where, "empty label (the hub's hellaswag test split is unlabelled; use validation)")
        endings = choice_list(field(row, "endings", where), where, "endings")
        docs.append({"id": row.get("ind", where),
                     "query": hellaswag_preprocess(f"{text_field(row, 'activity_label', where)}: {context}"),
                     "choices": [" " + hellaswag_preprocess(e) for e in endings],
                     "gold": gold_index(label, len(endings), where, "label")})
    yield  # rows checked
    score_zero_shot(ctx, docs, "hellaswag")
    s = mc_summary(docs)
    return {"metric": "acc_norm", "value": s["acc_norm"], "n": s["n"], "metrics": s, "examples": docs}


def task_piqa(ctx):
    docs = []
    for where, row in load_rows(require_split(ctx.data_dir, *TASK_SPLITS["piqa"][0]), ctx.limit):
        docs.append({"id": where, "query": qa_query(text_field(row, "goal", where)),
                     "choices": [" " + text_field(row, k, where) for k in ("sol1", "sol2")],
                     "gold": gold_index(field(row, "label", where), 2, where, "label")})
    yield  # rows checked
    score_zero_shot(ctx, docs, "piqa")
    s = mc_summary(docs)
    return {"metric": "acc_norm", "value": s["acc_norm"], "n": s["n"], "metrics": s, "examples": docs}


def task_mmlu_pro(ctx):
    docs, disagree = [], []
    for where, row in load_rows(require_split(ctx.data_dir, *TASK_SPLITS["mmlu_pro"][0]), ctx.limit):
        options = choice_list(field(row, "options", where), where, "options")
        if len(options) > len(LETTERS):
            raise DataError(where, f"{len(options)} options: more than the {len(LETTERS)} letters")
        gold = gold_index(field(row, "answer_index", where), len(options), where, "answer_index")
        if row.get("answer") is not None and row["answer"] != LETTERS[gold]:
            disagree.append(f"{where}: answer {row['answer']!r}, answer_index {gold} ({LETTERS[gold]})")
        # lettered formulation: the options are listed under the question, the continuation is the bare letter
        topic = text_field(row, "category", where).replace("_", " ")
        listing = "".join(f"{LETTERS[j]}. {o}\n" for j, o in enumerate(options))
        docs.append({"id": row.get("question_id", where), "category": row.get("category"),
                     "query": f"The following are multiple choice questions (with answers) about {topic}.\n\n"
                              f"{text_field(row, 'question', where)}\n{listing}Answer:",
                     "choices": list(LETTERS[:len(options)]), "gold": gold})
    if disagree:  # said, not refused: the hub's file has been corrected by hand, and one stray row would stop the task
        print(f"mmlu_pro: {len(disagree)} row(s) whose answer letter disagrees with answer_index, which is what is "
              f"scored (first: {disagree[0]})")
    yield  # rows checked
    score_zero_shot(ctx, docs, "mmlu_pro")
    s = mc_summary(docs)
    return {"metric": "acc_norm", "value": s["acc_norm"], "n": s["n"], "metrics": s, "examples": docs}


def gsm8k_reference(answer, where):
    if "####" not in answer:
        raise DataError(where, "answer has no '#### <number>' line")
    if answer.count("####") > 1:  # the reference would be the last one's number, lighteval's qem the first one's
        raise DataError(where, f"answer has {answer.count('####')} '####' answer marks, a GSM8K answer has one: "
                               f"{answer[-60:]!r}")
    reference = answer.split("####")[-1].strip().replace(",", "")
    try:  # checked before any generation, not when the first score is taken
        verifiers.gsm8k("", reference)
    except ValueError as e:
        raise DataError(where, str(e)) from None
    if gsm8k_normalize(answer) == GSM8K_INVALID:
        raise DataError(where, f"answer has no '#### <digits>' for lighteval's gsm8k_normalizer: {answer[-40:]!r}")
    return reference


GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_INVALID = "[invalid]"


def gsm8k_normalize(text):
    """lighteval's gsm8k_normalizer (from openai/grade-school-math): the number after the first '#### ', commas
    removed, as text; '[invalid]' when there is none."""
    match = GSM8K_ANSWER.search(text)
    return match.group(1).replace(",", "") if match else GSM8K_INVALID


def gsm8k_qem(output, answer):
    """lighteval's quasi_exact_match_gsm8k: ExactMatches(strip_strings=True) with gsm8k_normalizer on both sides,
    so '#### 72.00' or a bare '72' does not match a reference of 72, and only the first '####' counts."""
    return float(gsm8k_normalize(output) == gsm8k_normalize(answer))  # a reference always has its '#### N'


def gsm8k_few_shots(test, pool, seed, k=5):
    """Per test row, the k examples lighteval's random_sampling_from_train gives it: one Random(seed) shuffles the
    test rows' order (create_requests_from_tasks) and then draws k from the pool for each row in that order; an
    example equal to the row itself is dropped. Drawn for every row, so a --limit run keeps the full run's prompts."""
    def content(row):  # lighteval compares its docs, which hold the question and the answer
        return row[1].get("question"), row[1].get("answer")
    rng = random.Random(seed)
    order = list(range(len(test)))
    rng.shuffle(order)
    shots = [None] * len(test)
    for i in order:
        shots[i] = [s for s in rng.sample(pool, min(k, len(pool))) if content(s) != content(test[i])][:k]
    return shots


GSM8K_POOL = ("gsm8k/train", "gsm8k/main/train")  # the few-shot examples' split, where it may be


def task_gsm8k(ctx):
    test_path = require_split(ctx.data_dir, *TASK_SPLITS["gsm8k"][0])
    test = load_rows(test_path)
    train_path = find_one_split(ctx.data_dir, GSM8K_POOL)
    if train_path is not None:
        pool = load_rows(train_path)
    else:  # documented fallback: the first five test rows are the pool and are not scored
        if len(test) <= 5:  # else every row is an example and qem 0 of none is reported
            raise DataError(test_path, f"gsm8k: {len(test)} test rows and no gsm8k/train file under {ctx.data_dir}: "
                                       f"the first 5 test rows are the few-shot examples, so no row is left to score "
                                       f"(add gsm8k/train, or at least 6 test rows)")
        pool, test = test[:5], test[5:]
        print(f"gsm8k: no gsm8k/train file under {ctx.data_dir}, so the few-shot examples are the first 5 test rows, "
              f"which are not scored")
    for where, row in pool:  # an example is shown to the model as its answer to copy: checked as a scored row is
        text_field(row, "question", where)
        gsm8k_reference(text_field(row, "answer", where), where)
    shots = gsm8k_few_shots(test, pool, ctx.seed)
    if ctx.limit is not None:
        test, shots = test[:ctx.limit], shots[:ctx.limit]
    prompts, refs = [], []
    for (where, row), row_shots in zip(test, shots):
        # lighteval's gsm8k prompt: the target is " {answer}", with its leading space
        examples = [(qa_query(s["question"]), " " + s["answer"]) for _, s in row_shots]  # (checked above)
        prompts.append(ctx.tok.encode(few_shot_context(ctx, examples, qa_query(text_field(row, "question", where)))))
        refs.append(gsm8k_reference(text_field(row, "answer", where), where))
    yield  # rows checked
    stop_strings, stop_ids = generation_stops(ctx, ("Question:", "Question"))  # smollm's gsm8k stop_sequence
    outputs = generate_until(ctx.model, ctx.tok, prompts, ctx.max_new_tokens or 256, stop_strings=stop_strings,
                             stop_ids=stop_ids, batch_size=ctx.batch_size, desc="gsm8k")
    examples = [{"id": where, "question": row["question"], "output": out, "reference": ref,
                 "score": gsm8k_qem(out, row["answer"]), "score_last_number": verifiers.gsm8k(out, ref)}
                for (where, row), out, ref in zip(test, outputs, refs)]
    metrics = {"qem": sum(e["score"] for e in examples) / len(examples),
               "last_number_acc": sum(e["score_last_number"] for e in examples) / len(examples),
               "n_shots": min(5, len(pool))}
    return {"metric": "qem", "value": metrics["qem"], "n": len(examples), "metrics": metrics, "examples": examples}


def task_ifeval(ctx):
    rows = load_rows(require_split(ctx.data_dir, *TASK_SPLITS["ifeval"][0]), ctx.limit)
    prompts = []
    for where, row in rows:
        text_field(row, "prompt", where)
        for key in ("instruction_id_list", "kwargs"):
            field(row, key, where)
        # An unknown instruction, or an argument missing, unknown or of the wrong kind, fails here, before any
        # generation. Checked on a non-empty response: an empty one follows nothing, so no check would even run.
        try:
            verifiers.ifeval_row(row, "x")
        except ValueError as e:
            raise DataError(where, str(e)) from None
        if not row["instruction_id_list"]:  # all() of no check: a prompt-level pass for any output
            raise DataError(where, "instruction_id_list is empty: no instruction to check the response against")
        messages = [{"role": "user", "content": row["prompt"]}]
        prompts.append(render_chat(ctx.tok, messages, template=ctx.template, add_generation_prompt=True)[0])
    yield  # rows checked
    outputs = generate_until(ctx.model, ctx.tok, prompts, ctx.max_new_tokens or 1280,
                             stop_ids=stop_token_ids(ctx.tok, ctx.template, generation_config=False),
                             batch_size=ctx.batch_size,
                             desc="ifeval")
    return score_ifeval([row for _, row in rows], outputs)


def score_ifeval(rows, outputs):
    """IFEval's four accuracies (prompt / instruction level, strict / loose) for responses to rows
    {key, prompt, instruction_id_list, kwargs}; the headline is their mean."""
    examples = [{"key": row.get("key"), "prompt": row["prompt"], "output": out,
                 "instruction_id_list": list(row["instruction_id_list"]), **verifiers.ifeval_row(row, out)}
                for row, out in zip(rows, outputs)]
    metrics = verifiers.ifeval_aggregate(examples)
    value = sum(metrics.values()) / len(metrics)
    return {"metric": "mean(prompt,inst x strict,loose)", "value": value, "n": len(examples), "metrics": metrics,
            "examples": examples}


def bbh_subtasks(data_dir):
    """{subtask: path} for bbh/<subtask>.{jsonl,json,parquet} and bbh/<subtask>/test[...]. Anything else under bbh/
    that may hold data is refused, not skipped: the score is the mean over the subtasks read, and one left out
    changes it unseen. (A hub snapshot's README.md, LICENSE or loading script is not data.)"""
    root = os.path.join(data_dir, "bbh")
    found, unread = {}, []
    for path in sorted(glob.glob(os.path.join(root, "*"))):
        name, ext = os.path.splitext(os.path.basename(path))
        if os.path.isfile(path) and ext in ("", ".md", ".txt", ".py"):
            continue
        if os.path.isdir(path):
            split = find_split(root, f"{name}/test")
        else:
            split = path if ext in (".jsonl", ".json", ".parquet") else None
        if split is None:
            unread.append(os.path.basename(path) + ("/ (no test split)" if os.path.isdir(path) else ""))
        elif name in found:
            raise DataError(root, f"holds subtask {name} twice ({found[name]}, {split}): keep one of them")
        else:
            found[name] = split
    if unread:
        raise DataError(root, f"holds {', '.join(unread)}, which no BBH subtask is read from (a subtask is "
                              f"<subtask>.jsonl|.json|.parquet or <subtask>/test.jsonl|.json|.parquet|-*.parquet): "
                              f"move or remove what is not a subtask")
    if not found:
        raise FileNotFoundError(f"missing evaluation data: expected one file per BBH subtask, "
                                f"{root}/<subtask>.jsonl|.json|.parquet or "
                                f"{root}/<subtask>/test.jsonl|.json|.parquet|-*.parquet")
    return found


def balanced_few_shots(rows, k, seed=0):
    """lighteval's FewShotSampler 'balanced' pool (the default, which smollm's BBH tasks use): k + 1 rows, drawn
    label by label in turn (labels with more rows first, ties in random order), each a random row of its label not
    drawn before, from Random(seed) (lighteval seeds 0 for a single few-shot round). One more than k so that a row
    can be scored with the others as its examples."""
    rng = random.Random(seed)
    by_label = {}
    for row in rows:
        by_label.setdefault(row[1]["target"], []).append(row)
    by_count = {}
    for label in sorted(by_label):
        by_count.setdefault(len(by_label[label]), []).append(label)
    labels = []
    for count in sorted(by_count, reverse=True):
        rng.shuffle(by_count[count])
        labels += by_count[count]
    pool, need = [], min(len(rows), k + 1)
    for label in itertools.cycle(labels):
        if need == 0:
            break
        if by_label[label]:
            pool.append(by_label[label].pop(rng.randrange(len(by_label[label]))))
            need -= 1
    return pool


def task_bbh(ctx):
    prompts, items = [], []
    for subtask, path in bbh_subtasks(ctx.data_dir).items():
        rows = load_rows(path)
        if len(rows) < 4:
            raise DataError(path, f"{len(rows)} rows; BBH needs at least 4, so that each row has 3 others as examples")
        for where, row in rows:
            text_field(row, "input", where)
            if not text_field(row, "target", where).strip():
                raise DataError(where, f"target {row['target']!r} is blank: no output can match it")
        # smollm's BBH: the few-shot split is the evaluation split, every row is scored, and a row in the pool is
        # never its own example (lighteval drops the doc under evaluation from its examples)
        pool = balanced_few_shots(rows, 3)
        for where, row in rows if ctx.limit is None else rows[:ctx.limit]:
            shots = [(f"Question: {r['input']}\nAnswer: ", r["target"]) for _, r in pool
                     if (r["input"], r["target"]) != (row["input"], row["target"])][:3]
            prompts.append(ctx.tok.encode(few_shot_context(ctx, shots, f"Question: {row['input']}\nAnswer: ")))
            items.append((subtask, where, row))
    yield  # rows checked
    stop_strings, stop_ids = generation_stops(ctx, ("Question:", "Question"))  # smollm's BBH stop_sequence
    # smollm sets no generation_size: lighteval then generates up to the context length (max_model_length=2048 in
    # smollm's command), less the prompt
    caps = [ctx.max_new_tokens or max(1, LIGHTEVAL_MAX_LENGTH - len(p)) for p in prompts]
    outputs = generate_until(ctx.model, ctx.tok, prompts, caps, stop_strings=stop_strings, stop_ids=stop_ids,
                             batch_size=ctx.batch_size, desc="bbh")
    examples, per_task = [], {}
    for (subtask, where, row), out in zip(items, outputs):
        # lighteval's exact_match: ExactMatches(strip_strings=True), the whole output
        score = float(bool(out) and out.strip() == row["target"].strip())
        examples.append({"subtask": subtask, "id": where, "input": row["input"], "output": out,
                         "target": row["target"], "score": score})
        per_task.setdefault(subtask, []).append(score)
    metrics = {k: sum(v) / len(v) for k, v in per_task.items()}
    value = sum(metrics.values()) / len(metrics)  # lighteval's group score: the mean over subtasks
    return {"metric": "em", "value": value, "n": len(examples), "metrics": metrics, "examples": examples}


# Each task is a generator: it reads and checks every row it scores, yields, then scores them and returns its result
# (see evaluate_tasks).
TASKS = {"gsm8k": task_gsm8k, "ifeval": task_ifeval, "arc": task_arc, "hellaswag": task_hellaswag,
         "piqa": task_piqa, "mmlu_pro": task_mmlu_pro, "bbh": task_bbh}


class EvalContext:
    def __init__(self, model, tok, data_dir, template="tulu", limit=None, batch_size=16, seed=42, max_new_tokens=None,
                 use_chat_template=True):
        self.model, self.tok, self.data_dir, self.template = model, tok, data_dir, template
        self.limit, self.batch_size, self.seed, self.max_new_tokens = limit, batch_size, seed, max_new_tokens
        self.use_chat_template = use_chat_template


def evaluate_tasks(model, tok, tasks, data_dir, template="tulu", limit=None, batch_size=16, seed=42,
                   max_new_tokens=None, use_chat_template=True):
    """Run the named benchmark tasks; returns {task: {"metric", "value", "n", "metrics", "examples"}}.
    use_chat_template: every task's prompt in the chat template (lighteval --use_chat_template, as SmolLM2's
    instruct models are scored); False: raw text, as for a base model (IFEval is a chat prompt either way)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    for task in tasks:  # every file is found before the first task runs: a missing one costs no finished task
        for rels in TASK_SPLITS[task]:
            require_split(data_dir, *rels)
        if task == "bbh":
            bbh_subtasks(data_dir)
        if task == "gsm8k":  # its optional few-shot pool, found twice
            find_one_split(data_dir, GSM8K_POOL)
    torch.manual_seed(seed)
    ctx = EvalContext(model, tok, data_dir, template, limit, batch_size, seed, max_new_tokens, use_chat_template)
    # every task checks its rows before the first one scores: a bad row of the last task costs no finished one
    runs = {task: TASKS[task](ctx) for task in tasks}
    for run in runs.values():
        next(run)
    return {task: finished(run) for task, run in runs.items()}


def finished(run):
    """The result a task's generator returns after its one yield."""
    try:
        next(run)
    except StopIteration as done:
        return done.value
    raise RuntimeError("an evaluation task yielded more than once")


# ----------------------------------------------------------------------------------------------------------
# The synthetic demo tasks (data.make_demo_data): what the CPU demo pipeline reports after each stage

@torch.no_grad()
def response_logprob(model, tok, messages, template, batch_size=16):
    """Mean log-prob per token of each conversation's final assistant turn. messages: list of message lists."""
    requests = []
    for conv in messages:
        ids, mask = render_chat(tok, conv, template=template)
        end = len(mask)
        while end > 0 and not mask[end - 1]:
            end -= 1
        begin = end
        while begin > 0 and mask[begin - 1]:
            begin -= 1
        if begin == end:
            raise ValueError(f"conversation has no trained assistant tokens: {conv[-1]!r}")
        requests.append((ids[:begin], ids[begin:end]))
    sums = continuation_logprobs(model, requests, batch_size, pad_id=tok.pad_id or 0, desc="preferences")
    return [s / len(cont) for s, (_, cont) in zip(sums, requests)]


def run_demo_eval(model, tok, data, template="tulu", limit=None, batch_size=16, max_new_tokens=128):
    """The demo metrics and the per-example outputs behind them."""
    rlvr = data["rlvr_heldout"]
    groups = {"arith": [r for r in rlvr if r["dataset"] == "gsm8k"][:limit],
              "constraint": [r for r in rlvr if r["dataset"] == "ifeval"][:limit]}
    summary, examples = {}, {}
    for name, rows in groups.items():
        prompts = [render_chat(tok, r["messages"], template=template, add_generation_prompt=True)[0] for r in rows]
        outputs = generate_until(model, tok, prompts, max_new_tokens,
                                 stop_ids=stop_token_ids(tok, template, generation_config=False),
                                 batch_size=batch_size, desc=name)
        scores = [verifiers.verify(r["dataset"], out, r["ground_truth"]) for r, out in zip(rows, outputs)]
        summary[f"{name}_acc"] = sum(scores) / max(len(scores), 1)
        summary[f"{name}_n"] = len(scores)
        examples[name] = [{"prompt": r["messages"][-1]["content"], "output": out, "ground_truth": r["ground_truth"],
                           "score": s} for r, out, s in zip(rows, outputs, scores)]
    pairs = data["pref_heldout"][:limit]
    chosen = response_logprob(model, tok, [p["chosen"] for p in pairs], template, batch_size)
    rejected = response_logprob(model, tok, [p["rejected"] for p in pairs], template, batch_size)
    wins = [float(c > r) for c, r in zip(chosen, rejected)]
    summary["pref_acc"] = sum(wins) / max(len(wins), 1)
    summary["pref_n"] = len(wins)
    examples["pref"] = [{"chosen_logp": c, "rejected_logp": r} for c, r in zip(chosen, rejected)]
    return summary, examples


def evaluate_demo(model, tok, data, template="", limit=None, batch_size=16, max_new_tokens=128):
    """{'arith_acc', 'arith_n', 'constraint_acc', 'constraint_n', 'pref_acc', 'pref_n'} on the held-out demo rows,
    rendered in `template` ('': the one the model was saved with, which is the one it was trained in).

    arith: greedy answers to the held-out RLVR gsm8k rows, checked by verifiers.gsm8k; constraint: greedy answers
    to the held-out ifeval rows, checked by verifiers.verify('ifeval', ...); pref: the fraction of held-out
    preference pairs whose chosen response has the higher mean per-token log-prob."""
    return run_demo_eval(model, tok, data, resolve_template(template, tok), limit, batch_size, max_new_tokens)[0]


def run_config_of(model_path):
    """-> (the config.json of the trainer run whose final model is model_path (RUN/final), its path), or ({}, None)
    where there is no run folder around the model (or not a trainer's config)."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}, None
    return (config, path) if isinstance(config, dict) else ({}, None)


def demo_seed_of(config, path):
    """(config, path) as run_config_of gives them -> (the demo_seed the model was trained on, the run config.json that
    records it), so that its held-out split is the one held out; (0, None), the trainers' default, when there is
    none."""
    seed = config.get("demo_seed")
    return (seed, path) if isinstance(seed, int) else (0, None)


# ----------------------------------------------------------------------------------------------------------
# CLI

def print_table(rows):
    """rows: (task, metric, value in [0, 1], n); values printed as percentages like the paper's table."""
    widths = [max(len(str(r[i])) for r in rows + [("task", "metric", "", "n")]) for i in (0, 1, 3)]
    print(f"| {'task':<{widths[0]}} | {'metric':<{widths[1]}} | {'value':>6} | {'n':>{widths[2]}} |")
    print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * 8}|{'-' * (widths[2] + 2)}|")
    for task, metric, value, n in rows:
        print(f"| {task:<{widths[0]}} | {metric:<{widths[1]}} | {100 * value:6.1f} | {n:>{widths[2]}} |")


def true_or_false(text):
    value = common.parse_bool(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, help="HF-layout folder written by save_pretrained")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(ALL_TASKS)} (default: all; "
                                                 "needs --data_dir)")
    p.add_argument("--data_dir", default=None, help="local benchmark copies (see the module docstring); "
                                                    "omitted: evaluate the synthetic demo tasks")
    p.add_argument("--limit", type=int, default=None,
                   help="score at most N examples per task (per subset for ARC, per subtask for BBH)")
    p.add_argument("--batch_size", type=int, default=16,
                   help="sequences per forward (log-likelihood tasks) and per generate call (generation tasks)")
    p.add_argument("--template", default=None, choices=["tulu", "chatml"],
                   help="chat template (default: the one the tokenizer was saved with, else tulu)")
    p.add_argument("--use_chat_template", type=true_or_false, nargs="?", const=True, default=True,
                   help="benchmark prompts in the chat template, as lighteval --use_chat_template scores SmolLM2's "
                        "instruct models (default true); false: raw-text prompts, for a base model")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="generation cap (default per task: gsm8k 256, ifeval 1280, bbh 2048 less the prompt, "
                        "demo 128)")
    p.add_argument("--out", default=None, help="JSON results file (default <model>/eval_results.json)")
    p.add_argument("--seed", type=int, default=42,
                   help="GSM8K's per-question few-shot draws (lighteval's sampler seed, 42) and torch's RNG")
    p.add_argument("--demo_seed", type=int, default=None,
                   help="data.make_demo_data seed (default: the trainer's demo_seed, from the config.json of the run "
                        "folder holding --model, else 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    args = p.parse_args(argv)
    for name in ("limit", "batch_size", "max_new_tokens"):  # 0 or less would score nothing and report it
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    tasks = [t.strip().lower() for t in (args.tasks or ",".join(ALL_TASKS)).split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        p.error(f"--tasks={args.tasks}: " + (f"unknown task(s) {', '.join(unknown)}" if unknown else "no task")
                + f"; choose from {','.join(TASKS)}")
    if args.tasks is not None and args.data_dir is None:  # else a real model would be scored on the toy task
        p.error("--tasks needs --data_dir, the benchmark files (without it eval.py scores the synthetic demo task)")
    trained_on, run_config = run_config_of(args.model)
    if args.data_dir is None and args.demo_seed is None and trained_on.get("data"):
        raise common.ConfigError(f"--model={args.model} was trained on --data={trained_on['data']} ({run_config}), "
                                 f"not on the synthetic demo task that eval.py scores without --data_dir: pass "
                                 f"--data_dir, the benchmark files (or --demo_seed=N for the demo task anyway)")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    demo = args.data_dir is None
    try:
        model, tok = load_model_and_tokenizer(args.model, args.device, dtype)
    except FileNotFoundError as e:
        hint = "\n(the demo model: train it first with `python train_sft.py`)" if args.model == DEMO_MODEL else ""
        sys.exit(f"error: {e}{hint}")
    out = args.out or os.path.join(args.model, "eval_results.json")
    out_dir = os.path.dirname(os.path.abspath(out))
    try:  # now, not after an evaluation that a bad --out would lose
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise common.ConfigError(f"--out={out}: cannot make its folder ({e.strerror}: {e.filename})") from None
    if os.path.isdir(out) or not os.access(out_dir, os.W_OK):
        raise common.ConfigError(f"--out={out}: " + ("a folder; --out names the results file" if os.path.isdir(out)
                                                     else f"{out_dir} is not writable"))
    template = resolve_template(args.template, tok)
    # a base model's folder, or one without tokenizer_config.json (raw-text prompts need no template but IFEval's)
    if not args.template and not tok.chat_template and (demo or args.use_chat_template):
        print(f"{args.model} has no saved chat template: prompts use tulu (--template chooses)")
    t0 = time.time()
    if demo:
        seed = args.demo_seed
        if seed is None:
            seed, run_config = demo_seed_of(trained_on, run_config)
            if run_config:
                print(f"demo split of demo_seed={seed}, as {run_config} records (--demo_seed chooses)")
            else:  # a model copied out of its run folder may have been trained on another seed's held-out rows
                print(f"demo split of demo_seed={seed}, the trainers' default: no config.json of a run folder "
                      f"holding {args.model} records the demo_seed it was trained on (--demo_seed=N sets it)")
        summary, examples = run_demo_eval(model, tok, make_demo_data(seed), template, args.limit,
                                          args.batch_size, args.max_new_tokens or 128)
        rows = [(k, "acc", summary[f"{k}_acc"], summary[f"{k}_n"]) for k in ("arith", "constraint", "pref")]
        results = {"mode": "demo", "demo_seed": seed, "summary": summary, "examples": examples}
    else:
        per_task = evaluate_tasks(model, tok, tasks, args.data_dir, template, args.limit, args.batch_size,
                                  args.seed, args.max_new_tokens, args.use_chat_template)
        rows = []
        for t, r in per_task.items():
            rows.append((t, r["metric"], r["value"], r["n"]))
            if t == "ifeval":  # the paper does not say which of the four it reports
                rows += [(t, k, v, r["n"]) for k, v in r["metrics"].items()]
            if t == "gsm8k":  # the last number by value: its gap to qem counts answers without '#### N'
                rows.append((t, "last_number_acc", r["metrics"]["last_number_acc"], r["n"]))
        results = {"mode": "benchmarks", "data_dir": args.data_dir, "use_chat_template": args.use_chat_template,
                   "summary": {t: {k: r[k] for k in ("metric", "value", "n", "metrics")} for t, r in per_task.items()},
                   "examples": {t: r["examples"] for t, r in per_task.items()}}
        if "ifeval" in tasks:
            results["ifeval_backends"] = verifiers.BACKENDS
            print(f"IFEval backends: {results['ifeval_backends']}")
    results.update(model=args.model, template=template, seed=args.seed, limit=args.limit,
                   seconds=round(time.time() - t0, 1))
    print_table(rows)
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    common.run_script(main, DataError, CheckpointError, FileNotFoundError)
