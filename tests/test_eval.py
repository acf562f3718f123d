import contextlib
import glob
import json
import math
import os
import random
import re
import shutil

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import common
import eval as ev
from data import DataError, Tokenizer, build_demo_tokenizer, make_demo_data, read_rows
from model import Generation, ModelConfig, Transformer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def fixture_text():
    for root, _, files in os.walk(FIXTURES):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".jsonl"):
                yield open(path).read()
    yield "Question: Answer: the the the the the a a a hello world True False yes no A B C D E F G H I J"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box spinning threads slow them many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model and a byte-level BPE tokenizer trained on the fixture text, saved in HF layout."""
    path = str(tmp_path_factory.mktemp("tiny_model"))
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(fixture_text()), trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": SPECIALS[0], "eos_token": SPECIALS[0], "pad_token": SPECIALS[0]}, f)
    tok = Tokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.save_pretrained(path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return ev.load_model_and_tokenizer(model_dir)


def per_character_loglikelihood(tok):
    """A stand-in for continuation_logprobs: minus each continuation's length in characters, its leading space
    included. acc (the sum) then picks the shortest choice, and acc_norm, -(n + 1) / n per character past the
    space, the longest; equal lengths (MMLU-Pro's letters) tie, and a tie goes to the first choice."""
    return lambda model, requests, *args, **kwargs: [-float(len(tok.decode(cont))) for _, cont in requests]


def scripted_generate(tok, answer):
    """A stand-in for model.generate: answer(prompt text) as each prompt's whole continuation, ended by eos."""
    def generate(model, prompts, max_new_tokens, **kwargs):
        tokens = [tok.encode(answer(tok.decode(p))) + [tok.eos_id] for p in prompts]
        return Generation(tokens, [[0.0] * len(t) for t in tokens], [True] * len(tokens))
    return generate


def fixture_answer(prompt):
    question = prompt.rsplit("Question: ", 1)[-1]
    if "Question: " in prompt and question.startswith(("not ", "True ", "False ", "Is the following")):
        return "True"  # BBH: right on the 3 boolean_expressions rows whose target is True, wrong on sports
    if "Question: " in prompt:  # GSM8K: right only on the first row (#### 70)
        return " 10 * 7 = 70 pages.\n#### 70"
    # IFEval: no comma; lowercase English once the first line is dropped (loose); no <<title>>
    return "Note:\nthe weather is nice and the park is full of people"


def test_every_task_runs_on_fixtures_and_scores_a_scripted_model_as_computed_by_hand(model_dir, tmp_path, capsys,
                                                                                     loaded, monkeypatch):
    _, tok = loaded
    monkeypatch.setattr(ev, "continuation_logprobs", per_character_loglikelihood(tok))
    monkeypatch.setattr(ev, "generate", scripted_generate(tok, fixture_answer))
    out = tmp_path / "results.json"
    ev.main([f"--model={model_dir}", f"--tasks={','.join(ev.ALL_TASKS)}", f"--data_dir={FIXTURES}",
             "--batch_size=3", "--max_new_tokens=6", f"--out={out}"])
    printed = capsys.readouterr().out
    results = json.load(open(out))
    summary = results["summary"]
    expected_n = {"gsm8k": 3, "ifeval": 4, "arc": 5, "hellaswag": 2, "piqa": 2, "mmlu_pro": 2, "bbh": 9}
    for task, n in expected_n.items():
        assert summary[task]["n"] == n == len(results["examples"][task]), task
        assert f"| {task} " in printed
    # the longest choice is the gold one in E2, C1, C2, both HellaSwag and both PIQA rows; the shortest only in E3
    assert summary["arc"]["metrics"] == {"ARC-Easy": {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(1 / 3),
                                                      "n": 3},
                                         "ARC-Challenge": {"acc": 0.0, "acc_norm": 1.0, "n": 2}}
    assert summary["arc"]["value"] == pytest.approx(2 / 3)  # the mean of the subsets, not 3 of 5 items
    assert summary["hellaswag"]["metrics"] == summary["piqa"]["metrics"] == {"acc": 0.0, "acc_norm": 1.0, "n": 2}
    assert summary["mmlu_pro"]["metrics"] == {"acc": 0.0, "acc_norm": 0.0, "n": 2}  # letters tie: A, never gold
    assert [e["pred_norm"] for e in results["examples"]["hellaswag"]] == [0, 0]
    assert summary["gsm8k"]["value"] == summary["gsm8k"]["metrics"]["last_number_acc"] == pytest.approx(1 / 3)
    assert [e["output"] for e in results["examples"]["gsm8k"]] == [" 10 * 7 = 70 pages.\n#### 70"] * 3
    assert re.search(r"\| gsm8k +\| last_number_acc +\|", printed)
    assert summary["bbh"]["metrics"] == {"boolean_expressions": 0.6, "sports_understanding": 0.0}
    assert summary["bbh"]["value"] == 0.3  # the mean of the subtasks, not 3 of 9 items
    assert results["use_chat_template"] is True
    assert summary["ifeval"]["metrics"] == {"prompt_level_strict_acc": 0.25, "inst_level_strict_acc": 0.25,
                                            "prompt_level_loose_acc": 0.75, "inst_level_loose_acc": 0.75}
    assert summary["ifeval"]["value"] == 0.5
    assert "IFEval backends" in printed and results["ifeval_backends"]
    for metric in summary["ifeval"]["metrics"]:  # all four printed, not only their mean
        assert re.search(rf"\| ifeval +\| {metric} +\|", printed), metric


def test_prompts_are_smollm_lighteval_tasks_character_for_character(loaded, monkeypatch):
    """huggingface/smollm text/evaluation/tasks.py (SmolLM2's evaluation): the text as published, never stripped
    or capitalised; MMLU-Pro with its header and bare-letter continuations; BBH prompts ending in "Answer: "."""
    model, tok = loaded
    seen = []
    monkeypatch.setattr(ev, "generate_until", lambda model, tok, prompts, *a, **k: seen.extend(prompts) or
                        [""] * len(prompts))
    results = ev.evaluate_tasks(model, tok, ["arc", "piqa", "mmlu_pro", "bbh"], FIXTURES, use_chat_template=False)
    arc = results["arc"]["examples"][0]
    assert arc["query"] == "Question: Which of these is a source of light?\nAnswer:"
    assert arc["choices"] == [" the Sun", " a rock", " a shadow"]
    piqa = results["piqa"]["examples"][0]
    assert piqa["query"] == "Question: To open a jar that is stuck,\nAnswer:"
    assert piqa["choices"] == [" run the lid under hot water, then twist it.",
                               " put the jar in the freezer for a week."]
    mmlu = results["mmlu_pro"]["examples"][1]
    assert mmlu["query"] == ("The following are multiple choice questions (with answers) about physics.\n\n"
                             "Which planet is closest to the Sun?\nA. Venus\nB. Earth\nC. Mercury\nD. Mars\nAnswer:")
    assert mmlu["choices"] == ["A", "B", "C", "D"] and mmlu["gold"] == 2
    # the first row's examples: lighteval's balanced pool of the subtask (see test_bbh_...) less the row itself
    assert tok.decode(seen[0]) == ("Question: True or not False and False is\nAnswer: True\n\n"
                                   "Question: not True or ( False and True ) is\nAnswer: False\n\n"
                                   "Question: True and not not ( not False ) is\nAnswer: True\n\n"
                                   "Question: not ( True ) and ( True ) is\nAnswer: ")


def test_limit_caps_examples_per_task(model_dir, tmp_path):
    out = tmp_path / "results.json"
    ev.main([f"--model={model_dir}", "--tasks=arc,bbh", f"--data_dir={FIXTURES}", "--limit=1",
             "--max_new_tokens=4", f"--out={out}"])
    summary = json.load(open(out))["summary"]
    assert summary["arc"]["n"] == 2 and summary["bbh"]["n"] == 2  # per ARC subset, per BBH subtask


class HeadPatch:
    """Replaces model.logits (the LM head every caller goes through) with head(original_head, hidden) until
    remove()."""

    def __init__(self, model, head):
        original = model.logits
        model.logits = lambda hidden: head(original, hidden)
        self.model = model

    def remove(self):
        del self.model.logits  # the instance attribute: the class's method shows through again


def bias_logits(model, bias):
    """Adds `bias` [V] to every position's logits, as a biased LM head would."""
    return HeadPatch(model, lambda head, hidden: head(hidden) + bias.to(hidden.dtype))


@contextlib.contextmanager
def constant_logits(model, logits):
    """Within the block every position's logits are `logits` [V]: a model whose every token log-prob is known."""
    patch = HeadPatch(model, lambda head, hidden: torch.zeros_like(head(hidden)) + logits)
    try:
        yield
    finally:
        patch.remove()


def test_choice_with_higher_likelihood_wins(loaded):
    model, tok = loaded
    choices = [" hello", " world"]
    for favoured in (0, 1):
        bias = torch.zeros(model.config.vocab_size)
        bias[tok.encode(choices[favoured])] = 50.0
        handle = bias_logits(model, bias)
        try:
            docs = ev.score_multiple_choice(model, tok, [{"query": "Question: pick\nAnswer:", "choices": choices,
                                                          "gold": favoured}], batch_size=2, desc="t")
        finally:
            handle.remove()
        assert docs[0]["pred"] == docs[0]["pred_norm"] == favoured
        assert docs[0]["acc"] == docs[0]["acc_norm"] == 1.0
        assert docs[0]["logprobs"][favoured] > docs[0]["logprobs"][1 - favoured] + 10


def test_acc_norm_differs_from_acc_when_lengths_differ(loaded):
    model, tok = loaded
    short, long = " a", " the the the the the"
    n_short, n_long = len(tok.encode(short)), len(tok.encode(long))
    # uniform logits: every token costs log V, so the sum favours fewer tokens, the per-character mean more
    # characters per token
    assert n_short < n_long and n_long / (len(long) - 1) < n_short / (len(short) - 1)
    with constant_logits(model, torch.zeros(model.config.vocab_size)):
        doc = ev.score_multiple_choice(model, tok, [{"query": "Question: q\nAnswer:", "choices": [short, long],
                                                     "gold": 1}], batch_size=2, desc="t")[0]
    assert doc["pred"] == 0 and doc["pred_norm"] == 1
    assert doc["acc"] == 0.0 and doc["acc_norm"] == 1.0


def test_acc_norm_does_not_count_the_space_before_a_choice(loaded, monkeypatch):
    """lm-eval scores " " + choice (its target_delimiter) but divides by len(choice)."""
    _, tok = loaded
    monkeypatch.setattr(ev, "continuation_logprobs", lambda model, requests, *a, **k: [-2.0, -4.5, -2.0, -5.5])
    docs = [{"query": "Question: q\nAnswer:", "choices": [" ab", " abcde"], "gold": 1},
            {"query": "Question: q\nAnswer:", "choices": ["ab", "abcde"], "gold": 0}]
    ev.score_multiple_choice(None, tok, docs, batch_size=4, desc="t")
    # per character: -1.0 vs -0.9 (with the space counted, -0.67 vs -0.75); without a space, -1.0 vs -1.1
    assert [d["pred_norm"] for d in docs] == [1, 0] and [d["pred"] for d in docs] == [0, 0]
    assert [d["acc_norm"] for d in docs] == [1.0, 1.0]


def test_an_overlong_context_loses_its_oldest_tokens_not_the_continuation(loaded):
    model, tok = loaded
    max_len = model.config.max_position_embeddings
    text = tok.encode("".join(fixture_text()))
    ctx, cont = text[:max_len + 40], tok.encode(" hello world")
    kept = ctx[-(max_len + 1 - len(cont)):]  # what fits: the window's inputs end where the last target starts
    overlong, fitting, shorter = (ev.continuation_logprobs(model, [(c, cont)], batch_size=1)[0]
                                  for c in (ctx, kept, kept[1:]))
    assert overlong == pytest.approx(fitting, abs=1e-5)
    assert abs(fitting - shorter) > 1e-4  # a context that fits is used whole: one token less scores otherwise


def test_batched_loglikelihood_matches_one_at_a_time(loaded):
    model, tok = loaded
    requests = [ev.encode_pair(tok, "Question: What is 2 + 3?\nAnswer:", " 5"),
                ev.encode_pair(tok, "Hi", " there, the world is wide"),
                ev.encode_pair(tok, "", " hello")]
    batched = ev.continuation_logprobs(model, requests, batch_size=3)
    single = [ev.continuation_logprobs(model, [r], batch_size=1)[0] for r in requests]
    assert batched == pytest.approx(single, abs=1e-4)


def test_choices_that_differ_in_their_last_token_share_one_forward(loaded, monkeypatch):
    """MMLU-Pro's choices are letters: its ten requests of a question are one forward's inputs (ten times the work
    before, most of the table's)."""
    model, tok = loaded
    requests = [ev.encode_pair(tok, f"Question {q}: which is it?\nOptions: A B C D E F G H I J\n", letter)
                for q in range(3) for letter in "ABCDEFGHIJ"]
    assert len({tuple((c + x)[:-1]) for c, x in requests}) == 3  # (the chat context's newline moved in front)
    single = [ev.continuation_logprobs(model, [r], batch_size=1)[0] for r in requests]
    forwards = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: forwards.append(1) or forward(*a, **k))
    shared = ev.continuation_logprobs(model, requests, batch_size=2)
    assert len(forwards) == 2 and shared == pytest.approx(single, abs=1e-5)  # 3 forwards, in batches of 2


def test_loglikelihood_runs_the_lm_head_on_continuation_tokens_only(loaded):
    """[B, T, V] logits of a few-shot batch take gigabytes at a 49k vocabulary: the head sees each row's
    continuation positions, and the sums are still those of the full logits."""
    model, tok = loaded
    max_len = model.config.max_position_embeddings
    requests = [(tok.encode("".join(fixture_text()))[:max_len + 40], tok.encode(" hello world")),  # cut to fit
                ev.encode_pair(tok, "Question: What is 2 + 3?\nAnswer:", " 5"),
                ev.encode_pair(tok, "Hi", " there, the world is wide")]
    head_inputs = []
    patch = HeadPatch(model, lambda head, hidden: head_inputs.append(tuple(hidden.shape)) or head(hidden))
    try:
        got = ev.continuation_logprobs(model, requests, batch_size=3)
    finally:
        patch.remove()
    assert head_inputs == [(sum(len(cont) for _, cont in requests), model.config.hidden_size)]
    expected = []
    for ctx, cont in requests:
        seq = (ctx + cont)[-(max_len + 1):]
        logprobs = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0, -len(cont):].float(), dim=-1)
        expected.append(logprobs.gather(1, torch.tensor(cont)[:, None]).sum().item())
    assert got == pytest.approx(expected, rel=1e-6)  # fp32 sums of up to ~80, where one ulp is 8e-6
    assert ev.continuation_logprobs(model, [(requests[1][0], [])], batch_size=1) == [0.0]  # nothing to score


def test_encode_pair_moves_trailing_space_to_continuation(loaded):
    _, tok = loaded
    ctx, cont = ev.encode_pair(tok, "Answer: ", "hello")
    assert ctx == tok.encode("Answer:") and ctx + cont == tok.encode("Answer: hello")


def test_encode_pair_moves_all_trailing_whitespace_as_lightevals_tok_encode_pair(loaded):
    """context.rstrip(): a chat context's final '\n' (after '<|im_start|>assistant') is scored with every choice."""
    _, tok = loaded
    for context, tail in [("<|im_start|>assistant\n", "\n"), ("Answer: \n\t", " \n\t")]:
        ctx, cont = ev.encode_pair(tok, context, " the Sun")
        assert ctx == tok.encode(context[:-len(tail)])
        assert cont == tok.encode(context + " the Sun")[len(ctx):]
        assert tok.decode(cont, skip_special_tokens=False) == tail + " the Sun"


def record_encode_pair(monkeypatch):
    seen = []

    def recording(tok, context, continuation):
        seen.append((context, continuation))
        return real(tok, context, continuation)
    real = ev.encode_pair
    monkeypatch.setattr(ev, "encode_pair", recording)
    return seen


SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_chat_template_context_of_an_arc_row_is_lightevals(loaded, monkeypatch):
    """lighteval --use_chat_template: the query as a user turn, rendered with the generation prompt (SmolLM2's
    template adds its default system turn); the choices are scored after it."""
    model, tok = loaded
    seen = record_encode_pair(monkeypatch)
    ev.evaluate_tasks(model, tok, ["arc"], FIXTURES, template="chatml", limit=1)
    context = (SYSTEM + "<|im_start|>user\nQuestion: Which of these is a source of light?\nAnswer:<|im_end|>\n"
               "<|im_start|>assistant\n")
    assert seen[:3] == [(context, choice) for choice in (" the Sun", " a rock", " a shadow")]
    seen.clear()
    ev.evaluate_tasks(model, tok, ["arc"], FIXTURES, template="chatml", limit=1, use_chat_template=False)
    assert seen[0] == ("Question: Which of these is a source of light?\nAnswer:", " the Sun")


def lighteval_gsm8k_draws(n_test, n_pool, seed, k=5):
    """random_sampling_from_train as create_requests_from_tasks runs it: rnd = Random(seed) shuffles the test docs,
    then rnd.sample(pool, k) for each doc in the shuffled order. Returned as pool indices per test row."""
    rnd = random.Random(seed)
    order = list(range(n_test))
    rnd.shuffle(order)
    return {i: rnd.sample(range(n_pool), k) for i in order}


def rows_of(path):
    return [json.loads(line) for line in open(path)]


def test_chat_template_context_of_a_gsm8k_row_has_its_five_examples_as_turns(loaded, monkeypatch):
    model, tok = loaded
    seen = []
    monkeypatch.setattr(ev, "generate_until", lambda model, tok, prompts, *a, **k: seen.append((prompts, k)) or
                        [""] * len(prompts))
    ev.evaluate_tasks(model, tok, ["gsm8k"], FIXTURES, template="chatml")
    test, train = (rows_of(os.path.join(FIXTURES, "gsm8k", f"{s}.jsonl")) for s in ("test", "train"))
    draws = lighteval_gsm8k_draws(len(test), len(train), seed=42)
    prompts, kwargs = seen[0]
    for i, row in enumerate(test):
        turns = "".join(f"<|im_start|>user\nQuestion: {train[j]['question']}\nAnswer:<|im_end|>\n"
                        f"<|im_start|>assistant\n {train[j]['answer']}<|im_end|>\n" for j in draws[i])
        question = f"<|im_start|>user\nQuestion: {row['question']}\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
        assert tok.decode(prompts[i], skip_special_tokens=False) == SYSTEM + turns + question
    # a chat model's answer ends with its turn: lighteval drops the task's stop sequences under the chat template
    assert kwargs["stop_strings"] == () and kwargs["stop_ids"] == [tok.token_to_id("<|im_end|>"), tok.eos_id]
    seen.clear()
    ev.evaluate_tasks(model, tok, ["gsm8k"], FIXTURES, use_chat_template=False)
    assert seen[0][1]["stop_strings"] == ("Question:", "Question") and seen[0][1]["stop_ids"] == [tok.eos_id]


@pytest.mark.parametrize("output,score", [
    ("9 * 8 = 72, so 72.", 0.0),  # no '#### ': gsm8k_normalizer gives [invalid]
    ("#### 72.00", 0.0),  # compared as text, not by value
    ("#### $72", 0.0),
    ("#### 72\nQuestion: then 5", 1.0),  # the first '####' counts, not the last number
    ("  #### 72  ", 1.0),
    ("#### 7,2", 1.0),  # commas removed
    ("#### 70\n#### 72", 0.0),
    ("", 0.0)])
def test_gsm8k_qem_is_lightevals_quasi_exact_match_gsm8k(output, score):
    assert ev.gsm8k_qem(output, "8 * 9 = <<8*9=72>>72\n#### 72") == score


def test_gsm8k_headline_is_qem_and_the_last_number_is_a_second_metric(loaded, monkeypatch):
    model, tok = loaded
    outputs = ["He reads 10 * 7 = 70 pages, so 70.", "#### 45.00", "#### 5\nThen 9 - 4 = 5 and 2 more: 7"]
    monkeypatch.setattr(ev, "generate_until", lambda *args, **kwargs: outputs)
    result = ev.evaluate_tasks(model, tok, ["gsm8k"], FIXTURES)["gsm8k"]
    assert [e["reference"] for e in result["examples"]] == ["70", "45", "5"]
    assert [e["score"] for e in result["examples"]] == [0.0, 0.0, 1.0]
    assert [e["score_last_number"] for e in result["examples"]] == [1.0, 1.0, 0.0]
    assert result["metric"] == "qem" and result["value"] == pytest.approx(1 / 3)
    assert result["metrics"] == {"qem": pytest.approx(1 / 3), "last_number_acc": pytest.approx(2 / 3), "n_shots": 5}
    assert ev.gsm8k_reference("1,000 - 250 = 750\n#### 1,750", "row") == "1750"
    with pytest.raises(DataError, match="row 3"):
        ev.gsm8k_reference("no marker", "row 3")


def test_gsm8k_without_train_file_uses_first_test_rows_as_shots_and_says_so(loaded, tmp_path, monkeypatch, capsys):
    model, tok = loaded
    shutil.copytree(os.path.join(FIXTURES, "gsm8k"), tmp_path / "gsm8k")
    os.remove(tmp_path / "gsm8k" / "train.jsonl")
    for i in (1, 2, 3):  # 5 shots + 1 scored row need 6 test rows
        with open(tmp_path / "gsm8k" / "test.jsonl", "a") as f:
            f.write(json.dumps({"question": f"{i} + {i}?", "answer": f"{2 * i}\n#### {2 * i}"}) + "\n")
    seen = []
    monkeypatch.setattr(ev, "generate_until", lambda model, tok, prompts, *a, **k: seen.extend(prompts) or
                        ["#### 6"] * len(prompts))
    result = ev.evaluate_tasks(model, tok, ["gsm8k"], str(tmp_path))["gsm8k"]
    assert result["n"] == 1 and result["value"] == 1.0 and result["examples"][0]["question"] == "3 + 3?"
    assert tok.decode(seen[0]).count("Question:") == 6
    assert "no gsm8k/train file" in capsys.readouterr().out


def test_gsm8k_with_no_test_row_left_to_score_is_an_error_not_a_qem_of_0(loaded, tmp_path, monkeypatch):
    """Without gsm8k/train the first 5 test rows are the examples: 5 rows or fewer left none to score, and the run
    reported qem 0 over n 0."""
    (tmp_path / "gsm8k").mkdir()
    test = rows_of(os.path.join(FIXTURES, "gsm8k", "train.jsonl"))
    monkeypatch.setattr(ev, "generate_until", lambda *a, **k: pytest.fail("generated with no row to score"))
    for n_rows in (3, 5):
        (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test[:n_rows]))
        with pytest.raises(DataError, match=rf"test\.jsonl: gsm8k: {n_rows} test rows and no gsm8k/train file .*"
                                            r"no row is left to score"):
            ev.evaluate_tasks(*loaded, ["gsm8k"], str(tmp_path))


def test_every_gsm8k_few_shot_row_is_checked_not_only_those_drawn(loaded, tmp_path, monkeypatch):
    """With --limit=1 the first question's five examples leave train line 4 out (see lighteval_gsm8k_draws): a row
    without an answer there went unnoticed until a longer run drew it."""
    assert 3 not in lighteval_gsm8k_draws(3, 6, seed=42)[0]
    shutil.copytree(FIXTURES, tmp_path / "evals")
    path = tmp_path / "evals" / "gsm8k" / "train.jsonl"
    rows = rows_of(path)
    rows[3].pop("answer")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(ev, "generate_until", lambda *a, **k: pytest.fail("generated before checking the examples"))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} line 4: missing field 'answer'"):
        ev.evaluate_tasks(*loaded, ["gsm8k"], str(tmp_path / "evals"), limit=1)


def test_gsm8k_draws_five_examples_per_question_as_lighteval_random_sampling_from_train(loaded, monkeypatch):
    """One Random(--seed) across the task: a fresh draw for each question, the same on every run of a seed."""
    model, tok = loaded
    seen = []
    monkeypatch.setattr(ev, "generate_until", lambda model, tok, prompts, *a, **k: seen.extend(prompts) or
                        [""] * len(prompts))
    train = rows_of(os.path.join(FIXTURES, "gsm8k", "train.jsonl"))

    def shots(seed, **kwargs):
        seen.clear()
        ev.evaluate_tasks(model, tok, ["gsm8k"], FIXTURES, seed=seed, use_chat_template=False, **kwargs)
        return [re.findall(r"Question: (.*)\n", tok.decode(p))[:-1] for p in seen]  # the last is the scored one
    first = shots(42)
    draws = sorted(lighteval_gsm8k_draws(3, 6, seed=42).items())
    assert first == [[train[j]["question"] for j in draw] for _, draw in draws]
    assert len({tuple(q) for q in first}) == 3  # three questions, three different draws (not one shared set)
    assert shots(42) == first and shots(7) != first
    assert shots(42, limit=2) == first[:2]  # a --limit run keeps the full run's prompts


def test_bbh_examples_are_lightevals_balanced_draw_and_every_row_is_scored(loaded, tmp_path, monkeypatch):
    """smollm's BBH: few-shot split = evaluation split, lighteval's default 'balanced' sampler seeded 0, the row
    under evaluation never its own example; the whole stripped output must equal the target."""
    model, tok = loaded
    targets = ["True", "True", "True", "False", "False"]  # the first three rows share a label
    (tmp_path / "bbh").mkdir()
    (tmp_path / "bbh" / "sub.jsonl").write_text("".join(json.dumps({"input": f"q{i}", "target": t}) + "\n"
                                                        for i, t in enumerate(targets)))
    # the balanced pool by hand: 4 rows (3 shots + 1), labels taken in turn, the label with more rows first
    # (True: q0 q1 q2, then False: q3 q4), each a random row of its label left, from Random(0)
    rnd = random.Random(0)
    left = {"True": ["q0", "q1", "q2"], "False": ["q3", "q4"]}
    pool = [left[label].pop(rnd.randrange(len(left[label]))) for label in ("True", "False", "True", "False")]
    assert pool == ["q1", "q4", "q0", "q3"]
    calls = []
    outputs = ["True", " True \n", "True\nBecause q2 is true.", "", "False"]
    monkeypatch.setattr(ev, "generate_until", lambda model, tok, prompts, caps, **k: calls.append((prompts, caps, k))
                        or outputs)
    result = ev.evaluate_tasks(model, tok, ["bbh"], str(tmp_path), use_chat_template=False)["bbh"]
    prompts, caps, kwargs = calls[0]
    examples = [re.findall(r"Question: (q\d)\nAnswer: (\w+)", tok.decode(p)) for p in prompts]
    want = {f"q{i}": [q for q in pool if q != f"q{i}"][:3] for i in range(5)}
    assert examples == [[(q, targets[int(q[1])]) for q in want[f"q{i}"]] for i in range(5)]
    assert all({t for _, t in ex} == {"True", "False"} for ex in examples)  # balanced, unlike the first 3 rows
    assert [e["input"] for e in result["examples"]] == ["q0", "q1", "q2", "q3", "q4"] and result["n"] == 5
    assert [e["score"] for e in result["examples"]] == [1.0, 1.0, 0.0, 0.0, 1.0]
    # smollm's BBH: stop sequences "Question:" and "Question" (no newline), no generation_size: up to 2048 tokens
    assert kwargs["stop_strings"] == ("Question:", "Question") and kwargs["stop_ids"] == [tok.eos_id]
    assert caps == [2048 - len(p) for p in prompts]
    calls.clear()
    ev.evaluate_tasks(model, tok, ["bbh"], str(tmp_path), template="chatml")
    prompts, caps, kwargs = calls[0]
    assert tok.decode(prompts[0], skip_special_tokens=False) == (
        SYSTEM + "".join(f"<|im_start|>user\nQuestion: {q}\nAnswer: <|im_end|>\n<|im_start|>assistant\n"
                         f"{targets[int(q[1])]}<|im_end|>\n" for q in want["q0"])
        + "<|im_start|>user\nQuestion: q0\nAnswer: <|im_end|>\n<|im_start|>assistant\n")
    assert kwargs["stop_strings"] == () and kwargs["stop_ids"] == [tok.token_to_id("<|im_end|>"), tok.eos_id]


def test_use_chat_template_flag(model_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(ev, "generate_until", lambda model, tok, prompts, *a, **k: seen.extend(prompts) or
                        [""] * len(prompts))
    out = tmp_path / "results.json"
    for flag, chat in (([], True), (["--use_chat_template=false"], False), (["--use_chat_template"], True)):
        seen.clear()
        ev.main([f"--model={model_dir}", "--tasks=gsm8k", f"--data_dir={FIXTURES}", "--limit=1", f"--out={out}",
                 "--template=chatml"] + flag)
        assert json.load(open(out))["use_chat_template"] is chat
        tok = ev.load_model_and_tokenizer(model_dir)[1]
        assert tok.decode(seen[0], skip_special_tokens=False).startswith(SYSTEM if chat else "Question: ")
    with pytest.raises(SystemExit):
        ev.main([f"--model={model_dir}", "--use_chat_template=maybe"])


def test_an_out_that_cannot_be_written_is_refused_before_evaluating(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "evaluate_tasks", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    (tmp_path / "a_file").write_text("")
    # (as root every folder is writable: os.access stands in for a folder this user may not write)
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("read_only"))
    for out, said in ((tmp_path / "a_file" / "results.json", "cannot make its folder"), (tmp_path, "a folder"),
                      (tmp_path / "read_only" / "results.json", f"{tmp_path / 'read_only'} is not writable")):
        with pytest.raises(common.ConfigError, match=f"--out={out}: {said}"):
            ev.main([f"--model={model_dir}", "--tasks=gsm8k", f"--data_dir={FIXTURES}", "--limit=1", f"--out={out}"])


def test_chat_generation_stops_where_lightevals_does_not_at_generation_configs_other_eos_ids(model_dir, tmp_path):
    """lighteval hands generate the tokenizer's eos, which replaces generation_config.json's list (RLVR, like vLLM,
    stops at that list too: data.stop_token_ids)."""
    from types import SimpleNamespace

    import data
    shutil.copytree(model_dir, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    tok = Tokenizer.from_pretrained(str(tmp_path / "m"))
    assert data.stop_token_ids(tok, "tulu") == [0, 5]
    for template in ("tulu", "chatml"):
        ctx = SimpleNamespace(use_chat_template=True, tok=tok, template=template)
        assert ev.generation_stops(ctx, ["\n\n"]) == ((), data.stop_token_ids(tok, template, generation_config=False))
        assert 5 not in ev.generation_stops(ctx, ["\n\n"])[1]


def test_generate_until_cuts_at_stop_string_and_stops_generating(loaded, monkeypatch):
    model, tok = loaded
    target = tok.encode(" 70 pages.\n\nQuestion: next question that must not be generated at all")
    calls = []

    def scripted_generate(model, prompts, max_new_tokens, **kwargs):
        calls.append(max_new_tokens)
        done = len(prompts[0]) - 3  # the prompt below is 3 tokens long
        return Generation([target[done:done + max_new_tokens]], [[0.0] * max_new_tokens], [False])

    monkeypatch.setattr(ev, "generate", scripted_generate)
    prompt = tok.encode("Answer:")[:1] * 3
    out = ev.generate_until(model, tok, [prompt], max_new_tokens=len(target), stop_strings=("Question:", "\n\n"),
                            chunk=4)
    assert out == [" 70 pages."]
    assert sum(calls) < len(target)


def test_generate_until_real_model_respects_budget(loaded):
    model, tok = loaded
    prompts = [tok.encode("Question: hi\nAnswer:"), tok.encode("True")]
    outs = ev.generate_until(model, tok, prompts, max_new_tokens=5, stop_strings=("Question:",), chunk=2)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert all(len(tok.encode(o)) <= 5 for o in outs)


def test_ifeval_scoring_strict_and_loose():
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "ifeval", "train.jsonl"))]
    by_key = {r["instruction_id_list"][0]: r for r in rows}
    no_comma, lower = by_key["punctuation:no_comma"], by_key["change_case:english_lowercase"]
    title = by_key["detectable_format:title"]  # its kwargs carry the hub's null fillers
    result = ev.score_ifeval([no_comma, no_comma, lower, title],
                             ["fine words and no pause", "one, two", "Sure!\nall lowercase here",
                              "<<kotlin vs java>>\nBoth run on the JVM."])
    strict = [e["inst_level_strict"] for e in result["examples"]]
    loose = [e["inst_level_loose"] for e in result["examples"]]
    assert strict == [[True], [False], [False], [True]]
    assert loose == [[True], [False], [True], [True]]  # loose drops the first line
    m = result["metrics"]
    assert m["prompt_level_strict_acc"] == m["inst_level_strict_acc"] == 0.5
    assert m["prompt_level_loose_acc"] == m["inst_level_loose_acc"] == 0.75
    assert result["value"] == pytest.approx(0.625) and result["n"] == 4


def test_demo_evaluation_scores_a_scripted_model_as_computed_by_hand(monkeypatch):
    data = make_demo_data(seed=0, n_train=16, n_heldout=8)
    tok = build_demo_tokenizer(data["sft_train"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    arith = [r for r in data["rlvr_heldout"] if r["dataset"] == "gsm8k"][:2]
    constraint = [r for r in data["rlvr_heldout"] if r["dataset"] == "ifeval"][:2]
    end, words = (json.loads(r["ground_truth"]) for r in constraint)
    assert end["func_name"] == "validate_end" and words["func_name"] == "validate_word_constraint"
    assert words["quantifier"] == "at most" and len(end["end_phrase"].split()) <= words["N"]
    replies = {arith[0]["messages"][-1]["content"]: f"#### {arith[0]['ground_truth']}",  # right
               arith[1]["messages"][-1]["content"]: f"#### {int(arith[1]['ground_truth']) + 1}",  # wrong
               constraint[0]["messages"][-1]["content"]: "Clocks tick.",  # without the end phrase
               constraint[1]["messages"][-1]["content"]: end["end_phrase"]}  # within the word limit
    monkeypatch.setattr(ev, "generate", scripted_generate(
        tok, lambda prompt: next(reply for asked, reply in replies.items() if asked in prompt)))
    # a model that finds every token only the rejected responses use unlikely prefers each chosen one
    chosen, rejected = ({t for p in data["pref_heldout"][:2] for t in tok.encode(p[k][-1]["content"])}
                        for k in ("chosen", "rejected"))
    bias = torch.zeros(model.config.vocab_size)
    bias[sorted(rejected - chosen)] = -3.0
    with constant_logits(model, bias):
        result = ev.evaluate_demo(model, tok, data, template="tulu", limit=2, batch_size=4, max_new_tokens=4)
    assert result == {"arith_acc": 0.5, "arith_n": 2, "constraint_acc": 0.5, "constraint_n": 2, "pref_acc": 1.0,
                      "pref_n": 2}


def test_demo_constraint_accuracy_gives_no_credit_for_meeting_some_of_a_rows_constraints(loaded, monkeypatch):
    """Held-out accuracy is IFEval's prompt-level strict score: RLVR's partial credit is a training reward only."""
    model, tok = loaded
    both = [{"func_name": "validate_lowercase"}, {"func_name": "validate_end", "end_phrase": "Done."}]
    rows = [{"messages": [{"role": "user", "content": "Answer in lowercase."}], "dataset": "ifeval",
             "ground_truth": json.dumps(both)}]
    monkeypatch.setattr(ev, "generate", scripted_generate(tok, lambda prompt: "all lowercase here"))
    result = ev.evaluate_demo(model, tok, {"rlvr_heldout": rows, "pref_heldout": []})
    assert (result["constraint_acc"], result["constraint_n"]) == (0.0, 1)


def test_preference_accuracy_compares_mean_log_prob_per_token_not_sums(loaded):
    """A long chosen response of likely tokens against a one-token rejected one: its sum is lower, its mean higher."""
    model, tok = loaded
    prompt = {"role": "user", "content": "pick"}
    pair = {"chosen": [prompt, {"role": "assistant", "content": "hello hello hello hello"}],
            "rejected": [prompt, {"role": "assistant", "content": "x"}]}
    liked = tok.encode("hello hello")
    assert len(tok.encode(pair["chosen"][1]["content"])) == 12 and not set(tok.encode("x")) & set(liked)
    bias = torch.zeros(model.config.vocab_size)
    bias[sorted(set(liked))] = 3.0
    with constant_logits(model, bias):
        means = ev.response_logprob(model, tok, [pair["chosen"], pair["rejected"]], "tulu")
        result = ev.evaluate_demo(model, tok, {"rlvr_heldout": [], "pref_heldout": [pair]})
    # every position has the same log-normaliser; the trained tokens end with eos: 12 liked + 1, and 1 + 1. The sums,
    # 12 * 3 - 13 log_z and -2 log_z, would prefer the rejected response.
    log_z = math.log(len(set(liked)) * math.exp(3.0) + model.config.vocab_size - len(set(liked)))
    assert means == pytest.approx([(12 * 3.0 - 13 * log_z) / 13, -log_z], abs=1e-4)
    assert result["pref_acc"] == 1.0 and result["pref_n"] == 1


def test_missing_data_file_names_the_expected_path(loaded, tmp_path):
    model, tok = loaded
    expected = {"gsm8k": "gsm8k/test", "ifeval": "ifeval/train", "arc": "arc/ARC-Easy/test",
                "hellaswag": "hellaswag/validation", "piqa": "piqa/validation", "mmlu_pro": "mmlu_pro/test",
                "bbh": "bbh/<subtask>"}
    for task, rel in expected.items():
        with pytest.raises(FileNotFoundError, match=str(tmp_path / rel).replace("\\", "\\\\")):
            ev.evaluate_tasks(model, tok, [task], str(tmp_path))


def test_the_hub_names_of_the_ifeval_gsm8k_and_mmlu_pro_files_are_found(loaded, tmp_path):
    """google/IFEval ships ifeval_input_data.jsonl; openai/gsm8k keeps its parquet shards under main/, TIGER-Lab/MMLU-Pro
    under data/."""
    model, tok = loaded
    (tmp_path / "ifeval").mkdir()
    shutil.copy(os.path.join(FIXTURES, "ifeval", "train.jsonl"), tmp_path / "ifeval" / "ifeval_input_data.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "gsm8k" / "main").mkdir(parents=True)
    for split in ("test", "train"):
        rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "gsm8k", f"{split}.jsonl"))]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm8k" / "main" / f"{split}-00000-of-00001.parquet")
    (tmp_path / "mmlu_pro" / "data").mkdir(parents=True)
    shutil.copy(os.path.join(FIXTURES, "mmlu_pro", "test.parquet"),
                tmp_path / "mmlu_pro" / "data" / "test-00000-of-00001.parquet")
    got = ev.evaluate_tasks(model, tok, ["ifeval", "gsm8k", "mmlu_pro"], str(tmp_path), limit=2, max_new_tokens=4)
    want = ev.evaluate_tasks(model, tok, ["ifeval", "gsm8k", "mmlu_pro"], FIXTURES, limit=2, max_new_tokens=4)
    def without_ids(results):  # the id names the file and line the example came from
        return {t: [{k: v for k, v in e.items() if k != "id"} for e in r["examples"]] for t, r in results.items()}
    assert without_ids(got) == without_ids(want) and len(got["gsm8k"]["examples"]) == 2


def test_tasks_without_data_dir_is_refused_not_the_demo(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--tasks=arc"])
    assert "--tasks needs --data_dir" in capsys.readouterr().err


def test_an_unknown_task_is_named_before_anything_else_and_names_are_not_case_sensitive(tmp_path, capsys):
    for argv in (["--tasks=arc,gsm9k"], ["--tasks=arc,gsm9k", f"--data_dir={tmp_path}", "--model=nowhere"]):
        with pytest.raises(SystemExit):
            ev.main(argv)
        assert "--tasks=arc,gsm9k: unknown task(s) gsm9k; choose from gsm8k," in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no model at nowhere"):  # GSM8K is gsm8k: on to loading the model
        ev.main(["--tasks=GSM8K", f"--data_dir={tmp_path}", "--model=nowhere"])


def test_a_missing_file_stops_the_run_before_the_first_task(tmp_path, monkeypatch):
    shutil.copytree(FIXTURES, tmp_path / "evals")
    shutil.rmtree(tmp_path / "evals" / "bbh")
    ran = []
    monkeypatch.setitem(ev.TASKS, "arc", lambda ctx: ran.append("arc"))
    with pytest.raises(FileNotFoundError, match="expected one file per BBH subtask"):
        ev.evaluate_tasks(None, None, ["arc", "gsm8k", "bbh"], str(tmp_path / "evals"))
    assert ran == []  # arc's finished scores would have been thrown away


def test_a_split_there_in_two_formats_or_two_places_is_refused_naming_the_files(tmp_path, monkeypatch):
    """eval.py read one of them and ignored the other unseen; the trainers' loader refuses the same."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    ran = []
    monkeypatch.setitem(ev.TASKS, "arc", lambda ctx: ran.append("arc"))
    gsm8k = tmp_path / "evals" / "gsm8k"
    shutil.copytree(FIXTURES, tmp_path / "evals")
    rows = [json.loads(line) for line in (gsm8k / "test.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), gsm8k / "test-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"gsm8k.test: the split is there in 2 formats "
                                        r"\(.*test\.jsonl, .*test-\*\.parquet\): keep one of them"):
        ev.evaluate_tasks(None, None, ["arc", "gsm8k"], str(tmp_path / "evals"))
    os.remove(gsm8k / "test-00000-of-00001.parquet")
    (gsm8k / "main").mkdir()
    shutil.copy(gsm8k / "train.jsonl", gsm8k / "main" / "train.jsonl")
    shutil.copy(gsm8k / "test.jsonl", gsm8k / "main" / "test.jsonl")
    with pytest.raises(DataError, match=r"holds the same split twice \(.*gsm8k.test\.jsonl, .*main.test\.jsonl\)"):
        ev.evaluate_tasks(None, None, ["arc", "gsm8k"], str(tmp_path / "evals"))
    os.remove(gsm8k / "main" / "test.jsonl")
    with pytest.raises(DataError, match=r"holds the same split twice \(.*gsm8k.train\.jsonl, .*main.train\.jsonl\)"):
        ev.evaluate_tasks(None, None, ["arc", "gsm8k"], str(tmp_path / "evals"))
    assert ran == []


def test_bbh_refuses_what_under_bbh_it_would_not_read_rather_than_averaging_the_rest(tmp_path, monkeypatch):
    """The score is the mean over the subtasks read: one skipped unseen changes it."""
    ran = []
    monkeypatch.setitem(ev.TASKS, "arc", lambda ctx: ran.append("arc"))
    bbh = tmp_path / "evals" / "bbh"
    shutil.copytree(FIXTURES, tmp_path / "evals")
    (bbh / "sub2").mkdir()
    shutil.copy(bbh / "boolean_expressions.jsonl", bbh / "sub2" / "train.jsonl")
    (bbh / "sub3").mkdir()
    shutil.copy(bbh / "boolean_expressions.jsonl", bbh / "sub3" / "validation.jsonl")
    (bbh / "sub4.jsonl.gz").write_bytes(b"\x1f\x8b")
    for doc in ("README.md", "LICENSE", "bbh.py"):  # what a hub snapshot holds besides the data: not refused
        (bbh / doc).write_text("not data\n")
    with pytest.raises(DataError, match=r"bbh: holds sub2/ \(no test split\), sub3/ \(no test split\), "
                                        r"sub4\.jsonl\.gz, which no BBH subtask is read from"):
        ev.evaluate_tasks(None, None, ["arc", "bbh"], str(tmp_path / "evals"))
    for path in ("sub2", "sub3"):
        shutil.rmtree(bbh / path)
    os.remove(bbh / "sub4.jsonl.gz")
    (bbh / "boolean_expressions").mkdir()
    shutil.copy(bbh / "boolean_expressions.jsonl", bbh / "boolean_expressions" / "test.jsonl")
    with pytest.raises(DataError, match=r"bbh: holds subtask boolean_expressions twice"):
        ev.evaluate_tasks(None, None, ["arc", "bbh"], str(tmp_path / "evals"))
    assert ran == []
    shutil.rmtree(bbh / "boolean_expressions")
    assert sorted(ev.bbh_subtasks(str(tmp_path / "evals"))) == ["boolean_expressions", "sports_understanding"]


@pytest.mark.parametrize("task,split,edit,message", [
    ("gsm8k", "gsm8k/test.jsonl", lambda r: {**r, "answer": "so #### twelve"}, "gsm8k ground truth is not a number"),
    ("gsm8k", "gsm8k/train.jsonl", lambda r: {"q": r["question"], "answer": r["answer"]}, "question"),
    ("gsm8k", "gsm8k/train.jsonl", lambda r: {**r, "answer": "12 eggs in all."}, "answer has no '#### <number>' line"),
    ("ifeval", "ifeval/train.jsonl", lambda r: {**r, "instruction_id_list": ["punctuation:no_commas"]},
     "unknown instruction id 'punctuation:no_commas'"),
    ("ifeval", "ifeval/train.jsonl", lambda r: {**r, "instruction_id_list": ["detectable_format:number_highlighted_sections"],
                                                "kwargs": ["two"]}, "kwargs must be a list of one dict of arguments"),
    ("ifeval", "ifeval/train.jsonl", lambda r: {**r, "instruction_id_list": ["keywords:existence"], "kwargs": [{}]},
     "missing kwarg 'keywords'"),
    ("ifeval", "ifeval/train.jsonl", lambda r: {**r, "instruction_id_list": [], "kwargs": []},
     "instruction_id_list is empty")])
def test_a_bad_row_fails_before_any_generation_naming_its_line(loaded, tmp_path, monkeypatch, task, split, edit,
                                                               message):
    shutil.copytree(FIXTURES, tmp_path / "evals")
    path = tmp_path / "evals" / split
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(edit(r) if i == 1 else r) + "\n" for i, r in enumerate(rows)))
    monkeypatch.setattr(ev, "generate_until", lambda *a, **k: pytest.fail("generated before checking the rows"))
    with pytest.raises(DataError, match=f"{re.escape(str(path))} line 2: .*{message}"):
        ev.evaluate_tasks(*loaded, [task], str(tmp_path / "evals"))


def with_first_row(tmp_path, rel, edit):
    """A copy of the fixtures whose split `rel` is rewritten as a .jsonl file with its first row edited; its path."""
    shutil.copytree(FIXTURES, tmp_path / "evals")
    split = ev.find_split(str(tmp_path / "evals"), rel)
    rows = [row for _, row in read_rows(split)]
    for old in glob.glob(split):
        os.remove(old)
    path = tmp_path / "evals" / f"{rel}.jsonl"
    path.write_text("".join(json.dumps(edit(r) if i == 0 else r) + "\n" for i, r in enumerate(rows)))
    return path


def refused_before_scoring(loaded, monkeypatch, path, task, message):
    """Asserts that evaluating `task`, in the chat template or not, fails on line 1 of path with `message`, before
    any generation or log-likelihood is computed."""
    monkeypatch.setattr(ev, "generate_until", lambda *a, **k: pytest.fail("generated before checking the rows"))
    monkeypatch.setattr(ev, "continuation_logprobs", lambda *a, **k: pytest.fail("scored before checking the rows"))
    data_dir = str(path).split(os.sep + "evals" + os.sep)[0] + os.sep + "evals"
    for use_chat_template in (True, False):
        with pytest.raises(DataError, match=f"^{re.escape(str(path))} line 1: {message}"):
            ev.evaluate_tasks(*loaded, [task], data_dir, use_chat_template=use_chat_template)


@pytest.mark.parametrize("task,rel,edit,message", [
    ("hellaswag", "hellaswag/validation", lambda r: {**r, "endings": "abcd"}, "endings must be a list of strings"),
    ("hellaswag", "hellaswag/validation", lambda r: {**r, "endings": json.dumps(r["endings"])},
     "endings must be a list of strings"),
    ("hellaswag", "hellaswag/validation", lambda r: {**r, "endings": {"a": "x", "b": "y"}},
     "endings must be a list of strings"),
    ("hellaswag", "hellaswag/validation", lambda r: {**r, "endings": ["x", 7, None]},
     "endings must be a list of strings"),
    ("hellaswag", "hellaswag/validation", lambda r: {**r, "ctx_b": 5}, "ctx_b must be a string, got int 5"),
    ("hellaswag", "hellaswag/validation", lambda r: {**r, "ctx_a": 5}, "ctx_a must be a string"),
    ("hellaswag", "hellaswag/validation", lambda r: {**r, "activity_label": ["x"]}, "activity_label must be a string"),
    ("arc", "arc/ARC-Easy/test", lambda r: {**r, "choices": {"text": "xyz", "label": "ABC"}},
     "choices.label must be a list of strings"),
    ("arc", "arc/ARC-Easy/test", lambda r: {**r, "choices": {"text": {"a": 1, "b": 2}, "label": ["A", "B"]}},
     "choices.text must be a list of strings"),
    ("arc", "arc/ARC-Easy/test", lambda r: {**r, "choices": {"text": ["x", None, 5], "label": ["A", "B", "C"]}},
     "choices.text must be a list of strings"),
    ("arc", "arc/ARC-Easy/test", lambda r: {**r, "choices": json.dumps(r["choices"])}, "choices must be {'text'"),
    ("arc", "arc/ARC-Easy/test", lambda r: {**r, "question": 42}, "question must be a string"),
    ("arc", "arc/ARC-Easy/test", lambda r: {**r, "question": {"stem": "Q?"}}, "question must be a string"),
    ("piqa", "piqa/validation", lambda r: {**r, "sol1": 5}, "sol1 must be a string"),
    ("piqa", "piqa/validation", lambda r: {**r, "sol1": ["a"]}, "sol1 must be a string"),
    ("piqa", "piqa/validation", lambda r: {**r, "goal": 5}, "goal must be a string"),
    ("piqa", "piqa/validation", lambda r: {**r, "sol2": None}, "field 'sol2' is null"),
    ("mmlu_pro", "mmlu_pro/test", lambda r: {**r, "question": [42]}, "question must be a string"),
    ("mmlu_pro", "mmlu_pro/test", lambda r: {**r, "category": 3}, "category must be a string"),
    ("gsm8k", "gsm8k/test", lambda r: {**r, "answer": 70}, "answer must be a string, got int 70"),
    ("gsm8k", "gsm8k/test", lambda r: {**r, "answer": ["#### 70"]}, "answer must be a string"),
    ("gsm8k", "gsm8k/test", lambda r: {**r, "question": 5}, "question must be a string"),
    ("gsm8k", "gsm8k/train", lambda r: {**r, "answer": 70}, "answer must be a string"),
    ("gsm8k", "gsm8k/train", lambda r: {**r, "question": 5}, "question must be a string"),
    ("bbh", "bbh/boolean_expressions", lambda r: {**r, "input": 5}, "input must be a string"),
    ("bbh", "bbh/boolean_expressions", lambda r: {**r, "target": ["False"]}, "target must be a string"),
    ("bbh", "bbh/boolean_expressions", lambda r: {**r, "target": False}, "target must be a string"),
    ("bbh", "bbh/boolean_expressions", lambda r: {**r, "target": float("nan")}, "target must be a string"),
    ("bbh", "bbh/boolean_expressions", lambda r: {**r, "target": 4}, "target must be a string"),
    ("bbh", "bbh/boolean_expressions", lambda r: {**r, "target": " "}, "target ' ' is blank"),
    ("ifeval", "ifeval/train", lambda r: {**r, "prompt": 5}, "prompt must be a string")])
def test_a_text_field_or_choice_list_of_the_wrong_type_is_refused_before_scoring_naming_file_line_and_field(
        loaded, tmp_path, monkeypatch, task, rel, edit, message):
    """Formatted into the prompt as its repr, or its characters scored as choices, it would be scored silently."""
    refused_before_scoring(loaded, monkeypatch, with_first_row(tmp_path, rel, edit), task, message)


def test_a_bad_row_of_the_last_task_stops_the_run_before_the_first_task_scores(loaded, tmp_path, monkeypatch):
    """Each task checked its rows when it started: a bad BBH row stopped the run after GSM8K and IFEval had generated
    (hours on a GPU), and their results were not kept."""
    path = with_first_row(tmp_path, "bbh/boolean_expressions", lambda r: {**r, "input": 5})
    monkeypatch.setattr(ev, "generate_until", lambda *a, **k: pytest.fail("generated before checking every task"))
    monkeypatch.setattr(ev, "continuation_logprobs", lambda *a, **k: pytest.fail("scored before checking every task"))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))} line 1: input must be a string"):
        ev.evaluate_tasks(*loaded, ["arc", "gsm8k", "ifeval", "bbh"], str(tmp_path / "evals"))


@pytest.mark.parametrize("task,rel,edit,name", [
    ("gsm8k", "gsm8k/test", lambda r: {**r, "question": "a\ud800b"}, "question"),
    ("gsm8k", "gsm8k/train", lambda r: {**r, "question": "a\ud800b"}, "question"),  # a few-shot example
    ("arc", "arc/ARC-Easy/test", lambda r: {**r, "choices": {"text": ["x", "y\udc00", "z"], "label": ["A", "B", "C"]}},
     r"choices\.text\[1\]"),
    ("piqa", "piqa/validation", lambda r: {**r, "sol2": "\udc00"}, "sol2"),
    ("hellaswag", "hellaswag/validation", lambda r: {**r, "ctx_a": "\ud800"}, "ctx_a"),
    ("mmlu_pro", "mmlu_pro/test", lambda r: {**r, "options": ["x", "\ud800"] + r["options"][2:]}, r"options\[1\]"),
    ("bbh", "bbh/boolean_expressions", lambda r: {**r, "input": "\ud800"}, "input"),
    ("ifeval", "ifeval/train", lambda r: {**r, "prompt": "\ud800"}, "prompt")])
def test_a_lone_surrogate_is_refused_before_scoring_naming_file_line_and_field_not_a_chat_message(
        loaded, tmp_path, monkeypatch, task, rel, edit, name):
    """Without this the tokenizer fails with no row named, or the chat renderer names a message number."""
    path = with_first_row(tmp_path, rel, edit)
    refused_before_scoring(loaded, monkeypatch, path, task, f"{name} has a lone surrogate")


def ifeval_row(instruction, kwargs):
    return lambda r: {**r, "instruction_id_list": [instruction], "kwargs": [kwargs]}


@pytest.mark.parametrize("edit,message", [
    (ifeval_row("keywords:existence", {"keywords": "banana"}),
     "instruction 'keywords:existence': keywords must be a list of strings, got 'banana'"),
    (ifeval_row("keywords:existence", {"keywords": ["banana", 5]}),
     "instruction 'keywords:existence': keywords must be a list of strings"),
    (ifeval_row("keywords:forbidden_words", {"forbidden_words": "xyz"}),
     "instruction 'keywords:forbidden_words': forbidden_words must be a list of strings"),
    (ifeval_row("language:response_language", {"language": "english"}),
     "instruction 'language:response_language': language must be a language code"),
    (ifeval_row("language:response_language", {"language": 5}), "language must be a language code"),
    (ifeval_row("detectable_format:number_bullet_lists", {"num_bullets": "2"}),
     "instruction 'detectable_format:number_bullet_lists': num_bullets must be a whole number >= 0, got '2'"),
    (ifeval_row("length_constraints:number_words", {"relation": "less than", "num_words": float("nan")}),
     "num_words must be a whole number >= 0, got nan"),
    (ifeval_row("length_constraints:number_words", {"relation": "less than", "num_words": float("inf")}),
     "num_words must be a whole number >= 0, got inf"),
    (ifeval_row("length_constraints:number_words", {"relation": "less than", "num_words": True}),
     "num_words must be a whole number >= 0, got True"),
    (ifeval_row("length_constraints:number_words", {"relation": "exactly", "num_words": 5}),
     "relation must be 'less than' or 'at least'"),
    (ifeval_row("detectable_format:number_highlighted_sections", {"num_highlights": -1}),
     "num_highlights must be a whole number >= 0, got -1"),
    (ifeval_row("length_constraints:nth_paragraph_first_word",
                {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": 5}), "first_word must be a string, got 5"),
    (ifeval_row("length_constraints:nth_paragraph_first_word",
                {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "so"}),
     "nth_paragraph 3 of 2 paragraphs, which no response can follow"),
    (ifeval_row("punctuation:no_comma", {"foo": 5}),
     r"instruction 'punctuation:no_comma' takes no argument 'foo' \(its arguments: none\)"),
    (lambda r: {**r, "instruction_id_list": "punctuation:no_comma"},
     "instruction_id_list must be a list of instruction ids, got 'punctuation:no_comma'"),
    (lambda r: {**r, "kwargs": json.dumps(r["kwargs"])}, "kwargs must be a list of one dict of arguments")])
def test_an_ifeval_argument_of_the_wrong_kind_is_refused_at_load_naming_file_line_instruction_and_argument(
        loaded, tmp_path, monkeypatch, edit, message):
    """Unchecked, a string of keywords was checked character by character, a string count or an unknown language
    code failed every response and an infinite one passed it, and a wrong item failed with a traceback only once
    everything was generated."""
    path = with_first_row(tmp_path, "ifeval/train", edit)
    refused_before_scoring(loaded, monkeypatch, path, "ifeval", f"ifeval: .*{message}")


@pytest.mark.parametrize("label", ["\u00b2", "\u0663", "\uff11"])
def test_a_hellaswag_label_in_digits_other_than_ascii_is_refused_not_read_as_a_number(loaded, tmp_path, monkeypatch,
                                                                                        label):
    path = with_first_row(tmp_path, "hellaswag/validation", lambda r: {**r, "label": label})
    refused_before_scoring(loaded, monkeypatch, path, "hellaswag", "label must be a whole number")


@pytest.mark.parametrize("task,rel,edit,message", [
    ("arc", "arc/ARC-Easy/test", lambda r: {**r, "choices": {"text": ["x"], "label": ["A"]}},
     "choices.label has 1 choice"),
    ("hellaswag", "hellaswag/validation", lambda r: {**r, "endings": ["x"]}, "endings has 1 choice"),
    ("mmlu_pro", "mmlu_pro/test", lambda r: {**r, "options": ["x"], "answer_index": 0, "answer": "A"},
     "options has 1 choice"),
    ("arc", "arc/ARC-Easy/test", lambda r: {**r, "choices": {"text": ["x", "y", "z"], "label": ["A", "A", "B"]}},
     r"choices\.label \['A', 'A', 'B'\] holds a label twice")])
def test_a_multiple_choice_row_whose_gold_is_not_a_real_choice_among_several_is_refused(loaded, tmp_path, monkeypatch,
                                                                                        task, rel, edit, message):
    """One choice scores correct whatever the model prefers; a repeated label leaves the gold one to whichever comes
    first."""
    refused_before_scoring(loaded, monkeypatch, with_first_row(tmp_path, rel, edit), task, message)


def test_an_mmlu_pro_answer_letter_that_disagrees_with_answer_index_is_said_and_answer_index_scored(
        loaded, tmp_path, monkeypatch, capsys):
    path = with_first_row(tmp_path, "mmlu_pro/test", lambda r: {**r, "answer": "C", "answer_index": 1})
    results = ev.evaluate_tasks(*loaded, ["mmlu_pro"], str(tmp_path / "evals"))
    assert results["mmlu_pro"]["examples"][0]["gold"] == 1
    assert (f"mmlu_pro: 1 row(s) whose answer letter disagrees with answer_index, which is what is scored (first: "
            f"{path} line 1: answer 'C', answer_index 1 (B))") in capsys.readouterr().out


@pytest.mark.parametrize("rel", ["gsm8k/test", "gsm8k/train"])
def test_a_gsm8k_answer_with_two_answer_marks_is_refused_not_scored_on_either(loaded, tmp_path, monkeypatch, rel):
    """lighteval's qem would score against the first '#### N', the reported reference be the last."""
    path = with_first_row(tmp_path, rel, lambda r: {**r, "answer": "so 5.\n#### 5\n#### 70"})
    refused_before_scoring(loaded, monkeypatch, path, "gsm8k", "answer has 2 '####' answer marks")


def test_a_gsm8k_answer_with_paragraphs_is_scored_on_its_final_number(loaded, monkeypatch):
    """Generation stops at the next "Question:", not at a blank line inside a worked answer."""
    model, tok = loaded
    answer = tok.encode(" 6 plus 6.\n\nThat makes 12 in all.\n#### 12\n\nQuestion: next")

    def scripted(model, prompts, max_new_tokens, **kwargs):
        return Generation([answer for _ in prompts], [[0.0] * len(answer) for _ in prompts], [False] * len(prompts))
    monkeypatch.setattr(ev, "generate", scripted)
    result = ev.evaluate_tasks(model, tok, ["gsm8k"], FIXTURES, max_new_tokens=64, use_chat_template=False)["gsm8k"]
    assert all(e["output"] == " 6 plus 6.\n\nThat makes 12 in all.\n#### 12\n\n" for e in result["examples"])
    assert [e["score"] for e in result["examples"]] == [float(e["reference"] == "12") for e in result["examples"]]


def test_bad_row_names_the_file_and_field(loaded, tmp_path):
    model, tok = loaded
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text(json.dumps({"goal": "g", "sol1": "a", "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"validation\.jsonl.*'sol2'"):
        ev.evaluate_tasks(model, tok, ["piqa"], str(tmp_path))


def test_a_gold_label_outside_the_choices_or_an_empty_split_is_an_error_not_a_zero(loaded, tmp_path):
    model, tok = loaded

    def write(rel, rows):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("piqa/validation.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": -1}])  # the unlabelled split
    with pytest.raises(DataError, match=r"validation\.jsonl line 1: label -1 does not index its 2 choices"):
        ev.evaluate_tasks(model, tok, ["piqa"], str(tmp_path))
    write("hellaswag/validation.jsonl", [{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"],
                                          "label": "7"}])
    with pytest.raises(DataError, match=r"label 7 does not index its 2 choices"):
        ev.evaluate_tasks(model, tok, ["hellaswag"], str(tmp_path))
    # a fractional label would be truncated to a choice, a word would not name one
    for label in (0.9, "first", True):
        write("piqa/validation.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": label}])
        with pytest.raises(DataError, match=r"validation\.jsonl line 1: label must be a whole number"):
            ev.evaluate_tasks(model, tok, ["piqa"], str(tmp_path))
    # options stored as one string would become one option per character
    write("mmlu_pro/test.jsonl", [{"question": "q", "options": "['3', '4']", "answer_index": 0, "category": "math"}])
    with pytest.raises(DataError, match=r"test\.jsonl line 1: options must be a list of strings"):
        ev.evaluate_tasks(model, tok, ["mmlu_pro"], str(tmp_path))
    # an empty ARC-Challenge would score 0 and halve the ARC average
    write("arc/ARC-Easy/test.jsonl", [{"question": "q", "choices": {"label": ["A", "B"], "text": ["x", "y"]},
                                       "answerKey": "A"}])
    write("arc/ARC-Challenge/test.jsonl", [])
    with pytest.raises(DataError, match=r"ARC-Challenge/test\.jsonl: no rows"):
        ev.evaluate_tasks(model, tok, ["arc"], str(tmp_path))


def test_hellaswag_query_is_smollms(loaded, tmp_path):
    """ctx_a + ' ' + ctx_b.capitalize() (which lowercases the rest) + ' ', then the WikiHow bracket clean-up."""
    model, tok = loaded
    (tmp_path / "hellaswag").mkdir()
    row = {"activity_label": "Playing guitar", "ctx_a": "A man holds a guitar.", "ctx_b": "then, John plays a G",
           "endings": ["chord [step] on the Fender.", "song."], "label": "0"}
    (tmp_path / "hellaswag" / "validation.jsonl").write_text(json.dumps(row) + "\n")
    (doc,) = ev.evaluate_tasks(model, tok, ["hellaswag"], str(tmp_path))["hellaswag"]["examples"]
    assert doc["query"] == "Playing guitar: A man holds a guitar. Then, john plays a g "
    assert doc["choices"] == [" chord on the Fender.", " song."]


@pytest.mark.parametrize("text,clean", [
    ("  sings loudly. ", " sings loudly. "),  # not stripped: smollm comments lm-eval's strip() out
    ("Make tea [title] Boil water.", "Make tea. Boil water."),  # " [title]" ends a sentence, before brackets go
    ("Boil water [title]", "Boil water. "),  # ". " whole, even with nothing after it
    ("a [header] b [step] c", "a b c"),  # each bracket pair on its own, not from the first '[' to the last ']'
    ("[step] Pour it.", " Pour it."),  # the space after a bracket stays
    ("one  two   three", "one two  three"),  # one pass of double spaces to one, as lm-eval's str.replace
])
def test_hellaswag_preprocessing_is_smollms_rule_by_rule(text, clean):
    assert ev.hellaswag_preprocess(text) == clean


@pytest.mark.parametrize("flag", ["--batch_size=0", "--batch_size=-1", "--max_new_tokens=-3", "--limit=0"])
def test_a_count_below_one_is_refused_not_scored_as_nothing(flag, capsys):
    with pytest.raises(SystemExit):
        ev.main([flag])
    assert f"--{flag[2:].split('=')[0]} must be at least 1" in capsys.readouterr().err


def test_missing_model_tells_to_train_the_demo_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="train_sft.py"):
        ev.main([])
    with pytest.raises(SystemExit) as e:  # a model the user named is not the demo's
        ev.main(["--model=elsewhere"])
    assert "no model at elsewhere" in str(e.value) and "train_sft.py" not in str(e.value)


def test_a_reward_models_folder_is_refused_as_the_model_to_evaluate(model_dir, tmp_path):
    """It is a causal-LM folder plus value_head.safetensors, and would be scored as the generator it is not."""
    from safetensors.torch import save_file
    rm = tmp_path / "rm"
    shutil.copytree(model_dir, rm)
    save_file({"score.weight": torch.zeros(1, 8)}, str(rm / common.VALUE_HEAD))
    with pytest.raises(SystemExit, match=rf"error: {rm}: a reward model's folder \(value_head.safetensors.*"
                                         "--value_model"):
        ev.main([f"--model={rm}", f"--out={tmp_path / 'eval.json'}", "--demo_seed=0"])


def test_the_demo_evaluation_takes_the_split_of_the_run_that_trained_the_model_and_says_a_missing_template(
        model_dir, tmp_path, monkeypatch, capsys):
    """A model trained on --demo_seed=3 was scored on seed 0's held-out rows, which seed 3 partly trains on; a
    folder without tokenizer_config.json was scored with tulu whatever it was trained with, and nothing said so."""
    shutil.copytree(model_dir, tmp_path / "run" / "final")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"demo_seed": 3, "lr": 0.1}))
    seeds = []
    monkeypatch.setattr(ev, "make_demo_data", lambda seed: seeds.append(seed) or {})
    monkeypatch.setattr(ev, "run_demo_eval", lambda *a, **k: ({f"{t}_{m}": 0 for t in ("arith", "constraint", "pref")
                                                               for m in ("acc", "n")}, {}))
    final, out = str(tmp_path / "run" / "final"), str(tmp_path / "eval.json")
    assert ev.main([f"--model={final}", f"--out={out}"])["demo_seed"] == 3
    assert ev.main([f"--model={final}", f"--out={out}", "--demo_seed=0"])["demo_seed"] == 0
    assert seeds[:2] == [3, 0] and json.load(open(out))["demo_seed"] == 0
    (tmp_path / "run" / "config.json").write_text("[1, 2]")  # not a trainer's run config: the trainers' default
    assert ev.main([f"--model={final}", f"--out={out}"])["demo_seed"] == 0
    assert Tokenizer.from_pretrained(final).chat_template is None  # (the fixture's tokenizer saves none)
    assert f"{final} has no saved chat template: prompts use tulu (--template chooses)" in capsys.readouterr().out
    assert ev.main([f"--model={final}", f"--out={out}", "--template=tulu"])["template"] == "tulu"
    assert "has no saved chat template" not in capsys.readouterr().out


def test_the_demo_evaluation_of_a_model_outside_a_run_folder_says_the_demo_seed_it_assumed(model_dir, tmp_path,
                                                                                          monkeypatch, capsys):
    """Without a run config.json to read it from, seed 0's held-out split was scored and nothing said so: a model
    trained on another seed partly trains on those rows."""
    shutil.copytree(model_dir, tmp_path / "model")
    monkeypatch.setattr(ev, "make_demo_data", lambda seed: {})
    monkeypatch.setattr(ev, "run_demo_eval", lambda *a, **k: ({f"{t}_{m}": 0 for t in ("arith", "constraint", "pref")
                                                               for m in ("acc", "n")}, {}))
    model, out = str(tmp_path / "model"), str(tmp_path / "eval.json")
    assert ev.main([f"--model={model}", f"--out={out}"])["demo_seed"] == 0
    assert (f"demo split of demo_seed=0, the trainers' default: no config.json of a run folder holding {model} "
            f"records the demo_seed it was trained on (--demo_seed=N sets it)") in capsys.readouterr().out
    assert ev.main([f"--model={model}", f"--out={out}", "--demo_seed=0"])["demo_seed"] == 0  # chosen: nothing to say
    assert "demo split of" not in capsys.readouterr().out


def test_a_model_trained_on_real_data_is_not_scored_on_the_demo_task_unless_asked(model_dir, tmp_path, monkeypatch):
    shutil.copytree(model_dir, tmp_path / "run" / "final")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"demo_seed": 0, "data": "mixture/*.parquet"}))
    final, out = str(tmp_path / "run" / "final"), str(tmp_path / "eval.json")
    with pytest.raises(common.ConfigError, match=r"--model=\S+ was trained on --data=mixture/\*.parquet \(\S+"
                                                 r"config.json\), not on the synthetic demo task .* pass --data_dir"):
        ev.main([f"--model={final}", f"--out={out}"])
    monkeypatch.setattr(ev, "run_demo_eval", lambda *a, **k: ({f"{t}_{m}": 0 for t in ("arith", "constraint", "pref")
                                                               for m in ("acc", "n")}, {}))
    assert ev.main([f"--model={final}", f"--out={out}", "--demo_seed=0"])["mode"] == "demo"
