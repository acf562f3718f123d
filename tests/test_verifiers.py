import json
import os
import time

import pytest

import verifiers as V

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "ifeval_sample.jsonl")

# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("response", [
    "So she has 1234 apples.", "The answer is $1,234.", "#### 1234", "1,234.00", "x = 1234.0",
    "First 5, then 12, finally 1234", "answer: 1234\n",
])
def test_gsm8k_written_forms_match(response):
    assert V.gsm8k(response, "She buys 3 more.\n#### 1,234") == 1.0


@pytest.mark.parametrize("response", ["1234 was close but the answer is 1235", "no number", "12.34", "-1234"])
def test_gsm8k_wrong_answers(response):
    assert V.gsm8k(response, "1234") == 0.0


def test_gsm8k_negative_and_decimal():
    assert V.gsm8k("It drops to -7 degrees.", "#### -7") == 1.0
    assert V.gsm8k("It costs 3.5 dollars.", "3.50") == 1.0


def test_gsm8k_strict_needs_hash_form():
    assert V.gsm8k("so #### 42", "42", strict=True) == 1.0
    assert V.gsm8k("the answer is 42", "42", strict=True) == 0.0
    assert V.gsm8k("the answer is 42", "42") == 1.0


def test_gsm8k_bad_ground_truth():
    for truth in ("#### forty", "nan", "Infinity", "sNaN"):
        with pytest.raises(ValueError, match="gsm8k ground truth"):
            V.gsm8k("1", truth)


def test_gsm8k_a_hyphen_after_a_word_is_not_a_minus():
    assert V.gsm8k("The shop is open 9-10", "10") == 1.0
    assert V.gsm8k("From page 3-5 we get x=-5", "-5") == 1.0


def test_gsm8k_strict_reads_the_first_hash_answer():
    # lm-eval's strict-match takes the first "#### N"; a later correction does not count
    assert V.gsm8k("#### 5\nwait, #### 7", "5", strict=True) == 1.0
    assert V.gsm8k("#### 5\nwait, #### 7", "7", strict=True) == 0.0


def test_gsm8k_reads_a_leading_point_decimal_as_a_fraction_not_its_digits():
    assert V.gsm8k("The answer is .5", "5") == 0.0  # it read 5 (the reward for 5 given for 0.5)
    assert V.gsm8k("The answer is .5", "0.5") == 1.0
    assert V.gsm8k("It falls by -.25 and costs $.50", "0.5") == 1.0
    assert V.gsm8k("version 1.2.3", "3") == 1.0  # a point after a digit still ends the number before it
    assert V.gsm8k("#### .5", "0.5", strict=True) == 1.0 and V.gsm8k("#### .5", "5", strict=True) == 0.0


def test_gsm8k_a_hyphen_after_a_closing_parenthesis_is_a_minus_sign():
    assert V.gsm8k("the result is (x+1)-3", "3") == 1.0
    assert V.gsm8k("the result is (x+1)-3", "-3") == 0.0

# ----------------------------------------------------------------------------- MATH
# Verdicts are open-instruct's Tulu 3-era verify_math_sample's (checked against a copy of it, sympy 1.14, antlr4 4.11).

NO_SYMPY = (f"sympy's LaTeX parser is unavailable ({V._no_sympy.split(',')[0]}): "
            "install sympy and antlr4-python3-runtime==4.11")
needs_sympy = pytest.mark.skipif(V._parse_latex is None, reason=NO_SYMPY)


@pytest.fixture(params=["sympy", "builtin"])
def backend(request, monkeypatch):
    """Runs a test with each MATH backend: the verdicts it checks do not depend on sympy."""
    if request.param == "sympy" and V._parse_latex is None:
        pytest.skip(NO_SYMPY)
    if request.param == "builtin":
        monkeypatch.setattr(V, "_parse_latex", None)
    return request.param


@pytest.mark.parametrize("response,truth", [
    ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("so \\boxed{0.5}", "\\frac12"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, 4 \\right)}", "(3,4)"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{\\$18.90}", "18.90"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{10 \\text{ cm}}", "10"),
    ("\\boxed{2\\sqrt3}", "2\\sqrt{3}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}"),
    ("\\boxed 7$", "7"),
    ("we get \\boxed{3} then \\boxed{4}", "4"),
    ("Final Answer: The final answer is $12$. I hope it is correct.", "12"),
    ("Thus $y = 3$ and finally $x=\\frac{1}{4}$", "\\frac{1}{4}"),
    ("\\boxed{.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac1{72}}", "\\frac{1}{72}"),
    # the same exact value: sympy's check, and the built-in stand-in for it
    ("\\boxed{0.50}", "\\frac{1}{2}"),
    ("\\boxed{1000.00}", "1000"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{10000}", "10,\\!000"),
    ("\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}"),
    ("\\boxed{\\frac{-1}{-2}}", "\\frac{1}{2}"),  # two minus signs cancel
    ("\\boxed{-\\frac{-3}{-4}}", "-0.75"),  # and a third one does not
    ("x=\\boxed{1.5}", "\\frac{3}{2}"),
    # no boxed, Minerva or $...$ answer: the whole response, normalised
    ("10", "10"),
    ("x = 10", "10"),
], ids=range(29))
def test_math_equivalent_forms(backend, response, truth):
    assert V.math(response, truth) == 1.0


@pytest.mark.parametrize("response,truth", [
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"), ("no answer at all", "3"), ("\\boxed{3", "3"), ("\\boxed{12}", "1"),
    ("\\boxed{0.51}", "\\frac{1}{2}"), ("\\boxed{12}", "1,2"), ("the answer is 10", "10"),
    ("\\boxed{50%}", "50"),  # Hendrycks' normalisation drops only LaTeX's \\%
    ("\\boxed{\\frac{-1}{-2}}", "-\\frac{1}{2}"), ("\\boxed{\\frac{1}{-2}}", "\\frac{1}{2}"),
    ("\\boxed{x+y=5}", "5"),  # only a left side of at most two characters ("x =", "k=") is dropped
    # the reference rejects these: remove_boxed accepts only '\boxed{', strip_string keeps a trailing period,
    # and neither it nor sympy reads {,} as a thousands separator
    ("\\fbox{7}", "7"), ("\\boxed{5.}", "5"), ("\\boxed{(1,2).}", "(1,2)"), ("\\boxed{10{,}000}", "10000"),
    ("\\boxed{3\\text{ a}\\text{ b}}", "3"),  # two unit markers: strip_string fails, the raw strings differ
], ids=range(16))
def test_math_wrong(backend, response, truth):
    assert V.math(response, truth) == 0.0


def test_math_truth_may_be_a_solution():
    assert V.math("\\boxed{6}", "so the answer is \\boxed{6}.") == 1.0
    with pytest.raises(ValueError, match="MATH ground truth"):
        V.math("\\boxed{6}", "   ")


def test_math_zero_denominator_is_not_a_number():
    assert V.math("\\boxed{\\frac{1}{0}}", "\\frac{2}{0}") == 0.0


# the review's table (open-instruct accepts each pair by sympy.simplify(a - b) == 0)
SYMBOLIC = [("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}"),
            ("\\boxed{x+1}", "1+x"), ("\\boxed{3x^2+2x}", "2x+3x^2"), ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}"),
            ("\\boxed{a/b}", "\\frac{a}{b}"), ("\\boxed{x / 2}", "x/2")]


@needs_sympy
@pytest.mark.parametrize("response,truth", SYMBOLIC)
def test_math_symbolic_equivalence_with_sympy(response, truth):
    assert V.math(response, truth) == 1.0


@pytest.mark.parametrize("response,truth", SYMBOLIC)
def test_math_symbolic_equivalence_is_missed_without_sympy(monkeypatch, response, truth):
    monkeypatch.setattr(V, "_parse_latex", None)
    assert V.math(response, truth) == 0.0


def test_math_string_and_number_rules_work_without_sympy(monkeypatch):
    monkeypatch.setattr(V, "_parse_latex", None)
    assert V.math("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}") == 1.0
    assert V.math("\\boxed{0.50}", "\\frac12") == 1.0
    assert V.math("\\boxed{1/3}", "\\frac12") == 0.0
    with pytest.raises(RuntimeError, match="sympy"):
        V.sympy_equiv("1", "1")


@needs_sympy
def test_sympy_check_fails_safe():
    assert V.sympy_equiv("\\frac{", "1") is False  # unparseable
    assert V.sympy_equiv("1+" * 600 + "1", "601") is False  # over the size guard (sympy would say equal)
    assert V.sympy_equiv("1+" * 10 + "1", "11") is True


def runaway_simplify(expr):  # a simplify that never ends, in Python code, where an alarm can stop it
    while True:
        time.sleep(0.01)


@needs_sympy
def test_sympy_check_times_out(monkeypatch):
    monkeypatch.setattr(V, "_SYMPY_SECONDS", 0.2)
    monkeypatch.setattr(V, "_simplify", runaway_simplify)
    t0 = time.perf_counter()
    assert V.sympy_equiv("x+1", "1+x") is False
    assert time.perf_counter() - t0 < 3.0


@needs_sympy
@pytest.mark.parametrize("huge", ["9^{9^{9^{9}}}", "(10^{500})^{99999}", "\\frac{1}{2^{10^{9}}}", "1000000!",
                                  "(10^{8})!", "\\binom{10^{9}}{5 \\cdot 10^{8}}"])
def test_sympy_check_refuses_numbers_no_alarm_could_stop(huge):
    """simplify evaluates 9^{9^{9^{9}}} in one C multiplication that runs for hours and that no alarm interrupts
    (the test above hung on it once the parser was warm: the alarm had fired during the first parse before)."""
    t0 = time.perf_counter()
    assert V.sympy_equiv(huge, "1") is False
    assert time.perf_counter() - t0 < 3.0
    assert V.sympy_equiv("2^{10}", "1024") and V.sympy_equiv("2^{1000}", "2^{999} \\cdot 2")  # ordinary powers
    assert V.sympy_equiv("\\binom{10}{3}", "120") and V.sympy_equiv("(3+2)!", "120")  # and factorials


@needs_sympy
def test_sympy_check_leaves_the_callers_alarm_handler_and_refuses_threads(monkeypatch):
    """Off the main thread no alarm can stop sympy: no symbolic verdict there (the reference's signal.signal call
    fails and it returns False), rather than a hang. And a timeout puts back the handler the caller had."""
    import signal
    import threading

    def caller_handler(signum, frame):
        pass
    previous = signal.signal(signal.SIGALRM, caller_handler)
    try:
        monkeypatch.setattr(V, "_SYMPY_SECONDS", 0.2)
        with monkeypatch.context() as stuck:
            stuck.setattr(V, "_simplify", runaway_simplify)
            assert V.sympy_equiv("x+1", "1+x") is False
        assert V.sympy_equiv("x+1", "1+x") is True
        assert signal.getsignal(signal.SIGALRM) is caller_handler
    finally:
        signal.signal(signal.SIGALRM, previous)
    in_thread = []
    thread = threading.Thread(target=lambda: in_thread.append(V.sympy_equiv("x+1", "1+x")))
    thread.start()
    thread.join()
    assert in_thread == [False]


def test_math_strips_the_response_first(backend):
    # as the Tulu 3 release's verify_math_sample: the Minerva pattern, read with "I hope it is correct." appended,
    # finds " I hope" only where the response ended in a space, which the strip removes
    assert V.math("Final Answer: The final answer is 5. ", "5") == 0.0
    assert V.math("Final Answer: The final answer is 5. I hope it is correct. \n", "5") == 1.0


@pytest.mark.parametrize("response,truth,verdict", [
    # the reference needs Minerva's exact line: "Final Answer: The final answer is X. I hope it is correct."
    ("The final answer is 5.", "5", 0.0),
    ("Final Answer: The final answer is $12$ cm. I hope it is correct.", "12", 1.0),  # normalised: $, units go
    ("Final Answer: The final answer is 5 dollars. I hope it is correct.", "5", 1.0),
    ("Final Answer: The final answer is 12. I hope it is correct.", "12", 1.0),
    ("Final Answer: The final answer is 12.\nI hope it is correct.", "12", 0.0),  # one line only
    # the first such line counts
    ("Final Answer: The final answer is 3. I hope it is correct.\nFinal Answer: The final answer is 4. I hope it "
     "is correct.", "3", 1.0),
    ("Final Answer: The final answer is 3. I hope it is correct.\nFinal Answer: The final answer is 4. I hope it "
     "is correct.", "4", 0.0),
    # the boxed and the Minerva answer are both tried
    ("\\boxed{3}. Final Answer: The final answer is 4. I hope it is correct.", "4", 1.0),
    ("\\boxed{3}. Final Answer: The final answer is 4. I hope it is correct.", "3", 1.0),
    # a '\boxed ' anywhere wins over a later \boxed{...}
    ("\\boxed 7$ and \\boxed{8}", "7", 1.0),
    ("\\boxed 7$ and \\boxed{8}", "8", 0.0),
])
def test_math_minerva_and_boxed_candidates(backend, response, truth, verdict):
    assert V.math(response, truth) == verdict


@pytest.mark.parametrize("raw,normalised", [
    ("x = 5", "5"),  # the text after the last '='
    ("$12$ cm", "12"),  # spaces, the unit word and '$' go
    ("10 \\text{ dollars}", "10"),
    ("5 degrees", "5"),
    ("90^\\circ", "90"),
    ("an apple", "apple"),  # "an " and "a " are substitutions, not words
    ("\\text{(A)}", "(A)"), ("\\textbf{7}", "7"), ("\\overline{AB}", "AB"), ("\\text{a}\\text{b}", "ab"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\frac12", "\\frac{1}{2}"), ("\\sqrt2", "\\sqrt{2}"),
    ("1,000,000", "1000000"), ("1,000.5", "1,000.5"),  # commas go only from a whole number
    ("4\\%", "4\\%"),  # Minerva keeps \%
    ("The answer is $x=3$ and $y=4$", "4"),  # '=' is split before the first $...$ is taken
    ("$1$ and $2$\n$3$ or $4$", "1\n3"),  # each line keeps its first $...$
    ("\\text{a\n}b}", "\\text{a\n}b}"),  # \text{...} does not span lines
])
def test_normalize_final_answer(raw, normalised):
    assert V.normalize_final_answer(raw) == normalised


def test_strip_string_removes_percent_signs_twice_as_the_reference():
    # math_utils.strip_string removes a backslash-percent in two passes: the first pass's removal can join a second
    assert V.strip_string(r"\\\\%%") == "" and V.strip_string(r"50\%") == "50"


def test_strip_string_names_what_it_cannot_normalise():
    for s in ("1\\text{ m}\\text{ s}", "2\\sqrt", "x/2"):
        with pytest.raises(ValueError, match="strip_string"):
            V.strip_string(s)
    assert V.hendrycks_equiv("x/2", "x/2") and not V.hendrycks_equiv("x / 2", "x/2")  # then raw strings compare

# ----------------------------------------------------------------------------- IFEval, one pass / fail per type

LONG = " ".join(["word"] * 120)
CASES = [  # (instruction id, kwargs, passing response, failing response)
    ("keywords:existence", {"keywords": ["Apple", "pear"]}, "an apple and a PEAR", "an apple only"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"}, "cat cat Cat", "cat cat"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "one cat", "cat cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "badge is fine", "that is Bad."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Zzz!", "zz top"),
    ("language:response_language", {"language": "de"},
     "Das Wetter ist heute sehr schön und der Park ist voller Menschen.",
     "The weather is very nice today and the park is full of people."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One here. Two here.", "One here. Two here. Three here."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "first\n***\nsecond", "first\n***\n\n***\nthird"),
    ("length_constraints:number_words", {"num_words": 100, "relation": "at least"}, LONG, "too short"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "first part\n\n\"Then, second part", "first part\n\nsecond part"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [address]", "[name] at address"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "hi\np.s. bye", "hi\nPS bye"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "hi\nP. P. S bye", "hi\nP.S. bye"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two", "* one\n** bold\n"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "- one\n* two", "* one\n* two\n- three"),  # exactly
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "My answer is perhaps."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and **b**", "*a* and * *"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nx\nSection 2\ny", "Section 1\nx\nsection 2\ny"),
    ("detectable_format:json_format", {}, "```json\n{\"a\": 1}\n```", "{'a': 1}"),
    ("detectable_format:title", {}, "<<My Title>>\ntext", "<<  >>\ntext"),
    ("combination:two_responses", {}, "one\n******\ntwo", "one\n******\none"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say HI. Hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. any other questions?\"",
     "Any other questions? Yes."),
    ("startend:quotation", {}, "  \"quoted\"  ", "\"half quoted"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THIS is VERY good", "This is VERY good"),
    ("change_case:english_capital", {}, "THIS IS ALL IN CAPITAL LETTERS, IN ENGLISH.",
     "THIS IS MOSTLY capital"),
    ("change_case:english_capital", {}, "THE PARK IS FULL OF PEOPLE AND THE WEATHER IS NICE.",
     "DER PARK IST VOLLER MENSCHEN UND DAS WETTER IST SCHÖN."),  # capitals, but not English
    ("change_case:english_lowercase", {}, "this is all in lowercase letters, in english.",
     "this is mostly Lowercase"),
    ("change_case:english_lowercase", {}, "the park is full of people and the weather is nice.",
     "der park ist voller menschen und das wetter ist schön."),  # lowercase, but not English
    ("punctuation:no_comma", {}, "no commas here", "one, comma"),
]


def test_every_instruction_type_has_cases():
    assert {c[0] for c in CASES} == set(V.IFEVAL_CHECKS) and len(V.IFEVAL_CHECKS) == 25


@pytest.mark.parametrize("inst,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_ifeval_instruction_pass_and_fail(inst, kwargs, good, bad):
    assert V.ifeval_instructions(good, [inst], [kwargs], prompt="p") == [True]
    assert V.ifeval_instructions(bad, [inst], [kwargs], prompt="p") == [False]


def test_empty_response_follows_nothing():
    assert V.ifeval_instructions("   ", ["punctuation:no_comma"], [{}], "p", loose=True) == [False]


def test_none_and_empty_kwargs_are_ignored():
    kw = {"keywords": ["x"], "num_words": None, "language": ""}
    assert V.ifeval_instructions("x", ["keywords:existence"], [kw], "p") == [True]


def test_unknown_instruction_and_missing_kwarg():
    with pytest.raises(ValueError, match="unknown instruction"):
        V.ifeval_instructions("x", ["nope:nope"], [{}], "p")
    with pytest.raises(ValueError, match="num_placeholders"):
        V.ifeval_instructions("x", ["detectable_content:number_placeholders"], [{}], "p")


def test_repeat_prompt_defaults_to_row_prompt():
    assert V.ifeval_instructions("Tell me. ok", ["combination:repeat_prompt"], [{}], "Tell me.") == [True]


@pytest.mark.parametrize("inst,kwargs,response,followed", [
    # a response with no letters cannot be judged for language: counted as followed
    ("language:response_language", {"language": "de"}, "12345", True),
    # the count must match too, and the first word is compared case-insensitively
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"},
     "first part\n\nThen second\n\nthird", False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"},
     "first part\n\nthen second", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "hi\nP. S. bye", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[a\nb] [c]", False),  # [...] within a line
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* *b* *c*", True),  # at least
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1 a Section 2 b Section 3 c", True),  # at least
    ("startend:quotation", {}, '"', False),  # one quote mark does not wrap anything
    ("startend:quotation", {}, '""', True),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one-two three", True),  # \w+ runs
    ("detectable_format:title", {}, "a>>b<<c", False),  # '>>' must close a '<<'
    # '*' then a newline is a bullet whose .*$ runs over the next line, so "* x" there is not a second one
    ("detectable_format:number_bullet_lists", {"num_bullets": 1}, "*\n* x", True),
    ("detectable_format:title", {}, "<< >> x>>", True),  # one match from the first '<<' to the last '>>'
    ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 3, "let_relation": "at least"}, "zzZ", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a\n***\nb\n***", True),  # a trailing divider
    ("combination:two_responses", {}, "a\n******\nb\n******", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "b"},
     "a\n\n\n\nb", False),  # the 2nd "\n\n" part is empty
])
def test_ifeval_instruction_edge_cases(inst, kwargs, response, followed):
    assert V.ifeval_instructions(response, [inst], [kwargs], prompt="p") == [followed]


def test_repeat_prompt_empty_kwarg_falls_back_to_row_prompt():
    kw = {"prompt_to_repeat": ""}
    assert V.ifeval_instructions("ok", ["combination:repeat_prompt"], [kw], "Tell me.") == [False]
    assert V.ifeval_instructions("Tell me. ok", ["combination:repeat_prompt"], [kw], "Tell me.") == [True]


# What nltk 3.10's word_tokenize returns for each (recorded with it): the built-in tokenizer, used where nltk or its
# punkt data is missing, must split exactly the same way. bench/ifeval_agreement.py compares the two on every IFEval
# prompt and on random strings.
TREEBANK_CASES = [
    ("I CANNOT do it.", ["I", "CAN", "NOT", "do", "it", "."]),
    ("DON’T STOP", ["DON", "’", "T", "STOP"]),
    ("See https://EN.WIKIPEDIA.ORG/WIKI/X_Y.", ["See", "https", ":", "//EN.WIKIPEDIA.ORG/WIKI/X_Y", "."]),
    ("AT&T and R&D!", ["AT", "&", "T", "and", "R", "&", "D", "!"]),
    ("'TIS the season, 'Twas", ["'", "TIS", "the", "season", ",", "'", "Twas"]),
    ('He said "HELLO" -- and LEFT...', ["He", "said", "``", "HELLO", "''", "--", "and", "LEFT", "..."]),
    ("ROCK'N'ROLL isn't DEAD'", ["ROCK'N'ROLL", "is", "n't", "DEAD", "'"]),
    ("It's 10:30, 3,000 USD (approx.)", ["It", "'s", "10:30", ",", "3,000", "USD", "(", "approx", ".", ")"]),
    ("WE'LL GONNA", ["WE", "'LL", "GON", "NA"]),
    ('The END.")  ', ["The", "END", ".", "''", ")"]),
]


@pytest.mark.parametrize("text,tokens", TREEBANK_CASES)
def test_builtin_word_tokenizer_splits_as_nltk(monkeypatch, text, tokens):
    monkeypatch.setattr(V, "_punkt", None)
    assert V.word_tokenize(text) == tokens


def test_builtin_sentence_splitter_reads_newlines_as_spaces(monkeypatch):
    monkeypatch.setattr(V, "_punkt", None)
    # "Inc." before a sentence starter ends a sentence, after a newline as after a space
    assert V.split_sentences("I met Acme Inc.\nHe left.") == ["I met Acme Inc", "He left."]


def test_capital_word_frequency_counts_treebank_words(monkeypatch):
    monkeypatch.setattr(V, "_punkt", None)
    def check(text, n):  # at least n capital words
        kwargs = {"capital_frequency": n, "capital_relation": "at least"}
        return V.ifeval_instructions(text, ["change_case:capital_word_frequency"], [kwargs], "p") == [True]

    assert check("I CANNOT GO", 4) and not check("I CANNOT GO", 5)  # CAN + NOT
    assert check("AT&T", 2) and not check("AT&T", 3)
    assert not check("EN.WIKIPEDIA.ORG/WIKI", 2)  # one word: Treebank does not split at slashes or dots

# ----------------------------------------------------------------------------- strict vs loose


def test_loose_variants_are_the_eight_reference_forms():
    v = V.loose_variants("*a*\nb\n*c*")
    assert v == ["*a*\nb\n*c*", "a\nb\nc", "b\n*c*", "*a*\nb", "b", "b\nc", "a\nb", "b"]


@pytest.mark.parametrize("inst,kwargs,response", [
    ("startend:quotation", {}, "Sure, here it is:\n\"quoted answer\""),             # first line removed
    ("startend:end_checker", {"end_phrase": "bye"}, "text bye\nHope this helps!"),  # last line removed
    ("detectable_format:json_format", {}, "Here:\n{\"a\": 1}\nDone."),              # both removed
    ("startend:end_checker", {"end_phrase": "bye"}, "text **bye**"),                # '*' removed
    ("change_case:english_lowercase", {}, "**Note**\nthis is lower case english text\n**End**"),
])
def test_loose_passes_where_strict_fails(inst, kwargs, response):
    assert V.ifeval_instructions(response, [inst], [kwargs], "p", loose=False) == [False]
    assert V.ifeval_instructions(response, [inst], [kwargs], "p", loose=True) == [True]


def test_prompt_and_instruction_level_aggregation():
    row = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}]}
    results = [V.ifeval_row(row, '"no comma"'), V.ifeval_row(row, '"a, b"'), V.ifeval_row(row, "Ok:\n\"x\"")]
    assert [r["inst_level_strict"] for r in results] == [[True, True], [False, True], [True, False]]
    agg = V.ifeval_aggregate(results)
    assert agg["prompt_level_strict_acc"] == pytest.approx(1 / 3)
    assert agg["inst_level_strict_acc"] == pytest.approx(4 / 6)
    assert agg["prompt_level_loose_acc"] == pytest.approx(2 / 3)
    assert agg["inst_level_loose_acc"] == pytest.approx(5 / 6)


def test_fixture_rows_cover_all_types_and_score():
    rows = [json.loads(line) for line in open(FIXTURE)]
    assert {i for r in rows for i in r["instruction_id_list"]} == set(V.IFEVAL_CHECKS)
    for r in rows:
        out = V.ifeval_row(r, "A short reply, in English.")
        assert len(out["inst_level_loose"]) == len(r["instruction_id_list"])
        assert all(s >= t for s, t in zip(out["inst_level_loose"], out["inst_level_strict"]))


def test_backends_are_reported():
    assert set(V.BACKENDS) == {"language", "sentences", "words", "math"}
    assert V.BACKENDS["math"].startswith("sympy" if V._parse_latex is not None else "builtin")

# ----------------------------------------------------------------------------- RLVR ground truth

RLVR = [  # (ground truth args, passing, failing)
    ({"func_name": "verify_keywords", "keyword_list": ["Apple"]}, "an apple", "a pear"),
    ({"func_name": "verify_keyword_frequency", "word": "cat", "N": 2}, "Cat, cat!", "cat cat cat"),
    ({"func_name": "validate_forbidden_words", "forbidden_words": ["bad"]}, "good", "badge"),
    ({"func_name": "verify_letter_frequency", "letter": "a", "N": 2}, "banana"[:4], "banana"),
    ({"func_name": "validate_response_language", "language": "en"},
     "The weather is very nice today and the park is full of people.",
     "Das Wetter ist heute sehr schön und der Park ist voller Menschen."),
    ({"func_name": "verify_paragraph_count", "N": 2}, "a\n* * *\nb", "a\n* * *\n* * *\nb"),
    ({"func_name": "validate_word_constraint", "N": 10, "quantifier": "around"}, " ".join(["w"] * 11), "w w"),
    ({"func_name": "verify_sentence_constraint", "N": 2, "quantifier": "at most"}, "One. Two.", "One. Two. Three."),
    ({"func_name": "validate_paragraphs", "N": 2, "first_word": "Then", "i": 2}, "a\n\nThen b", "a\n\nb"),
    ({"func_name": "verify_postscript", "postscript_marker": "P.S."}, "hi\nP.S. bye", "hi\nP.S."),
    ({"func_name": "validate_placeholders", "N": 1}, "[x]", "x"),
    ({"func_name": "verify_bullet_points", "N": 2}, "* a\n- b", "* a"),
    ({"func_name": "validate_title"}, "<<t>>", "<t>"),
    ({"func_name": "validate_choice", "options": ["yes", "no"]}, "I say yes", "maybe"),
    ({"func_name": "validate_highlighted_sections", "N": 1}, "*x*", "x"),
    ({"func_name": "validate_sections", "N": 2, "section_splitter": "Section"}, "SECTION 1 a section 2 b",
     "Section 1 a"),
    ({"func_name": "validate_json_format"}, "{\"a\": 1}", "```json\n{}\n```"),
    ({"func_name": "validate_repeat_prompt", "original_prompt": "Q?"}, "Q? A.", "A. Q?"),
    ({"func_name": "validate_two_responses"}, "a ****** b", "a ****** a"),
    ({"func_name": "validate_uppercase"}, "ALL UP 1", "Not"),
    ({"func_name": "validate_lowercase"}, "all low", "Not"),
    ({"func_name": "validate_frequency_capital_words", "N": 2, "quantifier": "at least"}, "AB CD e", "AB cd"),
    ({"func_name": "validate_end", "end_phrase": "bye."}, "ok bye.", "bye. ok"),
    ({"func_name": "validate_quotation"}, "\"q\"", "q\""),
    ({"func_name": "validate_no_commas"}, "a b", "a, b"),
]


def test_every_rlvr_func_name_has_cases():
    assert {g["func_name"] for g, _, _ in RLVR} == set(V.RLVR_IF_FUNCTIONS) and len(V.RLVR_IF_FUNCTIONS) == 25


@pytest.mark.parametrize("gt,good,bad", RLVR, ids=[g["func_name"] for g, _, _ in RLVR])
def test_rlvr_func_pass_and_fail(gt, good, bad):
    # published rows carry every argument name, null where unused
    full = dict.fromkeys(["N", "quantifier", "end_phrase", "keyword_list", "word", "letter", "i"]) | gt
    assert V.verify("ifeval", good, json.dumps(full)) == 1.0
    assert V.verify("ifeval", bad, json.dumps(full)) == 0.0


@pytest.mark.parametrize("gt,inside,outside", [
    # open-instruct: "around" N words is within max(round(N / 10), 1)
    ({"func_name": "validate_word_constraint", "N": 20}, (18, 22), (17, 23)),
    ({"func_name": "validate_word_constraint", "N": 5}, (4, 6), (3, 7)),  # at least one either side
    ({"func_name": "verify_sentence_constraint", "N": 3}, (2, 4), (1, 5)),  # sentences: one either side
])
def test_rlvr_around_tolerates_both_edges_and_no_further(gt, inside, outside):
    def text(n):
        return " ".join(["Word."] * n) if gt["func_name"] == "verify_sentence_constraint" else " ".join(["w"] * n)
    for n, reward in [(inside[0], 1.0), (inside[1], 1.0), (outside[0], 0.0), (outside[1], 0.0)]:
        assert V.verify("ifeval", text(n), {**gt, "quantifier": "around"}) == reward, n


@pytest.mark.parametrize("gt,response,reward", [
    # "around" 15 words tolerates round(1.5) = 2 either side
    ({"func_name": "validate_word_constraint", "N": 15, "quantifier": "around"}, " ".join(["w"] * 13), 1.0),
    ({"func_name": "verify_paragraph_count", "N": 3}, "a\n* * *\nb\n* * *", 0.0),  # an empty last paragraph
    ({"func_name": "verify_letter_frequency", "letter": "a", "N": 1}, "Aa", 1.0),  # case-sensitive, as open-instruct
    ({"func_name": "verify_keyword_frequency", "word": "cat", "N": 1}, "cat catalog", 1.0),  # whole words only
    ({"func_name": "validate_frequency_capital_words", "N": 2, "quantifier": "at least"}, "A B", 1.0),
    ({"func_name": "validate_two_responses"}, "a ****** b ****** c", 0.0),  # exactly two
    ({"func_name": "validate_title"}, "a>>b<<c", 0.0),
    ({"func_name": "validate_paragraphs", "N": 2, "first_word": "Then", "i": 2}, "a\n\n  Then b", 1.0),  # indented
    ({"func_name": "validate_response_language", "language": "en"}, "12345 678", 0.0),  # undetectable earns nothing
])
def test_rlvr_func_edge_cases(gt, response, reward):
    assert V.verify("ifeval", response, gt) == reward


def test_rlvr_response_is_stripped_as_open_instruct_does():
    assert V.ifeval('"Paris is the capital."\n', {"func_name": "validate_quotation"}) == 1.0
    assert V.ifeval("Anything else?\n", {"func_name": "validate_end", "end_phrase": "Anything else?"}) == 1.0


def test_rlvr_list_and_partial_credit():
    gt = [{"func_name": "validate_lowercase"}, {"func_name": "validate_no_commas"},
          {"func_name": "verify_keywords", "keyword_list": ["zebra"]}]
    assert V.ifeval("a, b", gt, partial=True) == pytest.approx(1 / 3)
    assert V.ifeval("a, b", json.dumps(gt)) == 0.0
    assert V.verify("ifeval", "a zebra", gt, partial=True) == 1.0


@pytest.mark.parametrize("dataset,gt,match", [
    ("ifeval", "not json", "not JSON"), ("ifeval", '{"func_name": "nope"}', "unknown func_name"),
    ("ifeval", '{"func_name": "validate_end"}', "validate_end"), ("ifeval", "[]", "dict or a list"),
    ("ifeval", '{"func_name": "verify_letter_frequency", "letter": "ab", "N": 1}', "one character"),
    ("gsm8k", "n/a", "gsm8k"), ("squad", "1", "unknown dataset 'squad'"),
    ("ifeval", '{"func_name": "validate_word_constraint", "N": 5, "quantifier": "atleast"}', "quantifier 'atleast'"),
    ("ifeval", '{"func_name": "verify_keywords", "keyword_list": [1]}', "keyword_list must be a list of strings"),
    # each of these would pass an empty response and then score every response of the run wrongly, or crash
    ("ifeval", '{"func_name": "verify_bullet_points", "N": "3"}', "verify_bullet_points: N must be a whole number"),
    ("ifeval", '{"func_name": "verify_paragraph_count", "N": 2.5}', "N must be a whole number >= 0, got 2.5"),
    ("ifeval", '{"func_name": "verify_keywords", "keyword_list": "zebra"}', "keyword_list must be a list of"),
    ("ifeval", '{"func_name": "validate_choice", "options": "yes or no"}', "options must be a non-empty list of"),
    ("ifeval", '{"func_name": "verify_keyword_frequency", "word": 7, "N": 1}', "word must be a string, got 7"),
    ("ifeval", '{"func_name": "validate_title", "N": 2}', "validate_title: bad arguments"),
    # and these no response could ever meet: every rollout of their prompt would score 0
    ("ifeval", '{"func_name": "validate_paragraphs", "N": 2, "i": 3, "first_word": "So"}', "i must not exceed N"),
    ("ifeval", '{"func_name": "verify_paragraph_count", "N": 0}', "N must be at least 1"),
    ("ifeval", '{"func_name": "validate_choice", "options": []}', "options must be a non-empty list of strings"),
    ("ifeval", '{"func_name": "verify_keyword_frequency", "word": "a", "N": -1}', "N must be a whole number >= 0"),
    ("ifeval", '{"func_name": "validate_response_language", "language": "xx"}', "language must be a language code"),
    # and these every response would meet: the reward for whatever the policy writes
    ("ifeval", '{"func_name": "verify_keywords", "keyword_list": []}', "no keyword to include \\(every response"),
    ("ifeval", '{"func_name": "validate_forbidden_words", "forbidden_words": []}', "no word to avoid"),
    ("ifeval", '{"func_name": "validate_end", "end_phrase": ""}', "validate_end: an empty end phrase"),
    ("ifeval", '{"func_name": "verify_postscript", "postscript_marker": ""}', "verify_postscript: an empty postscript"),
    ("ifeval", '{"func_name": "validate_repeat_prompt", "original_prompt": ""}', "an empty prompt to repeat"),
    ("ifeval", '{"func_name": "validate_sections", "N": 0, "section_splitter": "Section"}', "sections: at least 0"),
    ("ifeval", '{"func_name": "validate_placeholders", "N": 0}', "validate_placeholders: at least 0"),
    ("ifeval", '{"func_name": "validate_highlighted_sections", "N": 0}', "validate_highlighted_sections: at least 0"),
    ("ifeval", '{"func_name": "validate_word_constraint", "N": 0, "quantifier": "at least"}', "constraint: at least 0"),
    ("ifeval", '{"func_name": "validate_frequency_capital_words", "N": 0, "quantifier": "at least"}', "at least 0"),
    ("ifeval", '{"func_name": "verify_keywords", "keyword_list": ["", ""]}', "no keyword to include"),
    ("ifeval", '{"func_name": "validate_choice", "options": ["yes", ""]}', "an empty option is in every response"),
    ("ifeval", '{"func_name": "verify_keyword_frequency", "word": "e-mail", "N": 0}', "a word that is never counted"),
    ("ifeval", '{"func_name": "verify_sentence_constraint", "N": 1, "quantifier": "at least"}', "at least one sentence"),
    ("ifeval", '{"func_name": "validate_forbidden_words", "forbidden_words": ["x", ""]}', "an empty forbidden word"),
    ("ifeval", '{"func_name": "verify_keyword_frequency", "word": "two words", "N": 2}', "must be a single word"),
])
def test_verify_rejects_malformed(dataset, gt, match):
    with pytest.raises(ValueError, match=match):
        V.verify(dataset, "x", gt)
    if dataset == "ifeval":  # and on the empty response train_rlvr.py checks every row with at load
        with pytest.raises(ValueError, match=match):
            V.verify(dataset, "", gt)


def test_rows_with_empty_arguments_that_some_responses_still_fail_are_kept():
    """Only the rows every response meets are refused: an empty first word still asks for the paragraphs, an empty
    splitter for numbered sections, and at most 0 capital words is failed by any capital."""
    for gt, met, failed in [
            ({"func_name": "validate_paragraphs", "N": 2, "i": 1, "first_word": ""}, "a\n\nb", "a"),
            ({"func_name": "validate_sections", "N": 1, "section_splitter": ""}, "intro 1 part", "no number"),
            ({"func_name": "validate_frequency_capital_words", "N": 0, "quantifier": "at most"}, "all low", "ONE"),
            ({"func_name": "verify_sentence_constraint", "N": 2, "quantifier": "at least"}, "One. Two.", "One."),
            ({"func_name": "verify_keyword_frequency", "word": "Cat", "N": 0}, "a dog", "a cat")]:
        assert V.verify("ifeval", met, gt) == 1.0 and V.verify("ifeval", failed, gt) == 0.0, gt


def test_whole_number_arguments_may_be_written_as_floats():
    assert V.verify("ifeval", "* a\n* b", '{"func_name": "verify_bullet_points", "N": 2.0}') == 1.0


@pytest.mark.parametrize("lang,text", [
    ("pt", "Olá! Você pode visitar o museu amanhã. Eu acho que será uma ótima experiência para toda a família."),
    ("pt", "O Brasil tem três regiões muito diferentes, e cada uma delas tem uma cultura própria."),
    ("fr", "Il faut être patient avec les enfants, même quand la journée est longue et difficile."),
    ("en", "i love the crêpes at the café near my house, and the rôle of the chef is to keep them coming."),
    ("vi", "Hà Nội là thủ đô của Việt Nam, một thành phố có lịch sử lâu đời."),
    ("mr", "महाराष्ट्र हे भारतातील एक मोठे राज्य आहे आणि मुंबई ही त्याची राजधानी आहे."),
    ("mr", "मी आज शाळेत गेलो नाही कारण मला ताप होता. उद्या मी नक्की जाईन."),
    ("hi", "दिल्ली भारत की राजधानी है और यह एक बहुत बड़ा शहर है।"),
    ("ne", "नेपाल एक सुन्दर देश हो र यहाँ धेरै हिमालहरू छन्।"),
])
def test_builtin_language_detector(monkeypatch, lang, text):
    """The fallback when langdetect is not installed; langdetect gives the same codes for these."""
    monkeypatch.setattr(V, "langdetect", None)
    assert V.detect_language(text) == lang


@pytest.mark.parametrize("lang,text", [
    ("ja", "東京都新宿区西新宿二丁目の高層ビル"),  # kanji outnumber kana, but any kana means Japanese
    ("vi", "Tôi yêu bạn"),  # no common Vietnamese word, but letters only Vietnamese uses
    ("ru", "Это очень хорошо, мы знаем."), ("bg", "Това е много хубаво."), ("uk", "Це дуже добре, ми знаємо і їх."),
    ("ar", "هذا كتاب جيد جدا"), ("fa", "این یک کتاب خوب است"), ("ur", "یہ ایک اچھی کتاب ہے"),
])
def test_builtin_language_detector_tells_apart_languages_sharing_a_script(monkeypatch, lang, text):
    monkeypatch.setattr(V, "langdetect", None)
    assert V.detect_language(text) == lang


def test_verify_dispatch():
    assert V.verify("gsm8k", "it is 7", "#### 7") == 1.0
    assert V.verify("MATH", "\\boxed{7}", "7") == V.verify("math", "\\boxed{7}", "7") == 1.0

# ----------------------------------------------------------------------------- hostile inputs

MB = 1 << 20
Q = MB // 4  # quadratic behaviour would already take hours at this size; keeps the sweep fast
HOSTILE = {
    "nested_braces": "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
    "unbalanced_braces": "\\boxed{" + "{" * 100_000,
    "huge_number": "the answer is " + "9" * 100_000,
    "huge_fraction": "\\boxed{" + "1" * 100_000 + "/" + "2" * 100_000 + "}",
    "brackets": "[" * Q,
    "blank_lines": "\n" * MB,
    "spaces_then_star": " " * Q + "*",
    "angles": "<<" * (Q // 2),
    "stars": "*" * Q,
    "dollars": "$" * Q,
    "digits_commas": "1," * (Q // 2),
    "json_nesting": "[" * 100_000 + "]" * 100_000,
    "mixed": ("P.S. [x] <<t>> *h* - Section 1, \\frac12 $3$ " * 30_000)[:MB],
}
ALL_IFEVAL = [(inst, kw) for inst, kw, _, _ in CASES]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_inputs_neither_crash_nor_hang(name):
    text = HOSTILE[name]
    for call in (lambda: V.gsm8k(text, "9"), lambda: V.math(text, "\\frac12"),
                 lambda: V.ifeval_instructions(text, [i for i, _ in ALL_IFEVAL], [k for _, k in ALL_IFEVAL], "p"),
                 lambda: V.ifeval(text, [{"func_name": f} | {k: v for k, v in g.items() if k != "func_name"}
                                         for g, _, _ in RLVR for f in [g["func_name"]]], partial=True)):
        t0 = time.perf_counter()
        call()
        assert time.perf_counter() - t0 < 5.0, name  # loose bound: a robustness check, not a benchmark


def test_hostile_input_in_loose_mode():
    text = "Intro line\n" + HOSTILE["mixed"][:MB // 4] + "\nlast line"
    t0 = time.perf_counter()
    V.ifeval_instructions(text, ["detectable_format:title", "keywords:existence"], [{}, {"keywords": ["zz"]}], "p",
                          loose=True)
    assert time.perf_counter() - t0 < 5.0


def test_huge_number_compares_exactly():
    assert V.gsm8k("so " + "9" * 100_000, "#### " + "9" * 100_000) == 1.0
    assert V.math("\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}", "1") == 0.0
