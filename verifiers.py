"""
Answer checkers: GSM8K, MATH, IFEval (Google's 25 instruction types) and the RLVR
verifiable rewards of allenai/RLVR-GSM-MATH-IF-Mixed-Constraints.

Standard library only; optional packages are used when installed (see BACKENDS, which
eval.py records). Model output is untrusted text, so nothing here runs it as code, and
every scan is linear in the response length: where a reference regex would backtrack
quadratically on hostile input (a megabyte of '[' or of blank lines), the same matches
are found with an explicit scan instead.

MATH follows open-instruct's Tulu 3-era RLVR verifier (ground_truth_utils.verify_math_sample
with math_utils.py): its answer candidates, Minerva's normalize_final_answer, Hendrycks'
strip_string, and sympy's equivalence check (parse_latex, then simplify(a - b) == 0) when
sympy and the antlr4 4.11 runtime its LaTeX parser needs are installed. Without them the
symbolic check is replaced by an exact comparison of plain numbers and fractions, so
2\\sqrt{2} vs \\sqrt{8} or x+1 vs 1+x, which the reference accepts, score 0.

IFEval follows Google's reference (google-research instruction_following_eval, as
vendored by lm-evaluation-harness) instruction by instruction. Three of its checks
need outside tools; each uses the optional package when installed, else a built-in
stand-in (see BACKENDS, which eval.py prints):
- language (response_language, english_capital, english_lowercase): langdetect, else
  a detector from Unicode scripts plus common-word counts for Latin-script languages;
- sentences (number_sentences): nltk punkt, else the reference's own regex sentence
  splitter (instructions_util.split_into_sentences);
- words (capital_word_frequency): nltk.word_tokenize, else the same Treebank token boundaries
  (punctuation, quotes and clitics split off; "cannot" is two words; URLs and hyphenated words whole).
User-supplied keywords are matched literally (the reference feeds them to re
unescaped; no published keyword contains a regex metacharacter).
"""

import json
import re
import signal
import threading
from math import inf, log10
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# -----------------------------------------------------------------------------
# optional backends

try:
    import langdetect
    from langdetect import DetectorFactory
    DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes verdicts reproducible
except ImportError:
    langdetect = None

_punkt = None
try:
    import nltk
    nltk.data.find("tokenizers/punkt_tab/english/")
    _punkt = nltk.tokenize.PunktTokenizer("english")
except (ImportError, LookupError, AttributeError, OSError):
    _punkt = None

_parse_latex = _simplify = None
_no_sympy = ""
try:
    from sympy import simplify as _simplify
    from sympy.parsing.latex import parse_latex as _parse_latex
    _parse_latex("1")  # the parser loads antlr4 on first use and refuses any version but the 4.11 it was built for
except ImportError as e:
    _parse_latex = _simplify = None
    _no_sympy = str(e)  # why, for the tests' skip reason

BACKENDS = {
    "language": "langdetect" if langdetect is not None else "builtin (unicode scripts + common words)",
    "sentences": "nltk punkt" if _punkt is not None else "builtin (reference regex splitter)",
    "words": "nltk word_tokenize" if _punkt is not None else "builtin (Treebank rules)",
    "math": ("sympy (parse_latex + simplify) and Hendrycks strings" if _parse_latex is not None else
             "builtin (Hendrycks strings + exact numbers, no symbolic equivalence: needs sympy and "
             "antlr4-python3-runtime==4.11)"),
}

# -----------------------------------------------------------------------------
# GSM8K

# a number: optional sign, digits with optional thousands commas, optional decimals, or decimals alone (".5" is
# 0.5, not 5). The comma group needs a digit after it, so "5," and trailing "." are not part of the number. A
# hyphen right after a word character is a range or a subtraction ("9-10"), not a sign.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?(?:\d(?:[\d,]*\d)?(?:\.\d+)?|(?<![\d.])\.\d+)")


def _to_decimal(text):
    text = text.replace(",", "").replace("$", "")
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def _gsm8k_truth(ground_truth):
    gt = str(ground_truth)
    if "####" in gt:
        gt = gt.rsplit("####", 1)[1]
    value = _to_decimal(gt.strip().rstrip("."))
    if value is None or not value.is_finite():
        raise ValueError(f"gsm8k ground truth is not a number: {str(ground_truth)[:80]!r}")
    return value


def gsm8k(response, ground_truth, strict=False):
    """1.0 if the last number in the response (or, strict, the number after the first
    '#### ') equals the reference number after '####', else 0.0.

    Numbers are compared by value: "$1,800.00", "-5" and ".5" match 1800, -5 and 0.5. open-instruct's
    RLVR check compares the strings of its last-number regex, so there "18.00" misses 18, "-5" is
    read as 5 and ".5" misses 0.5; those are the rewards this one gives that open-instruct's would
    not."""
    truth = _gsm8k_truth(ground_truth)
    if strict:
        m = re.search(r"#### (-?\$?(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+))", response)
        answer = m.group(1) if m else None
    else:
        numbers = _NUMBER.findall(response)
        answer = numbers[-1] if numbers else None
    if answer is None:
        return 0.0
    value = _to_decimal(answer)
    return float(value is not None and value == truth)


# -----------------------------------------------------------------------------
# MATH: open-instruct's Tulu 3-era verify_math_sample (the one SmolTulu's RLVR ran). It reads the model's
# answer candidates (the last \boxed, Minerva's "Final Answer" line, the last $...$, the whole response) and
# accepts when one of them equals the ground truth by sympy or by Hendrycks' strip_string.


def _last_boxed(text):
    """What the reference's last_boxed_only_string + remove_boxed give: the text after the last '\\boxed '
    up to the next '$' when the text has one, else the braces of the last '\\boxed{', else None. (An \\fbox
    never gets through remove_boxed's assert, so it is no candidate.)"""
    k = text.rfind("\\boxed ")
    if k >= 0:
        return text[k + 7:].split("$", 1)[0]
    k = text.rfind("\\boxed")
    if k < 0 or not text.startswith("{", k + 6):
        return None
    depth = 0
    for j in range(k + 6, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[k + 7:j]
    return None  # unbalanced


_MINERVA_PREFIX = "Final Answer: The final answer is"
_MINERVA_HOPE = " I hope it is correct"


def _minerva_answer(text):
    """X of the first 'Final Answer: The final answer is X. I hope it is correct.' on one line, or None.

    The reference searches re'Final Answer: The final answer is(.*?). I hope it is correct.' (each '.' any
    character but a newline) in the text with 'I hope it is correct.' appended; this finds the same match
    without its rescan of the line from every later prefix."""
    text += "I hope it is correct."
    i = 0
    while True:
        s = text.find(_MINERVA_PREFIX, i)
        if s < 0:
            return None
        e = s + len(_MINERVA_PREFIX)
        k = text.find(_MINERVA_HOPE, e + 1)  # the first fits, or none on this line does
        if k < 0:
            return None
        tail = k + len(_MINERVA_HOPE) + 1  # the pattern's last '.' is one more character
        newline = text.find("\n", e, tail)
        if newline < 0 and tail <= len(text):
            return text[e:k - 1].strip()
        i = newline + 1 if newline >= 0 else len(text)


_MINERVA_SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]
_MINERVA_REMOVED = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"',
    "\\dots",
]


def _first_dollar_pair(line):
    # re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\3$") on one line: a line with two '$' becomes its first $...$
    i = line.find("$")
    j = line.find("$", i + 1) if i >= 0 else -1
    return line if j < 0 else line[i:j + 1]


def _unwrap_lazy(s, opener):
    # re.sub(opener + r"(.*?)\}", r"\1"): each opener up to the first '}' on its line becomes what it wraps
    out, i = [], 0
    while True:
        k = s.find(opener, i)
        if k < 0:
            break
        j = s.find("}", k + len(opener))
        if j < 0:
            break  # no '}' after it, so after no later opener either
        newline = s.find("\n", k, j)
        if newline >= 0:  # this opener and the others before that newline are left as they are
            out.append(s[i:newline])
            i = newline
            continue
        out += [s[i:k], s[k + len(opener):j]]
        i = j + 1
    out.append(s[i:])
    return "".join(out)


def _unwrap_boxed_greedy(line):
    # re.sub(r"\\boxed\{(.*)\}", r"\1") on one line: the first '\boxed{' up to the line's last '}'
    k = line.find("\\boxed{")
    j = line.rfind("}", k + 7) if k >= 0 else -1
    return line if j < 0 else line[:k] + line[k + 7:j] + line[j + 1:]


def normalize_final_answer(answer):
    """Minerva's answer normalisation (Lewkowycz et al. 2022, appendix D) as open-instruct's math_utils runs it:
    the text after the last '=', its substitutions and removed unit words, the first $...$, \\text{} and the
    like unwrapped, \\frac12 / \\sqrt2 shorthands expanded, '$' dropped, thousands commas of an integer dropped."""
    answer = answer.split("=")[-1]
    for before, after in _MINERVA_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for word in _MINERVA_REMOVED:
        answer = answer.replace(word, "")
    answer = "\n".join(_first_dollar_pair(line) for line in answer.split("\n"))
    for opener in ("\\text{", "\\textbf{", "\\overline{"):
        answer = _unwrap_lazy(answer, opener)
    answer = "\n".join(_unwrap_boxed_greedy(line) for line in answer.split("\n"))
    answer = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def math_answer_candidates(text):
    """The model's final answers as open-instruct's Tulu 3-era MATH verifier reads them, in its order: the last
    boxed (as written) and Minerva's 'Final Answer: ...' (normalised), each when present; failing both, the
    normalised text between the last two '$'; failing that, the whole response, normalised. (Later open-instruct
    also tries the raw response last; the Tulu 3-era code does not.)"""
    found = []
    boxed = _last_boxed(text)
    if boxed is not None:
        found.append(boxed)
    minerva = _minerva_answer(text)
    if minerva is not None:
        minerva = normalize_final_answer(minerva)
        if minerva != "[invalidanswer]":  # the reference's "no match" marker, which it drops after normalising
            found.append(minerva)
    if not found:
        last = text.rfind("$")
        prev = text.rfind("$", 0, last) if last > 0 else -1
        if prev >= 0:
            found.append(normalize_final_answer(text[prev + 1:last]))
    return found or [normalize_final_answer(text)]


def _fix_fracs(s):
    # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}; a lone character after \frac leaves the string as it was
    parts = s.split("\\frac")
    out = [parts[0]]
    for p in parts[1:]:
        if not p:
            raise ValueError(f"strip_string: \\frac with nothing after it in {s[:80]!r}")
        if p[0] == "{":
            out.append("\\frac" + p)
        elif len(p) < 2:
            return s
        elif p[1] != "{":
            out.append("\\frac{" + p[0] + "}{" + p[1] + "}" + p[2:])
        else:
            out.append("\\frac{" + p[0] + "}" + p[1:])
    return "".join(out)


def _fix_a_slash_b(s):
    # "3/4" -> \frac{3}{4} when both sides are integers written canonically. The reference converts with int()
    # and lets its ValueError through (so "x/2" falls back to comparing raw strings): int() is kept for that.
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"strip_string: a/b with a non-integer side in {s[:80]!r}") from None
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def _fix_sqrt(s):
    # \sqrt3 -> \sqrt{3}
    parts = s.split("\\sqrt")
    out = [parts[0]]
    for p in parts[1:]:
        if not p:
            raise ValueError(f"strip_string: \\sqrt with nothing after it in {s[:80]!r}")
        out.append(("\\sqrt{" + p[0] + "}" + p[1:]) if p[0] != "{" else "\\sqrt" + p)
    return "".join(out)


def strip_string(s):
    """Hendrycks' MATH normalisation, as open-instruct's math_utils.strip_string. Raises ValueError where that
    one fails (a second '\\text{ ' unit marker, a trailing \\sqrt or \\frac, an a/b with a non-integer side)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    if "\\text{ " in s:  # "\text{ " only ever introduces units in MATH
        units = s.split("\\text{ ")
        if len(units) != 2:
            raise ValueError(f"strip_string: more than one '\\text{{ ' in {s[:80]!r}")
        s = units[0]
    s = s.replace("\\%", "").replace("\\%", "")  # twice, as the reference (a '\\%' the first pass uncovers goes too)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    lhs_rhs = s.split("=")
    if len(lhs_rhs) == 2 and len(lhs_rhs[0]) <= 2:  # "x = 5", "k=3"
        s = lhs_rhs[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def _strip_or_none(s):
    try:
        return strip_string(s)
    except ValueError:
        return None


def hendrycks_equiv(a, b):
    """open-instruct's hendrycks_is_equiv: the strip_string forms are equal, or, where strip_string fails on
    either, the raw strings are."""
    sa, sb = _strip_or_none(a), _strip_or_none(b)
    return a == b if sa is None or sb is None else sa == sb


_SYMPY_SECONDS = 5  # the reference's alarm
_SYMPY_MAX_CHARS = 1_000  # ours: parsing and simplifying a few thousand characters already takes longer than that
_SYMPY_MAX_DIGITS = 100_000  # ours: a larger number is one long C computation, which no alarm interrupts


class _SympyTimeout(BaseException):
    """Not an Exception, so that sympy's own `except Exception` cannot swallow it."""


def _raise_timeout(signum, frame):
    raise _SympyTimeout


def _digits(expr):
    """An upper estimate of the decimal digits of the largest number sympy would compute from the parsed `expr`
    (parse_latex leaves powers unevaluated: 9^{9^{9^{9}}} is four small integers until simplify evaluates it, in
    one C multiplication that runs for hours). Symbols count as small: their powers are not evaluated."""
    if expr.is_Rational:  # (integers too)
        return max(log10(abs(expr.p) or 1), log10(expr.q)) + 1
    if expr.is_Pow:
        base, exponent = _digits(expr.base), _digits(expr.exp)
        if exponent > 7:  # an exponent of 10 million or more: too large whatever the base but 0, 1 and -1
            return inf
        size = abs(float(expr.exp)) if expr.exp.is_number else 1.0
        return max(base, exponent, (base - 1) * size + 1)
    name = expr.func.__name__
    if name in ("factorial", "binomial") and expr.args[0].is_number:  # n! and (n choose k) by n's size
        size = _digits(expr.args[0])
        if size > 7:
            return inf
        n = abs(int(expr.args[0])) if expr.args[0].is_Integer else 10 ** size
        value = (n * log10(n) if name == "factorial" else n * 0.302) + 1 if n > 1 else 1
        return max(value, sum(_digits(arg) for arg in expr.args))
    return sum(_digits(arg) for arg in expr.args)


def sympy_equiv(a, b):
    """open-instruct's is_equiv: sympy.simplify(parse_latex(a) - parse_latex(b)) == 0, False on any failure or
    after _SYMPY_SECONDS (a SIGALRM, as the reference sets). Off the main thread, or where there is no SIGALRM,
    nothing could stop a runaway simplify: False, as the reference's own signal.signal call fails there. Strings
    over _SYMPY_MAX_CHARS are not parsed, and expressions whose numbers would have more than _SYMPY_MAX_DIGITS
    digits are not simplified (the alarm cannot stop a C computation: the reference hangs on them): those guards are
    ours, not the reference's."""
    if _parse_latex is None:
        raise RuntimeError("sympy_equiv: sympy's LaTeX parser is not available (see BACKENDS['math'])")
    if len(a) > _SYMPY_MAX_CHARS or len(b) > _SYMPY_MAX_CHARS:
        return False
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        signal.setitimer(signal.ITIMER_REAL, _SYMPY_SECONDS)
        try:
            x, y = _parse_latex(a), _parse_latex(b)
            if max(_digits(x), _digits(y)) > _SYMPY_MAX_DIGITS:
                return False
            return bool(_simplify(x - y) == 0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except (Exception, _SympyTimeout):  # the reference returns False on every parse, subtract or simplify error
        return False
    finally:  # after the timer is off (an alarm firing at the deadline is caught above), the caller's handler
        signal.signal(signal.SIGALRM, previous)


_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?")  # sympy reads neither "5." nor ".5" (strip_string makes that 0.5)
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC = re.compile(r"\\frac\{(-?[\d.,]+)\}\{(-?[\d.,]+)\}")


def _unsigned_value(s):
    if len(s) > 100:  # no answer is that long; converting hostile digit strings costs time
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return Fraction(s) if _PLAIN_NUMBER.fullmatch(s) else None


def _number_value(s):
    """The exact value of a normalised answer that is a plain number (thousands commas and
    decimals allowed) or a \\frac of two, with an optional minus; else None."""
    sign = -1 if s.startswith("-") else 1
    s = s[1:] if sign < 0 else s
    m = _FRAC.fullmatch(s)
    if m is None:
        value = _unsigned_value(s)
        return None if value is None else sign * value
    parts = [p.lstrip("-") for p in m.groups()]
    num, den = (_unsigned_value(p) for p in parts)
    if num is None or not den:
        return None
    sign *= (-1) ** sum(p.startswith("-") for p in m.groups())
    return sign * num / den


def math(response, ground_truth):
    """1.0 if one of the model's answer candidates matches the reference answer as open-instruct's Tulu 3-era
    verifier decides it: sympy finds the two equal (2\\sqrt{2} = \\sqrt{8}, x+1 = 1+x), or Hendrycks'
    normalisation makes them the same string. Without sympy (BACKENDS['math']) the symbolic check is replaced by
    an exact comparison of plain numbers and fractions after that normalisation (1,000 = 1000.00, 0.50 =
    \\frac{1}{2}, which sympy also accepts; but also 18 = \\$18 and 5 = 5\\text{ cm}, whose dollar sign and unit
    the normalisation drops and sympy's parse does not). A ground truth holding a \\boxed answer (a worked solution) is read for that answer. The response is
    stripped first, as the Tulu 3 release's verify_math_sample does (its Minerva match fails on a trailing space)."""
    response = response.strip()
    gt = str(ground_truth)
    truth = _last_boxed(gt) if "\\boxed" in gt else gt
    if truth is None or not truth.strip():
        raise ValueError(f"MATH ground truth has no answer: {gt[:80]!r}")
    # without sympy, its stand-in: the truth's exact value, when it is a plain number or fraction
    stripped_truth = _strip_or_none(truth) if _parse_latex is None else None
    value = _number_value(stripped_truth) if stripped_truth is not None else None
    for answer in math_answer_candidates(response):
        if hendrycks_equiv(answer, truth):
            return 1.0
        if _parse_latex is not None:
            if sympy_equiv(answer, truth):
                return 1.0
        elif value is not None:
            stripped = _strip_or_none(answer)
            if stripped is not None and _number_value(stripped) == value:
                return 1.0
    return 0.0

# -----------------------------------------------------------------------------
# language detection fallback: the script decides non-Latin languages; Latin-script
# languages are told apart by counting very common words.

_SCRIPTS = [  # (first, last code point, language or script tag)
    (0x0900, 0x097F, "deva"), (0x0980, 0x09FF, "bn"), (0x0A00, 0x0A7F, "pa"),
    (0x0A80, 0x0AFF, "gu"), (0x0B80, 0x0BFF, "ta"), (0x0C00, 0x0C7F, "te"),
    (0x0C80, 0x0CFF, "kn"), (0x0D00, 0x0D7F, "ml"), (0x0E00, 0x0E7F, "th"),
    (0x0370, 0x03FF, "el"), (0x0400, 0x04FF, "cyrl"), (0x0590, 0x05FF, "he"),
    (0x0600, 0x06FF, "arab"), (0xAC00, 0xD7AF, "ko"), (0x1100, 0x11FF, "ko"),
    (0x3040, 0x30FF, "ja"), (0x4E00, 0x9FFF, "zh-cn"),
]
_COMMON_WORDS = {
    "en": "the and is are of to in that it for with you this was be on not have",
    "de": "der die das und ist nicht ich ein eine zu mit den sie es auf für von",
    "fr": "le la les et est un une des du que pas pour dans ce qui il je vous",
    "es": "el la los las y es un una que de en no por para con se lo del",
    "it": "il lo la gli le e è un una che di non per con sono del della",
    "pt": "o a os as e é um uma que de não para com do da em se você",
    "nl": "de het een en is van ik niet dat die zijn op te met voor",
    "sw": "na ya wa kwa ni za katika la kuwa hii yake cha au sana",
    "fi": "ja on ei se että oli mutta kuin myös tai ovat hän minä sinä",
    "vi": "và là của có không được cho một những các với người này trong",
    "pl": "i w nie na się jest to że z do jak ale co tak",
    "tr": "ve bir bu da de için ile çok ne gibi daha ama",
    "id": "dan yang di ini itu dengan untuk tidak ada dari saya",
}
_COMMON_WORDS = {lang: set(ws.split()) for lang, ws in _COMMON_WORDS.items()}
_VIETNAMESE_ONLY = set("ăđơư")  # and the tone-marked letters of U+1EA0-U+1EF9
_DEVANAGARI_WORDS = {"hi": {"है", "और", "के", "में", "की", "हैं", "यह", "से", "नहीं"},
                     "mr": {"आहे", "आणि", "या", "हे", "आहेत", "की", "व", "नाही", "होते"},
                     "ne": {"छ", "र", "हो", "पनि", "छन्", "गर्न", "भएको", "थियो", "मा"}}


def _script_of(c):
    o = ord(c)
    for lo, hi, tag in _SCRIPTS:
        if lo <= o <= hi:
            return tag
    return "latn" if c.isalpha() else None


def detect_language(text):
    """ISO 639-1 code of the text's language, or None when it has no letters."""
    if langdetect is not None:
        try:
            return langdetect.detect(text)
        except langdetect.LangDetectException:
            return None
    text = text[:10_000]  # langdetect reads no further either
    counts = {}
    for c in text:
        tag = _script_of(c)
        if tag is not None:
            counts[tag] = counts.get(tag, 0) + 1
    if not counts:
        return None
    if counts.get("ja") and counts.get("zh-cn"):
        script = "ja"  # kanji appear beside kana in Japanese
    else:
        script = max(counts, key=counts.get)
    # Devanagari vowel signs and viramas are combining marks, which \w does not match: without the block's range
    # every word would be cut at them
    words = re.findall(r"[\w\u0900-\u097F]+", text.lower())
    if script == "cyrl":
        letters = set(text.lower())
        if letters & set("іїєґ"):
            return "uk"
        return "ru" if letters & set("ыэё") else "bg"
    if script == "arab":
        if set(text) & set("ےٹڈڑںھ"):
            return "ur"
        return "fa" if set(text) & set("پچژگی") else "ar"
    if script == "deva":
        score = {lang: sum(w in ws for w in words) for lang, ws in _DEVANAGARI_WORDS.items()}
        return max(score, key=score.get)
    if script != "latn":
        return script
    if any(c in _VIETNAMESE_ONLY or "\u1ea0" <= c <= "\u1ef9" for c in text.lower()):  # (â ê ô are also pt, fr)
        return "vi"
    score = {lang: sum(w in ws for w in words) for lang, ws in _COMMON_WORDS.items()}
    best = max(score, key=score.get)
    return best if score[best] > 0 else "en"

# -----------------------------------------------------------------------------
# sentence and word splitting fallbacks

_ALPHA = "([A-Za-z])"
_PREFIXES = "(Mr|St|Mrs|Ms|Dr)[.]"
_SUFFIXES = "(Inc|Ltd|Jr|Sr|Co)"
_STARTERS = r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever)"
_ACRONYMS = "([A-Z][.][A-Z][.](?:[A-Z][.])?)"
_WEBSITES = "[.](com|net|org|io|gov|edu|me)"


def split_sentences(text):
    """Sentences of the text: punkt when available, else the reference's regex splitter."""
    if _punkt is not None:
        return _punkt.tokenize(text)
    # protect periods that do not end a sentence as <prd>, mark ends as <stop>
    t = " " + text.replace("\n", " ") + "  "
    t = re.sub(_PREFIXES, "\\1<prd>", t)
    t = re.sub(_WEBSITES, "<prd>\\1", t)
    t = re.sub("([0-9])[.]([0-9])", "\\1<prd>\\2", t)
    t = re.sub(r"\.{2,}", lambda m: "<prd>" * len(m.group(0)) + "<stop>", t)
    t = t.replace("Ph.D.", "Ph<prd>D<prd>")
    t = re.sub(r"\s" + _ALPHA + "[.] ", " \\1<prd> ", t)
    t = re.sub(_ACRONYMS + " " + _STARTERS, "\\1<stop> \\2", t)
    t = re.sub(_ALPHA + "[.]" + _ALPHA + "[.]" + _ALPHA + "[.]", "\\1<prd>\\2<prd>\\3<prd>", t)
    t = re.sub(_ALPHA + "[.]" + _ALPHA + "[.]", "\\1<prd>\\2<prd>", t)
    t = re.sub(" " + _SUFFIXES + "[.] " + _STARTERS, " \\1<stop> \\2", t)
    t = re.sub(" " + _SUFFIXES + "[.]", " \\1<prd>", t)
    t = re.sub(" " + _ALPHA + "[.]", " \\1<prd>", t)
    t = t.replace(".\u201d", "\u201d.").replace('."', '".').replace('!"', '"!').replace('?"', '"?')
    t = t.replace(".", ".<stop>").replace("?", "?<stop>").replace("!", "!<stop>")
    sentences = [s.strip() for s in t.replace("<prd>", ".").split("<stop>")]
    if sentences and not sentences[-1]:
        sentences.pop()
    return sentences


# Without nltk, its word tokenizer (NLTKWordTokenizer, the Penn Treebank conventions that nltk.word_tokenize runs
# on each sentence) rebuilt: the same rewrites in the same order, each putting spaces around what it splits off
# (and renaming " to `` or ''); the tokens are then the whitespace-separated runs. Sentences: only a sentence's
# final period is treated apart, and capital_word_frequency (str.isupper) cannot see it, so one pass over the
# whole text counts what nltk counts sentence by sentence.
def _rules(*pairs):
    return [(re.compile(pattern), repl) for pattern, repl in pairs]


_OPENING = _rules(
    (r"[«“‘„]|`+", r" \g<0> "),
    (r'^"', "``"),
    (r"``", " `` "),
    (r"""([ (\[{<])(?:"|'')""", r"\1 `` "),
    (r"(?i)(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", "' "),  # an opening quote, not a clitic ('s, 'tis)
)
_PUNCTUATION = _rules(
    (r"([:,])([^\d])", r" \1 \2"),  # not inside numbers: 3,000 and 10:30 stay whole
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),
    (r"[;@#$%&]", r" \g<0> "),
    (r"[\u2012-\u2015]", r" \g<0> "),  # figure, en and em dashes
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"\*", r" \g<0> "),
    (r"[\]\[(){}<>]", r" \g<0> "),
    (r"--", " -- "),
)
_CLOSING = _rules(
    (r"[»”’]", r" \g<0> "),
    (r"''", " '' "),
    (r'"', " '' "),
    (r"\s+", " "),
    (r"([^' ])('[sSmMdD]|') ", r"\1 \2 "),  # clitics at a word's end, one pass each, in this order
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
    (r"(?i)\b(can)(not)\b", r" \1 \2 "),  # words Treebank spells as two
    (r"(?i)\b(d)('ye)\b", r" \1 \2 "),
    (r"(?i)\b(gim)(me)\b", r" \1 \2 "),
    (r"(?i)\b(gon)(na)\b", r" \1 \2 "),
    (r"(?i)\b(got)(ta)\b", r" \1 \2 "),
    (r"(?i)\b(lem)(me)\b", r" \1 \2 "),
    (r"(?i)\b(more)('n)\b", r" \1 \2 "),
    (r"(?i)\b(wan)(na)(?=\s)", r" \1 \2 "),
    (r"(?i) ('t)(is)\b", r" \1 \2 "),
    (r"(?i) ('t)(was)\b", r" \1 \2 "),
)
_CLOSERS = "])}>\"'»”’ "


def _split_final_period(text):
    """A final period (not an ellipsis's) followed by nothing but closing brackets, quotes and spaces, then
    whitespace, stands alone. Scanned from the end: a regex anchored at $ would rescan the tail from each period."""
    end = len(text.rstrip())
    while end and text[end - 1] in _CLOSERS:
        end -= 1
    if end >= 2 and text[end - 1] == "." and text[end - 2] != ".":
        return text[:end - 1] + " . " + text[end:]
    return text


def word_tokenize(text):
    if _punkt is not None:
        return nltk.word_tokenize(text)
    for pattern, repl in _OPENING:
        text = pattern.sub(repl, text)
    text = _split_final_period(text)
    for pattern, repl in _PUNCTUATION:
        text = pattern.sub(repl, text)
    text = f" {text} "
    for pattern, repl in _CLOSING:
        text = pattern.sub(repl, text)
    return text.split()


# -----------------------------------------------------------------------------
# linear-time scans for the reference regexes that can backtrack quadratically


def _count_brackets(text):
    """len(re.findall(r"\\[.*?\\]", text)): '[' then the nearest ']' on the same line."""
    count, i = 0, 0
    while True:
        i = text.find("[", i)
        if i < 0:
            return count
        close, nl = text.find("]", i + 1), text.find("\n", i + 1)
        if close >= 0 and (nl < 0 or close < nl):
            count, i = count + 1, close + 1
        elif nl < 0:
            return count
        else:
            i = nl + 1  # no ']' left on this line: no later '[' on it can match either


def _count_bullets(text, star):
    """len(re.findall(r"^\\s*\\*[^\\*].*$" or r"^\\s*-.*$", text, re.M)). \\s* may run over
    blank lines, and [^*] may match a newline, so a match can span several lines."""
    count, pos, n = 0, 0, len(text)
    while pos < n:
        j = pos
        while j < n and text[j].isspace():
            j += 1
        if j < n and (text[j] == "*" and j + 1 < n and text[j + 1] != "*" if star else text[j] == "-"):
            count += 1
            end = text.find("\n", j + 2 if star else j + 1)  # .*$ runs to the end of the line
        else:
            end = text.find("\n", j)  # every line start inside the whitespace run fails alike
        if end < 0:
            return count
        pos = end + 1
    return count


def _has_title(text):
    """any(t.lstrip('<').rstrip('>').strip() for t in re.findall(r"<<[^\\n]+>>", text)):
    per line, the only match runs from the first '<<' to the last '>>'."""
    for line in text.split("\n"):
        p = line.find("<<")
        if p < 0:
            continue
        q = line.rfind(">>")
        if q >= p + 3 and line[p:q + 2].lstrip("<").rstrip(">").strip():
            return True
    return False

# -----------------------------------------------------------------------------
# IFEval: one checker per instruction id, with the published kwargs


def _is_count(v):
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _is_str_list(v):
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# the codes langdetect can return: a row asking for another language could never be followed
LANGDETECT_CODES = set("af ar bg bn ca cs cy da de el en es et fa fi fr gu he hi hr hu id it ja kn ko lt lv mk ml mr "
                       "ne nl no pa pl pt ro ru sk sl so sq sv sw ta te th tl tr uk ur vi zh-cn zh-tw".split())
# What an instruction's argument must be, as (test, what it must be), for IFEval's kwargs here and the RLVR
# functions' arguments below
_COUNT = (lambda v: _is_count(v) and v >= 0, "a whole number >= 0")
_POSITIVE_COUNT = (lambda v: _is_count(v) and v >= 1, "a whole number >= 1")
_STRING = (lambda v: isinstance(v, str), "a string")
_STRINGS = (_is_str_list, "a list of strings")
_LANGUAGE = (lambda v: isinstance(v, str) and v in LANGDETECT_CODES, "a language code langdetect returns")
_RELATION = (lambda v: v in ("less than", "at least"), "'less than' or 'at least'")


def _relation(rel, actual, threshold, where):
    if rel == "less than":
        return actual < threshold
    if rel == "at least":
        return actual >= threshold
    raise ValueError(f"{where}: relation must be 'less than' or 'at least', got {rel!r}")


def _language_is(text, lang):
    detected = detect_language(text)
    return True if detected is None else detected == lang  # undetectable counts as followed


def _paragraphs_by_divider(text, num_paragraphs):
    parts = re.split(r"\s?\*\*\*\s?", text)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False
    return n == num_paragraphs


def _nth_paragraph_first_word(text, num_paragraphs, nth_paragraph, first_word):
    parts = text.split("\n\n")
    n = sum(1 for p in parts if p.strip())
    if nth_paragraph > n:
        return False
    para = parts[nth_paragraph - 1].strip()
    if not para:
        return False
    word = para.split()[0].strip().lstrip("'").lstrip('"')
    got = []
    for c in word:
        if c in ".,?!'\"":
            break
        got.append(c.lower())
    return n == num_paragraphs and "".join(got) == first_word.lower()


def _postscript(text, marker):
    text = text.lower()
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker.lower())
    return re.search(pattern, text) is not None


def _highlights(text):
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip())
    return n


def _sections(text, splitter):
    return len(re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", text)) - 1


def _is_json(text):
    text = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(prefix)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _two_responses(text):
    parts = text.split("******")
    valid = []
    for i, p in enumerate(parts):
        if p.strip():
            valid.append(p)
        elif i not in (0, len(parts) - 1):
            return False
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _letter(kw, where):
    # A letter outside a-z (IFEval key 1122 asks for "#") is counted as given; Google's reference (and
    # lm-eval's copy) swaps it for a random letter each time it builds the check, which cannot be reproduced.
    letter = kw["letter"]
    if not isinstance(letter, str) or len(letter.strip()) != 1:
        raise ValueError(f"{where}: letter must be one character, got {letter!r}")
    return letter.strip().lower()


IFEVAL_CHECKS = {
    "keywords:existence": lambda t, kw, w: all(
        re.search(re.escape(k), t, re.IGNORECASE) for k in kw["keywords"]),
    "keywords:frequency": lambda t, kw, w: _relation(
        kw["relation"], len(re.findall(re.escape(kw["keyword"].strip()), t, re.IGNORECASE)), kw["frequency"], w),
    "keywords:forbidden_words": lambda t, kw, w: not any(
        re.search(r"\b" + re.escape(k) + r"\b", t, re.IGNORECASE) for k in kw["forbidden_words"]),
    "keywords:letter_frequency": lambda t, kw, w: _relation(
        kw["let_relation"], t.lower().count(_letter(kw, w)), kw["let_frequency"], w),
    "language:response_language": lambda t, kw, w: _language_is(t, kw["language"]),
    "length_constraints:number_sentences": lambda t, kw, w: _relation(
        kw["relation"], len(split_sentences(t)), kw["num_sentences"], w),
    "length_constraints:number_paragraphs": lambda t, kw, w: _paragraphs_by_divider(t, kw["num_paragraphs"]),
    "length_constraints:number_words": lambda t, kw, w: _relation(
        kw["relation"], len(re.findall(r"\w+", t)), kw["num_words"], w),
    "length_constraints:nth_paragraph_first_word": lambda t, kw, w: _nth_paragraph_first_word(
        t, kw["num_paragraphs"], kw["nth_paragraph"], kw["first_word"]),
    "detectable_content:number_placeholders": lambda t, kw, w: _count_brackets(t) >= kw["num_placeholders"],
    "detectable_content:postscript": lambda t, kw, w: _postscript(t, kw["postscript_marker"].strip()),
    "detectable_format:number_bullet_lists": lambda t, kw, w: (
        _count_bullets(t, True) + _count_bullets(t, False) == kw["num_bullets"]),
    "detectable_format:constrained_response": lambda t, kw, w: any(
        o in t.strip() for o in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_format:number_highlighted_sections": lambda t, kw, w: _highlights(t) >= kw["num_highlights"],
    "detectable_format:multiple_sections": lambda t, kw, w: (
        _sections(t, kw["section_spliter"].strip()) >= kw["num_sections"]),
    "detectable_format:json_format": lambda t, kw, w: _is_json(t),
    "detectable_format:title": lambda t, kw, w: _has_title(t),
    "combination:two_responses": lambda t, kw, w: _two_responses(t),
    "combination:repeat_prompt": lambda t, kw, w: (
        t.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())),
    "startend:end_checker": lambda t, kw, w: (
        t.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())),
    "startend:quotation": lambda t, kw, w: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"',
    "change_case:capital_word_frequency": lambda t, kw, w: _relation(
        kw["capital_relation"], sum(1 for x in word_tokenize(t) if x.isupper()), kw["capital_frequency"], w),
    "change_case:english_capital": lambda t, kw, w: t.isupper() and _language_is(t, "en"),
    "change_case:english_lowercase": lambda t, kw, w: t.islower() and _language_is(t, "en"),
    "punctuation:no_comma": lambda t, kw, w: "," not in t,
}


def loose_variants(response):
    """The 8 responses IFEval's loose mode tries: as is, without the first line, the last
    line, or both, each also with every '*' removed."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both,
            first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]


# The arguments each instruction takes (those of its build_description in Google's reference) and what each must
# be: a string where a list is due would be checked character by character, and a string count or an unknown
# language code would fail or pass every response, all silently.
IFEVAL_ARGS = {"keywords:existence": {"keywords": _STRINGS},
               "keywords:frequency": {"keyword": _STRING, "frequency": _COUNT, "relation": _RELATION},
               "keywords:forbidden_words": {"forbidden_words": _STRINGS},
               "keywords:letter_frequency": {"letter": _STRING, "let_frequency": _COUNT, "let_relation": _RELATION},
               "language:response_language": {"language": _LANGUAGE},
               "length_constraints:number_sentences": {"num_sentences": _COUNT, "relation": _RELATION},
               "length_constraints:number_paragraphs": {"num_paragraphs": _COUNT},
               "length_constraints:number_words": {"num_words": _COUNT, "relation": _RELATION},
               "length_constraints:nth_paragraph_first_word": {"num_paragraphs": _COUNT,
                                                               "nth_paragraph": _POSITIVE_COUNT, "first_word": _STRING},
               "detectable_content:number_placeholders": {"num_placeholders": _COUNT},
               "detectable_content:postscript": {"postscript_marker": _STRING},
               "detectable_format:number_bullet_lists": {"num_bullets": _COUNT},
               "detectable_format:number_highlighted_sections": {"num_highlights": _COUNT},
               "detectable_format:multiple_sections": {"section_spliter": _STRING, "num_sections": _COUNT},
               "combination:repeat_prompt": {"prompt_to_repeat": _STRING},
               "startend:end_checker": {"end_phrase": _STRING},
               "change_case:capital_word_frequency": {"capital_frequency": _COUNT, "capital_relation": _RELATION}}


def check_ifeval_row(instruction_id_list, kwargs):
    """Raises ValueError, naming the instruction and argument, unless instruction_id_list is a list of known
    instruction ids and kwargs one dict per instruction (None: no arguments) of arguments it takes, each of the right
    kind, that some response could follow. A None or empty value is no argument, as in the reference (the hub
    parquet's unused struct fields are None)."""
    if not _is_str_list(instruction_id_list):
        raise ValueError(f"ifeval: instruction_id_list must be a list of instruction ids, "
                         f"got {instruction_id_list!r:.80}")
    if not isinstance(kwargs, list) or not all(kw is None or isinstance(kw, dict) for kw in kwargs):
        raise ValueError(f"ifeval: kwargs must be a list of one dict of arguments per instruction, got {kwargs!r:.80}")
    if len(kwargs) != len(instruction_id_list):
        raise ValueError(f"ifeval: {len(instruction_id_list)} instructions but {len(kwargs)} kwargs")
    for inst, kw in zip(instruction_id_list, kwargs):
        if inst not in IFEVAL_CHECKS:
            raise ValueError(f"ifeval: unknown instruction id {inst!r}")
        takes = IFEVAL_ARGS.get(inst, {})
        args = {k: v for k, v in (kw or {}).items() if v}
        for key, value in args.items():
            if key not in takes:
                raise ValueError(f"ifeval: instruction {inst!r} takes no argument {key!r} (its arguments: "
                                 f"{', '.join(takes) or 'none'})")
            ok, what = takes[key]
            if not ok(value):
                raise ValueError(f"ifeval: instruction {inst!r}: {key} must be {what}, got {value!r:.80}")
        if args.get("nth_paragraph", 0) > args.get("num_paragraphs", float("inf")):  # (nth_paragraph_first_word's)
            raise ValueError(f"ifeval: instruction {inst!r}: nth_paragraph {args['nth_paragraph']} of "
                             f"{args['num_paragraphs']} paragraphs, which no response can follow")


def ifeval_instructions(response, instruction_id_list, kwargs, prompt, loose=False):
    """One verdict per instruction. kwargs: one dict per instruction as published
    (None / empty values ignored); prompt: the row's prompt (for repeat_prompt)."""
    check_ifeval_row(instruction_id_list, kwargs)
    candidates = loose_variants(response) if loose else [response]
    candidates = [c for c in candidates if c.strip()]  # an empty response follows nothing
    verdicts = []
    for inst, kw in zip(instruction_id_list, kwargs):
        check = IFEVAL_CHECKS[inst]
        kw = {k: v for k, v in (kw or {}).items() if v}
        if inst == "combination:repeat_prompt" and "prompt_to_repeat" not in kw:
            kw["prompt_to_repeat"] = prompt
        try:
            verdicts.append(any(check(c, kw, inst) for c in candidates))
        except KeyError as e:
            raise ValueError(f"ifeval: instruction {inst!r} is missing kwarg {e.args[0]!r}") from None
    return verdicts


def ifeval_row(row, response):
    """Scores one input_data.jsonl row: dict with prompt-level and instruction-level
    verdicts, strict and loose."""
    out = {}
    for mode, loose in (("strict", False), ("loose", True)):
        v = ifeval_instructions(response, row["instruction_id_list"], row["kwargs"], row["prompt"], loose)
        out[f"prompt_level_{mode}"] = all(v)
        out[f"inst_level_{mode}"] = v
    return out


def ifeval_aggregate(results):
    """Mean accuracies over ifeval_row results: prompt-level is the fraction of prompts with
    every instruction followed; instruction-level pools all instructions of all prompts."""
    agg = {}
    for mode in ("strict", "loose"):
        agg[f"prompt_level_{mode}_acc"] = sum(r[f"prompt_level_{mode}"] for r in results) / max(len(results), 1)
        flat = [x for r in results for x in r[f"inst_level_{mode}"]]
        agg[f"inst_level_{mode}_acc"] = sum(flat) / max(len(flat), 1)
    return agg

# -----------------------------------------------------------------------------
# RLVR instruction-following rewards: open-instruct's if_functions, by func_name, as fixed after the Tulu 3 release.
# The release's copy (scripts/eval_constraints/if_functions.py) passed every response on validate_placeholders (it
# returned a tuple), raised NameError on validate_uppercase, tested validate_choice the wrong way round (the
# response inside an option), counted 'around' capital words exactly, split sentences without '!' and counted
# validate_sections' pieces on the bare splitter; those are the rewards here that differ from the ones Tulu 3's and
# SmolTulu's runs could have been given on those constraints.


def _quantified(actual, N, quantifier, around):
    if quantifier == "at least":
        return actual >= N
    if quantifier == "at most":
        return actual <= N
    if quantifier == "around":
        return abs(actual - N) <= around
    raise ValueError(f"quantifier {quantifier!r}: expected 'at least', 'at most' or 'around'")


def _rlvr_paragraph_count(text, N):
    text = "\n".join(line.strip() for line in text.splitlines()).strip()
    parts = text.split("* * *")
    return all(p.strip() for p in parts) and len(parts) == N


def _rlvr_sentences(text, N, quantifier):
    n = len(re.split(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?|!)\s", text))
    return _quantified(n, N, quantifier, around=1)


def _rlvr_paragraphs(text, N, first_word, i):
    parts = text.split("\n\n")
    return len(parts) == N and 1 <= i <= N and parts[i - 1].strip().startswith(first_word)


def _rlvr_postscript(text, postscript_marker):
    k = text.find(postscript_marker)
    return k >= 0 and len(text[k:].strip()) > len(postscript_marker)


def _rlvr_title(text):
    """re.findall(r"<<(.*?)>>", text) is non-empty: a '<<' with a '>>' after it on its line."""
    for line in text.split("\n"):
        p = line.find("<<")
        if p >= 0 and line.find(">>", p + 2) >= 0:
            return True
    return False


def _rlvr_letter(text, letter, N):
    if not isinstance(letter, str) or len(letter) != 1:
        raise ValueError(f"verify_letter_frequency: letter must be one character, got {letter!r}")
    return text.count(letter) == N


def _rlvr_language(text, language):
    detected = detect_language(text)
    return detected is not None and detected == language  # as a reward, undetectable earns nothing


def _rlvr_two_responses(text):
    if text.count("******") != 1:
        return False
    a, b = text.split("******")
    return a.strip() != b.strip()


def _is_json_strict(text):
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


RLVR_IF_FUNCTIONS = {
    "verify_keywords": lambda text, keyword_list: all(k.lower() in text.lower() for k in keyword_list),
    "verify_keyword_frequency": lambda text, word, N: (
        sum(1 for w in re.findall(r"\b\w+\b", text.lower()) if w == word.lower()) == N),
    "validate_forbidden_words": lambda text, forbidden_words: not any(
        w.lower() in text.lower() for w in forbidden_words),
    "verify_letter_frequency": _rlvr_letter,
    "validate_response_language": _rlvr_language,
    "verify_paragraph_count": _rlvr_paragraph_count,
    "validate_word_constraint": lambda text, N, quantifier: _quantified(
        len(text.split()), N, quantifier, around=max(round(N * 0.1), 1)),
    "verify_sentence_constraint": _rlvr_sentences,
    "validate_paragraphs": _rlvr_paragraphs,
    "verify_postscript": _rlvr_postscript,
    "validate_placeholders": lambda text, N: _count_brackets(text) >= N,
    "verify_bullet_points": lambda text, N: (
        sum(1 for line in text.split("\n") if line.strip().startswith(("*", "-"))) == N),
    "validate_title": _rlvr_title,
    "validate_choice": lambda text, options: any(o in text for o in options),
    "validate_highlighted_sections": lambda text, N: len(re.findall(r"\*(.*?)\*", text)) >= N,
    "validate_sections": lambda text, N, section_splitter: len(re.split(
        r"\s?" + re.escape(section_splitter) + r"\s?\d+\s?", text, flags=re.IGNORECASE)) - 1 >= N,
    "validate_json_format": _is_json_strict,
    "validate_repeat_prompt": lambda text, original_prompt: text.startswith(original_prompt),
    "validate_two_responses": _rlvr_two_responses,
    "validate_uppercase": lambda text: text == text.upper(),
    "validate_lowercase": lambda text: text == text.lower(),
    "validate_frequency_capital_words": lambda text, N, quantifier: _quantified(
        len(re.findall(r"\b[A-Z]+\b", text)), N, quantifier, around=max(round(N * 0.1), 1)),
    "validate_end": lambda text, end_phrase: text.endswith(end_phrase),
    "validate_quotation": lambda text: text.startswith('"') and text.endswith('"'),
    "validate_no_commas": lambda text: "," not in text,
}


def _parse_constraints(ground_truth):
    gt = ground_truth
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except ValueError as e:
            raise ValueError(f"ifeval ground truth is not JSON ({e}): {ground_truth[:80]!r}") from None
    if isinstance(gt, dict):
        gt = [gt]
    if not isinstance(gt, list) or not gt or not all(isinstance(c, dict) for c in gt):
        raise ValueError(f"ifeval ground truth must be a dict or a list of dicts: {str(ground_truth)[:80]!r}")
    return gt


# What each argument of RLVR_IF_FUNCTIONS must be. A string N would compare unequal to every count, and a string
# keyword_list would be read as a list of its characters: rewards silently wrong for the whole run, not an error.
# A row no response could satisfy (a negative count, no options, _RLVR_SATISFIABLE below) is named at load too, not
# trained on as a prompt that always scores 0; so is one that every response meets (_RLVR_ALWAYS_MET), which would
# reward whatever the policy writes.
_RLVR_ARG_CHECKS = {"N": _COUNT, "i": _POSITIVE_COUNT, "keyword_list": _STRINGS, "forbidden_words": _STRINGS,
                    "options": (lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of strings"),
                    "language": _LANGUAGE,
                    **{k: _STRING for k in ("word", "letter", "first_word", "postscript_marker", "section_splitter",
                                            "original_prompt", "end_phrase", "quantifier")}}
def _one_word(word):  # what verify_keyword_frequency can count: a single \b\w+\b token
    return isinstance(word, str) and re.fullmatch(r"\w+", word.lower()) is not None


_RLVR_SATISFIABLE = {"validate_paragraphs": (lambda a: a.get("i", 1) <= a.get("N", 1), "i must not exceed N"),
                     "verify_paragraph_count": (lambda a: a.get("N", 1) >= 1, "N must be at least 1"),
                     "validate_forbidden_words": (lambda a: "" not in a.get("forbidden_words", []),
                                                  "an empty forbidden word is in every response"),
                     "verify_keyword_frequency": (lambda a: a.get("N") == 0 or _one_word(a.get("word")),
                                                  "the word must be a single word to be counted")}
_AT_LEAST_NONE = (lambda a: a.get("N") == 0, "at least 0")
_RLVR_ALWAYS_MET = {"verify_keywords": (lambda a: "keyword_list" in a and all(k == "" for k in a["keyword_list"]),
                                        "no keyword to include"),
                    "validate_choice": (lambda a: "" in a.get("options", []), "an empty option is in every response"),
                    "verify_keyword_frequency": (lambda a: a.get("N") == 0 and not _one_word(a.get("word")),
                                                 "0 times a word that is never counted"),
                    "verify_sentence_constraint": (lambda a: a.get("quantifier") == "at least" and
                                                   _is_count(a.get("N")) and a["N"] <= 1,
                                                   "at least one sentence, which every text is"),
                    "validate_forbidden_words": (lambda a: a.get("forbidden_words") == [], "no word to avoid"),
                    "validate_end": (lambda a: a.get("end_phrase") == "", "an empty end phrase"),
                    "verify_postscript": (lambda a: a.get("postscript_marker") == "",
                                          "an empty postscript marker, found at the start of any text"),
                    "validate_repeat_prompt": (lambda a: a.get("original_prompt") == "", "an empty prompt to repeat"),
                    "validate_placeholders": _AT_LEAST_NONE, "validate_highlighted_sections": _AT_LEAST_NONE,
                    "validate_sections": _AT_LEAST_NONE,
                    **{name: (lambda a: a.get("N") == 0 and a.get("quantifier") == "at least", "at least 0")
                       for name in ("validate_word_constraint", "validate_frequency_capital_words")}}


def _check_constraint(response, constraint):
    args = {k: v for k, v in constraint.items() if v is not None}
    name = args.pop("func_name", None)
    fn = RLVR_IF_FUNCTIONS.get(name)
    if fn is None:
        raise ValueError(f"ifeval ground truth: unknown func_name {name!r}")
    for key, value in args.items():  # an argument the function does not take fails in the call below
        ok, what = _RLVR_ARG_CHECKS.get(key, (lambda v: True, ""))
        if not ok(value):
            raise ValueError(f"ifeval ground truth for {name}: {key} must be {what}, got {value!r}")
    ok, what = _RLVR_SATISFIABLE.get(name, (lambda a: True, ""))
    if not ok(args):
        raise ValueError(f"ifeval ground truth for {name}: {what} (no response could meet {args})")
    always, what = _RLVR_ALWAYS_MET.get(name, (lambda a: False, ""))
    if always(args):
        raise ValueError(f"ifeval ground truth for {name}: {what} (every response would meet {args})")
    try:
        return bool(fn(response, **args))
    except (TypeError, AttributeError, ValueError) as e:  # missing, extra or mistyped arguments
        raise ValueError(f"ifeval ground truth for {name}: bad arguments {args} ({e})") from None


def ifeval(response, ground_truth, partial=False):
    """RLVR instruction-following reward: 1.0 if every constraint holds, or with partial=True
    the fraction of constraints that hold. The response is stripped first, as open-instruct
    does (a trailing newline must not fail 'end with' or 'wrap in quotes')."""
    response = response.strip()
    constraints = _parse_constraints(ground_truth)
    met = [_check_constraint(response, c) for c in constraints]
    return sum(met) / len(met) if partial else float(all(met))


def verify(dataset, response, ground_truth, partial=False):
    """The RLVR verifiable reward in [0, 1] for one response, by the row's `dataset`."""
    name = str(dataset).lower()
    if name == "gsm8k":
        return gsm8k(response, ground_truth)
    if name == "math":
        return math(response, ground_truth)
    if name == "ifeval":
        return ifeval(response, ground_truth, partial=partial)
    raise ValueError(f"verify: unknown dataset {dataset!r} (expected gsm8k, MATH or ifeval)")
