"""scripts/decontaminate.py: exact contamination counts on fixtures with planted overlaps, and the hashed n-gram
matching against a plain set-of-tuples implementation."""
import io
import json
import os
import random
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import decontaminate as dc  # noqa: E402
from data import DataError  # noqa: E402

FIX = os.path.join("tests", "fixtures", "decontam")
TRAIN = os.path.join(FIX, "train")
EVAL_ARGS = [f"{name}={os.path.join(FIX, 'eval', name + '.jsonl')}" for name in
             ("gsm8k", "ifeval", "arc", "bbh_boolean_expressions", "piqa", "hellaswag", "mmlu_pro", "trivia")]


def where(file, line):
    return f"{os.path.join(TRAIN, file)} line {line}"


# What was planted in the fixtures (see the comments in tests/fixtures/decontam/train/*.jsonl):
# gsm8k[0] <- sft-0 (10 words), gsm8k[2] <- rlvr row 1, gsm8k[3] <- sft-5 (across '-' and ';'),
# ifeval[0] <- sft-2 (case and punctuation changed), arc[1] <- a choice quoted in pref row 1's rejected answer,
# trivia[0] <- pref row 3's prompt (read through --eval_field=query). gsm8k[1] shares only 7 words with sft-1,
# and gsm8k[2] shares 8 words with sft-4 only across a message boundary.
EXPECTED_N8 = {
    "gsm8k": (4, [0, 2, 3]), "ifeval": (3, [0]), "arc": (2, [1]), "bbh_boolean_expressions": (2, []),
    "piqa": (1, []), "hellaswag": (1, []), "mmlu_pro": (1, []), "trivia": (1, [0]),
}
REMOVED_N8 = [where("pref.jsonl", 1), where("pref.jsonl", 3), where("rlvr.jsonl", 1),
              where("sft.jsonl", 1), where("sft.jsonl", 3), where("sft.jsonl", 6)]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def all_train_rows():
    return {w: row for w, row in dc.read_rows(TRAIN)}


def run_cli(tmp_path, n, roles="all"):
    out, rep = tmp_path / "clean.jsonl", tmp_path / "report.json"
    dc.main([f"--train={TRAIN}", "--eval", *EVAL_ARGS, "--eval_field=query", f"--n={n}", f"--roles={roles}",
             f"--out_clean={out}", f"--report={rep}", "--no_progress", "--batch_size=3"])
    return read_jsonl(out), json.loads(rep.read_text())


def test_cli_exact_shares_and_removed_rows_n8(tmp_path):
    clean, report = run_cli(tmp_path, n=8)
    got = {name: (r["examples"], r["contaminated_indices"]) for name, r in report["eval"].items()}
    assert got == EXPECTED_N8
    assert report["eval"]["gsm8k"]["share"] == 0.75
    assert report["eval"]["ifeval"]["share"] == pytest.approx(1 / 3)
    assert report["eval"]["arc"]["share"] == 0.5
    assert report["eval"]["bbh_boolean_expressions"]["too_short"] == 1  # "not not not true is": 5 words
    assert report["train_rows"] == 11 and report["train_rows_contaminated"] == 6
    assert report["contaminated_train_rows"] == REMOVED_N8
    rows = all_train_rows()
    assert clean == [row for w, row in rows.items() if w not in REMOVED_N8]  # kept rows, unchanged, in order


def test_by_default_only_user_turns_are_read(tmp_path):
    """open-instruct's decontamination indexes the prompts only: arc[1], quoted in pref row 1's rejected answer,
    is no longer a match, and that row stays in the clean data."""
    clean, report = run_cli(tmp_path, n=8, roles="user")
    got = {name: r["contaminated_indices"] for name, r in report["eval"].items()}
    assert got == {name: idx for name, (_, idx) in EXPECTED_N8.items()} | {"arc": []}
    assert report["roles"] == ["user"]
    assert report["contaminated_train_rows"] == [w for w in REMOVED_N8 if w != where("pref.jsonl", 1)]
    assert len(clean) == 11 - 5


def test_roles_select_the_turns_of_a_messages_row():
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}]}
    assert dc.train_texts(row, "row") == ["u"]
    assert dc.train_texts(row, "row", roles=("assistant", "system")) == ["s", "a"]
    assert dc.train_texts(row, "row", roles=None) == ["s", "u", "a"]


@pytest.mark.parametrize("roles", ["usr", "User", "user,assistnt"])
def test_an_unknown_role_is_refused_not_read_as_no_text(roles, tmp_path, capsys):
    """A misspelt role would read no turn at all and report every row clean."""
    with pytest.raises(SystemExit):
        run_cli(tmp_path, n=8, roles=roles)
    assert "--roles: unknown" in capsys.readouterr().err and not (tmp_path / "clean.jsonl").exists()


@pytest.mark.parametrize("message", [{"role": "User", "content": "q"}, {"role": "human", "content": "q"},
                                     {"content": "q"}])
def test_a_training_turn_of_no_known_role_is_refused_not_skipped(message):
    """Such a turn would go unread whatever --roles says, and a row copying a benchmark question be called clean."""
    with pytest.raises(dc.DecontaminationError, match=r"row: 'messages'\[1\] has role .*not one of system, user"):
        dc.train_texts({"messages": [{"role": "system", "content": "s"}, message]}, "row")


def test_a_lone_surrogate_in_a_training_row_is_refused_naming_it(tmp_path):
    """The clean copy could not be written with it (and the trainers refuse the row)."""
    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "a \\ud800 b"}]}\n')
    for out_clean in (None, io.StringIO()):
        with pytest.raises(dc.DecontaminationError, match=r"train\.jsonl line 1: 'messages'\[0\] has an unpaired "
                                                          r"surrogate at character 2"):
            dc.decontaminate(dc.read_rows(str(train)), {"x": [["a b c"]]}, out_clean=out_clean, progress=False)
    with pytest.raises(dc.DecontaminationError, match=r"row: 'chosen' has an unpaired surrogate"):
        dc.train_texts({"prompt": "p", "chosen": "\ud800", "rejected": "r"}, "row")


def test_unicode_is_normalised_and_empty_eval_examples_are_errors(tmp_path):
    assert dc.normalise("Cafe\u0301 ＦＵＬＬ") == dc.normalise("Café full") == ["café", "full"]
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text(json.dumps({"question": "A question with enough words to count here."}) + "\n" +
                   json.dumps({"question": None}) + "\n")
    with pytest.raises(dc.DecontaminationError, match=r"gsm8k\.jsonl line 2: eval set 'gsm8k' row has no text"):
        dc.load_eval_set("gsm8k", str(bad))


def test_n_is_configurable_near_miss_counts_at_n7(tmp_path):
    clean, report = run_cli(tmp_path, n=7)
    assert report["eval"]["gsm8k"]["contaminated_indices"] == [0, 1, 2, 3]  # sft-1's 7 shared words now count
    assert report["eval"]["gsm8k"]["share"] == 1.0
    assert report["contaminated_train_rows"] == sorted(REMOVED_N8 + [where("sft.jsonl", 2)])
    assert len(clean) == 11 - 7


def test_ngrams_do_not_span_messages():
    evals = {"gsm8k": [dc.load_eval_set("gsm8k", os.path.join(FIX, "eval", "gsm8k.jsonl"))[2]]}
    split = {"messages": [{"role": "user", "content": "Tell me a story where Betty is saving money"},
                          {"role": "assistant", "content": "for a new wallet which costs a lot, she said."}]}
    joined = {"messages": [{"role": "user", "content": "Tell me a story where Betty is saving money "
                                                       "for a new wallet which costs a lot, she said."}]}
    report = dc.decontaminate([("split", split), ("joined", joined)], evals, n=8, progress=False, roles=None)
    assert report["contaminated_train_rows"] == ["joined"]
    assert dc.decontaminate([("split", split)], evals, n=6, progress=False,
                            roles=None)["contaminated_train_rows"] == ["split"]


def test_normalise_lowercases_and_strips_punctuation():
    assert dc.normalise("DO NOT use ANY commas -- and Highlight, at least 3 sections!!") == \
        "do not use any commas and highlight at least 3 sections".split()
    assert dc.normalise("A 3-page letter; snake_case \"quoted\"\n\tÉté.") == ["a", "3page", "letter", "snakecase", "quoted", "été"]


def reference(train_docs, eval_docs, n):
    """Plain Python: n-grams as tuples of normalised words, per segment."""
    def grams(doc):
        out = set()
        for seg in doc:
            w = dc.normalise(seg)
            out.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
        return out
    eval_grams = [grams(d) for d in eval_docs]
    all_eval = set().union(*eval_grams)
    train_grams = [grams(d) for d in train_docs]
    all_train = set().union(*train_grams)
    return [bool(g & all_eval) for g in train_grams], [bool(g & all_train) for g in eval_grams]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_hashed_matching_equals_set_of_tuples(n):
    rng = random.Random(n)
    words = [f"w{i}" for i in range(12)] + ["The", "cat,", "SAT!", "on-the", "mat."]

    def doc(extra_words=()):
        pool = words + list(extra_words)
        return [" ".join(rng.choice(pool) for _ in range(rng.randint(0, 14))) for _ in range(rng.randint(1, 3))]

    eval_docs = [doc() for _ in range(60)]
    train_docs = [doc(extra_words=["oov1", "oov2", "oov3"]) for _ in range(300)]  # words unseen in the eval sets
    index = dc.EvalIndex({"a": eval_docs[:25], "b": eval_docs[25:]}, n=n)
    train_hit = np.concatenate([index.scan(train_docs[i:i + 64]) for i in range(0, len(train_docs), 64)])
    rep = index.report()
    eval_hit = [False] * len(eval_docs)
    for i in rep["a"]["contaminated_indices"]:
        eval_hit[i] = True
    for i in rep["b"]["contaminated_indices"]:
        eval_hit[25 + i] = True
    want_train, want_eval = reference(train_docs, eval_docs, n)
    assert 0 < sum(want_train) < len(train_docs) and 0 < sum(want_eval) < len(eval_docs)  # both outcomes exercised
    assert train_hit.tolist() == want_train
    assert eval_hit == want_eval


def test_too_short_counts_each_eval_sets_own_examples_without_an_ngram():
    # n=3: "a" has one example under 3 words; "b" two, one of them 4 words split over two fields (no n-gram spans
    # fields)
    index = dc.EvalIndex({"a": [["one two three"], ["four"], ["five six seven eight"]],
                          "b": [["nine ten"], ["eleven twelve", "thirteen fourteen"], ["a b c"]]}, n=3)
    report = index.report()
    assert (report["a"]["too_short"], report["b"]["too_short"]) == (1, 2)


def test_distinct_ngrams_get_distinct_hashes():
    # 40^3 = 64,000 distinct trigrams over a 40-word vocabulary: no two may share a 64-bit hash
    vocab = [f"v{i}" for i in range(40)]
    grams = [[f"{a} {b} {c}"] for a in vocab for b in vocab for c in vocab]
    index = dc.EvalIndex({"all": grams}, n=3)
    assert len(index.hashes) == len(grams)


def test_bad_input_names_where(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(dc.DecontaminationError, match=r"bad\.jsonl line 2: row has neither 'messages'"):
        dc.decontaminate(dc.read_rows(str(bad)), {"x": [["a b c"]]}, progress=False)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": None}]}) + "\n")
    with pytest.raises(dc.DecontaminationError, match=r"bad\.jsonl line 1: 'messages'\[0\]"):
        dc.decontaminate(dc.read_rows(str(bad)), {"x": [["a b c"]]}, progress=False)
    bad.write_text(json.dumps({"messages": []}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: invalid JSON"):
        dc.decontaminate(dc.read_rows(str(bad)), {"x": [["a b c"]]}, progress=False)
    with pytest.raises(dc.DecontaminationError, match="eval set 'squad': unknown task"):
        dc.load_eval_set("squad", os.path.join(FIX, "eval", "trivia.jsonl"))
    with pytest.raises(dc.DecontaminationError, match=r"gsm8k\.jsonl line 1: eval set 'ifeval' row lacks field\(s\) \['prompt'\]"):
        dc.load_eval_set("ifeval", os.path.join(FIX, "eval", "gsm8k.jsonl"))


def test_parquet_training_shards_give_the_same_rows_removed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = read_jsonl(os.path.join(TRAIN, "sft.jsonl"))
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "part-1.parquet")
    evals = {"gsm8k": dc.load_eval_set("gsm8k", os.path.join(FIX, "eval", "gsm8k.jsonl")),
             "ifeval": dc.load_eval_set("ifeval", os.path.join(FIX, "eval", "ifeval.jsonl"))}
    report = dc.decontaminate(dc.read_rows(str(tmp_path / "*.parquet")), evals, progress=False)
    assert report["contaminated_train_rows"] == [f"{tmp_path / 'part-0.parquet'} row 0", f"{tmp_path / 'part-0.parquet'} row 2",
                                                 f"{tmp_path / 'part-1.parquet'} row 2"]
    assert report["eval"]["gsm8k"]["contaminated_indices"] == [0, 3]


def test_json_list_and_json_lines_files_read_alike(tmp_path):
    rows = read_jsonl(os.path.join(TRAIN, "rlvr.jsonl"))
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # as datasets' to_json writes
    assert [r for _, r in dc.read_rows(str(tmp_path / "list.json"))] == rows
    assert [r for _, r in dc.read_rows(str(tmp_path / "lines.json"))] == rows


def test_plain_string_preference_fields_count_as_user_prompt_and_assistant_answers():
    row = {"prompt": "p", "chosen": "c", "rejected": [{"role": "user", "content": "u"},
                                                      {"role": "assistant", "content": "a"}]}
    assert dc.train_texts(row, "row") == ["p", "u"]
    assert dc.train_texts(row, "row", roles=("assistant",)) == ["c", "a"]
    # Tulu's layout with a null prompt column: the prompt is in chosen and rejected, as the trainers read it
    assert dc.train_texts(dict(row, prompt=None, chosen=row["rejected"]), "row") == ["u", "u"]


def test_a_comma_separated_roles_flag_reads_each_role(tmp_path):
    # the fixtures hold only user and assistant turns (and one system turn that matches nothing)
    clean, report = run_cli(tmp_path, n=8, roles="assistant, user")
    assert report["roles"] == ["assistant", "user"]
    assert report["contaminated_train_rows"] == REMOVED_N8


def test_eval_field_flag_lists_several_fields_and_blank_text_is_an_error(tmp_path):
    assert dc.eval_fields("squad", "context,question") == ("context", "question")
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text(json.dumps({"question": " \n\t"}) + "\n")
    with pytest.raises(dc.DecontaminationError, match="row has no text"):
        dc.load_eval_set("gsm8k", str(bad))


def test_an_eval_field_no_eval_set_would_read_is_refused_not_ignored(capsys):
    """--eval gsm8k=PATH --eval_field=answer read gsm8k's question and said nothing: a known task reads its own
    fields, so --eval_field with only known tasks is a mistake."""
    gsm8k, arc = (os.path.join(FIX, "eval", f"{name}.jsonl") for name in ("gsm8k", "arc"))
    with pytest.raises(SystemExit):
        dc.main([f"--train={TRAIN}", "--eval", f"gsm8k={gsm8k}", f"arc_easy={arc}", "--eval_field=answer",
                 "--no_progress"])
    assert ("--eval_field=answer: every --eval set is named after a known task, which reads its own field(s) "
            "(gsm8k: question; arc_easy: question,choices)") in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A --report in a missing folder failed with a traceback after the whole scan (minutes on real data)."""
    monkeypatch.setattr(dc, "load_eval_set", lambda *a: pytest.fail("read the eval sets before checking the outputs"))
    (tmp_path / "read_only").mkdir()
    # (as root every folder is writable: os.access stands in for a folder this user may not write)
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("read_only"))
    refusals = ((tmp_path / "no_such" / "out.json", f"its folder {tmp_path / 'no_such'} does not exist"),
                (tmp_path, "a folder, not a file"),
                (tmp_path / "read_only" / "out.json", f"its folder {tmp_path / 'read_only'} is not writable"))
    for flag in ("out_clean", "report"):
        for path, said in refusals:
            with pytest.raises(SystemExit):
                dc.main([f"--train={TRAIN}", "--eval", *EVAL_ARGS, "--eval_field=query", f"--{flag}={path}",
                         "--no_progress"])
            assert f"--{flag}={path}: {said}" in capsys.readouterr().err


def test_eval_args_split_at_the_first_equals_and_refuse_a_set_given_twice():
    assert dc.parse_eval_args(["gsm8k=dir/a=b.jsonl"]) == {"gsm8k": "dir/a=b.jsonl"}
    with pytest.raises(dc.DecontaminationError, match="given twice"):
        dc.parse_eval_args(["gsm8k=a.jsonl", "gsm8k=b.jsonl"])


def test_n_below_one_is_refused():
    with pytest.raises(dc.DecontaminationError, match="n must be >= 1"):
        dc.EvalIndex({"a": [["one two"]]}, n=0)


def test_share_counts_examples_too_short_for_an_ngram_as_clean():
    # 3 examples: one copied, one too short for a trigram, one clean -> 1/3, not 1/2
    index = dc.EvalIndex({"a": [["one two three"], ["four"], ["five six seven"]]}, n=3)
    assert index.scan([["say one two three now"]]).tolist() == [True]
    rep = index.report()["a"]
    assert (rep["contaminated"], rep["too_short"], rep["share"]) == (1, 1, pytest.approx(1 / 3))


def test_apostrophes_are_deleted_not_split_on():
    assert dc.normalise("Don't") == dc.normalise("dont") == ["dont"]


def test_clean_rows_are_never_written_over_the_training_data(tmp_path, capsys):
    """--out_clean naming the --train file emptied it before it was read, and the empty file passed as clean."""
    train = tmp_path / "sft.jsonl"
    train.write_bytes(open(os.path.join(TRAIN, "sft.jsonl"), "rb").read())
    (tmp_path / "clean").mkdir()
    before = train.read_bytes()
    with pytest.raises(SystemExit):
        dc.main([f"--train={train}", "--eval", *EVAL_ARGS, "--eval_field=query", f"--out_clean={train}",
                 "--no_progress"])
    assert "is, or would be, one of the --train" in capsys.readouterr().err
    assert train.read_bytes() == before
    # nor where a later run on the same --train would read them as training data too
    for spec in (tmp_path, tmp_path / "*.jsonl"):
        with pytest.raises(SystemExit):
            dc.main([f"--train={spec}", "--eval", *EVAL_ARGS, "--eval_field=query",
                     f"--out_clean={tmp_path / 'clean.jsonl'}", "--no_progress"])
        assert "would be, one of the --train" in capsys.readouterr().err
    train.write_text("")  # nothing to check is an error, not 0% contamination
    with pytest.raises(DataError, match="holds no training rows"):
        dc.main([f"--train={train}", "--eval", *EVAL_ARGS, "--eval_field=query",
                 f"--out_clean={tmp_path / 'clean' / 'clean.jsonl'}", "--no_progress"])
    train.write_text(before.decode().splitlines()[0] + "\n{not json\n")  # a bad row: no half-written clean file
    with pytest.raises(DataError, match="line 2"):
        dc.main([f"--train={train}", "--eval", *EVAL_ARGS, "--eval_field=query",
                 f"--out_clean={tmp_path / 'clean' / 'clean.jsonl'}", "--no_progress"])
    assert sorted(os.listdir(tmp_path)) == ["clean", "sft.jsonl"] and os.listdir(tmp_path / "clean") == []
