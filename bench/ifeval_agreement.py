"""
Agreement of verifiers.py's IFEval checks with lm-evaluation-harness's (lm_eval.tasks.ifeval,
the vendored copy of Google's reference), on real IFEval prompts and synthetic responses.

For every prompt of --data (google/IFEval's input_data.jsonl; by default the project's copy,
../shared/data/ifeval_input_data.jsonl next to the repository; or --limit of them) it builds
several responses: one that tries to follow every instruction, the same with a chatty first
line, with a trailing line, with a bold header, upper-cased, without its global transforms,
with one instruction's part dropped, a generic English paragraph, and an empty response.
Both checkers score each, strict and loose, and the script prints the fraction of
instruction-level and prompt-level verdicts that agree, per instruction type too.

Run (a separate environment keeps lm-eval's dependencies out of the project's):
    python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install lm-eval nltk langdetect immutabledict
    /tmp/lmeval/bin/python bench/ifeval_agreement.py [--data PATH] [--limit N] [--builtin]
lm-eval's number_sentences and capital_word_frequency need nltk's punkt data; where it is
present (python -m nltk.downloader punkt punkt_tab, which needs network) every instruction
type is compared. Without it number_sentences is left out (the script says so; prompts are
compared on their remaining instructions), and capital_word_frequency's reference tokenizes
each response as one sentence, which counts the same capital words (checked on every
response). It also compares verifiers.py's built-in word tokenizer with nltk's Treebank
tokenizer token for token. --builtin makes verifiers.py use its built-in language detector
instead of langdetect, to measure that approximation.
keywords:letter_frequency rows whose letter is not a-z are skipped: the reference replaces
such a letter with a random one.
"""

import argparse
import collections
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import verifiers  # noqa: E402

SAMPLE_TEXT = {  # a sentence or two per language, for response_language
    "en": "The weather is pleasant today and the park is full of people.",
    "de": "Das Wetter ist heute sehr schön und der Park ist voller Menschen.",
    "pt": "O tempo está muito bom hoje e o parque está cheio de pessoas.",
    "it": "Il tempo è molto bello oggi e il parco è pieno di persone.",
    "fi": "Sää on tänään todella kaunis ja puisto on täynnä ihmisiä.",
    "sw": "Hali ya hewa ni nzuri sana leo na bustani imejaa watu wengi.",
    "vi": "Thời tiết hôm nay rất đẹp và công viên có rất nhiều người.",
    "ru": "Сегодня очень хорошая погода, и в парке много людей.",
    "bg": "Днес времето е много хубаво и паркът е пълен с хора.",
    "hi": "आज मौसम बहुत अच्छा है और पार्क में बहुत सारे लोग हैं।",
    "ko": "오늘은 날씨가 정말 좋고 공원에는 사람들이 많습니다.",
    "ar": "الطقس جميل جدا اليوم والحديقة مليئة بالناس.",
    "fa": "امروز هوا بسیار خوب است و پارک پر از مردم است.",
    "th": "วันนี้อากาศดีมากและสวนสาธารณะเต็มไปด้วยผู้คน",
    "ta": "இன்று வானிலை மிகவும் நன்றாக உள்ளது மற்றும் பூங்காவில் நிறைய மக்கள் உள்ளனர்.",
}
FILLER = ("This is a simple answer, written in plain English. It covers the main points "
          "and keeps things short. Thanks for reading, and have a good day.")


def fragment(inst, kw, rng):
    """Text that tries to satisfy one instruction, or None for global instructions."""
    kw = {k: v for k, v in kw.items() if v}
    rel = kw.get("relation") or kw.get("let_relation") or kw.get("capital_relation")
    if inst == "keywords:existence":
        return "We talk about " + " and ".join(kw["keywords"]) + " here."
    if inst == "keywords:frequency":
        n = kw["frequency"] + 1 if rel == "at least" else max(kw["frequency"] - 1, 0)
        return " ".join([kw["keyword"]] * n)
    if inst == "keywords:forbidden_words":
        return "Nothing forbidden here." if rng.random() < 0.7 else kw["forbidden_words"][0] + " appears."
    if inst == "keywords:letter_frequency":
        n = kw["let_frequency"] + 1 if rel == "at least" else 0
        return kw["letter"] * n
    if inst == "language:response_language":
        return SAMPLE_TEXT.get(kw["language"], SAMPLE_TEXT["en"])
    if inst == "length_constraints:number_sentences":
        n = kw["num_sentences"] + 1 if rel == "at least" else max(kw["num_sentences"] - 1, 1)
        return " ".join(f"Sentence number {i} is here." for i in range(n))
    if inst == "length_constraints:number_paragraphs":
        return "\n***\n".join(f"Paragraph {i} text." for i in range(kw["num_paragraphs"]))
    if inst == "length_constraints:number_words":
        n = kw["num_words"] + 5 if rel == "at least" else max(kw["num_words"] - 5, 1)
        return " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(n))
    if inst == "length_constraints:nth_paragraph_first_word":
        paras = [f"Paragraph {i} body." for i in range(kw["num_paragraphs"])]
        paras[kw["nth_paragraph"] - 1] = kw["first_word"].capitalize() + ", this one starts right."
        return "\n\n".join(paras)
    if inst == "detectable_content:number_placeholders":
        return " ".join(f"[field{i}]" for i in range(kw["num_placeholders"]))
    if inst == "detectable_content:postscript":
        return None
    if inst == "detectable_format:number_bullet_lists":
        return "\n".join(f"* point {i}" for i in range(kw["num_bullets"]))
    if inst == "detectable_format:constrained_response":
        return "My answer is yes."
    if inst == "detectable_format:number_highlighted_sections":
        return " ".join(f"*highlight {i}*" for i in range(kw["num_highlights"]))
    if inst == "detectable_format:multiple_sections":
        return "\n".join(f"{kw['section_spliter']} {i + 1}\ncontent {i}" for i in range(kw["num_sections"]))
    if inst == "detectable_format:title":
        return "<<A Fitting Title>>"
    if inst == "combination:two_responses":
        return "First take on it.\n******\nSecond, different take."
    return None


def respond(row, rng, globals_on=True, drop=None):
    insts, kws = row["instruction_id_list"], row["kwargs"]
    parts = [fragment(i, k, rng) for j, (i, k) in enumerate(zip(insts, kws)) if j != drop]
    text = "\n\n".join(p for p in parts if p) or FILLER
    if not globals_on:
        return text
    for j, (inst, kw) in enumerate(zip(insts, kws)):
        if j == drop:
            continue
        if inst == "detectable_content:postscript":
            text += f"\n\n{kw['postscript_marker']} one more thing."
        elif inst == "detectable_format:json_format":
            text = "```json\n" + json.dumps({"answer": text}) + "\n```"
        elif inst == "punctuation:no_comma":
            text = text.replace(",", "")
        elif inst == "change_case:english_lowercase":
            text = text.lower()
        elif inst == "change_case:english_capital":
            text = text.upper()
        elif inst == "change_case:capital_word_frequency":
            n = kw["capital_frequency"] + 2 if kw["capital_relation"] == "at least" else 0
            text += "\n" + " ".join(["IMPORTANT"] * n)
    for inst, kw in zip(insts, kws):
        if inst == "startend:end_checker":
            text += " " + kw["end_phrase"]
        if inst == "startend:quotation":
            text = '"' + text + '"'
        if inst == "combination:repeat_prompt":
            text = kw["prompt_to_repeat"] + "\n" + text
    return text


def responses(row, rng):
    full = respond(row, rng)
    out = [full, "Sure! Here is my answer:\n" + full, full + "\nLet me know if you need more.",
           "**Answer**\n" + full, full.upper(), respond(row, rng, globals_on=False), FILLER, ""]
    out.append(respond(row, rng, drop=rng.randrange(len(row["instruction_id_list"]))))
    return out


def compare_word_tokenizers(rows, n_random=100_000):
    """verifiers' built-in word tokenizer (used without nltk's punkt) against nltk's Treebank tokenizer, token for
    token: on every prompt as written, upper-cased, title-cased and case-swapped, and on random strings built from
    the characters and words its rules treat specially."""
    from nltk.tokenize import NLTKWordTokenizer

    treebank, punkt = NLTKWordTokenizer(), verifiers._punkt
    verifiers._punkt = None
    texts = [f(r["prompt"]) for r in rows for f in (str, str.upper, str.title, str.swapcase)]
    rng = random.Random(1)
    pieces = list("ABZab \u00e9\u00c9 '\u2019\u2018\u201c\u201d\u00ab\u00bb\u201e\"`.,:;!?-/&@#$%*()[]{}<>\n\t0123456789"
                  "\u2014\u2013_+=|~^") + ["n't", "N'T", "cannot", "CANNOT", "'s", "'S", "'LL", "'ll", "'re", "'VE",
                                       "'d", "'M", "'tis", "'TWAS", " wanna ", "gonna", "GOTTA", "lemme", "gimme",
                                       "more'n", "d'ye", "...", "--", "``", "''", "  ", "WORD", "word", "3,000", "10:30"]
    randoms = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(n_random)]
    for name, group in (("prompt texts", texts), ("random strings", randoms)):
        same = sum(verifiers.word_tokenize(t) == treebank.tokenize(t) for t in group)
        print(f"word tokens, verifiers built-in vs nltk Treebank: identical on {same}/{len(group)} {name}")
    verifiers._punkt = punkt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                   "ifeval_input_data.jsonl"))
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--builtin", action="store_true", help="verifiers.py uses its built-in language detector")
    args = ap.parse_args()

    import langdetect
    langdetect.DetectorFactory.seed = 0
    import nltk
    from lm_eval.tasks.ifeval import utils as ref
    from lm_eval.tasks.ifeval.instructions_util import split_into_sentences

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        nltk.data.find("tokenizers/punkt/english.pickle")
        skip, whole_text_words = set(), False
    except LookupError:
        # capital_word_frequency counts the tokens of nltk.word_tokenize (punkt sentences, then Treebank words) that
        # are str.isupper(). Treebank treats only a string's final period specially and isupper ignores
        # punctuation, so the count cannot depend on where punkt splits: the reference tokenizes the whole text
        # as one sentence (checked below on every response against a split by the reference's regex splitter).
        # number_sentences is punkt itself and stays out.
        nltk.tokenize.sent_tokenize = lambda text, language="english": [text]
        skip, whole_text_words = {"length_constraints:number_sentences"}, True
    if args.builtin:
        verifiers.langdetect = None
        verifiers.BACKENDS["language"] = "builtin (forced by --builtin)"
    print("verifiers backends:", verifiers.BACKENDS)
    print("left out (reference needs nltk punkt, not installed):", sorted(skip) or "nothing")
    if whole_text_words:
        print("capital_word_frequency: reference words from the whole text as one sentence (no punkt)")

    rows = [json.loads(line) for line in open(args.data)]
    rows = rows[:args.limit] if args.limit else rows
    rng = random.Random(0)
    agree = collections.Counter()
    total = collections.Counter()
    per_type = collections.defaultdict(collections.Counter)
    disagreements = []
    for row in rows:
        keep = [j for j, (i, k) in enumerate(zip(row["instruction_id_list"], row["kwargs"]))
                if i not in skip and not (i == "keywords:letter_frequency" and not ("a" <= k["letter"].lower() <= "z"))]
        if not keep:
            continue
        sub = {"key": row["key"], "prompt": row["prompt"],
               "instruction_id_list": [row["instruction_id_list"][j] for j in keep],
               "kwargs": [row["kwargs"][j] for j in keep]}
        inp = ref.InputExample(**sub)
        for resp in responses(row, rng):
            if whole_text_words:
                split_words = [w for s in split_into_sentences(resp) for w in nltk.word_tokenize(s)]
                capitals = [sum(w.isupper() for w in words) for words in (nltk.word_tokenize(resp), split_words)]
                total["capitals_split"] += 1
                agree["capitals_split"] += capitals[0] == capitals[1]
            mine = verifiers.ifeval_row(sub, resp)
            for mode, fn in (("strict", ref.test_instruction_following_strict),
                             ("loose", ref.test_instruction_following_loose)):
                theirs = fn(inp, resp)
                for inst, a, b in zip(sub["instruction_id_list"], mine[f"inst_level_{mode}"],
                                      theirs.follow_instruction_list):
                    total[f"inst_{mode}"] += 1
                    agree[f"inst_{mode}"] += a == b
                    per_type[inst][f"{mode}_n"] += 1
                    per_type[inst][f"{mode}_agree"] += a == b
                    per_type[inst][f"{mode}_pass"] += b
                    if a != b and len(disagreements) < 10:
                        disagreements.append((mode, inst, row["key"], a, b, resp[:200]))
                total[f"prompt_{mode}"] += 1
                agree[f"prompt_{mode}"] += mine[f"prompt_level_{mode}"] == theirs.follow_all_instructions

    print(f"prompts {len(rows)}, responses per prompt {len(responses(rows[0], random.Random(0)))}")
    compare_word_tokenizers(rows)
    for key in ("inst_strict", "inst_loose", "prompt_strict", "prompt_loose"):
        print(f"{key:14s} agreement {agree[key]}/{total[key]} = {agree[key] / total[key]:.4f}")
    if whole_text_words:
        print(f"capital words, whole text vs split into sentences: same count on {agree['capitals_split']}/"
              f"{total['capitals_split']} responses")
    print("\nper instruction type: verdicts compared, reference pass rate, strict / loose agreement")
    for inst in sorted(per_type):
        c = per_type[inst]
        print(f"  {inst:48s} n={c['strict_n']:5d} pass={c['strict_pass'] / c['strict_n']:.2f} "
              f"strict={c['strict_agree'] / c['strict_n']:.4f} loose={c['loose_agree'] / c['loose_n']:.4f}")
    for d in disagreements:
        print("DISAGREE", d)


if __name__ == "__main__":
    main()
