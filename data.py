"""Data for nanotulu: tokenizer, chat templates, dataset readers, tokenization cache, packing, sampling, and the
synthetic demo tasks.

Read top to bottom: Tokenizer -> chat templates (render_chat) -> row readers and validation (SFT, preference, RLVR)
-> tokenization with an on-disk cache -> packing and collation into training batches -> the epoch sampler -> the
synthetic demo data and its tokenizer.
"""
import contextlib
import functools
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import signal
import socket
from bisect import bisect_left, insort

import numpy as np
import tokenizers

log = logging.getLogger("nanotulu.data")

IGNORE_INDEX = -100


class DataError(ValueError):
    """A bad input row or file. The message always starts with where it happened (file + line/row)."""

    def __init__(self, where, problem):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def _token_str(value):
    # tokenizer_config.json stores special tokens either as plain strings or as serialised AddedToken dicts
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path):
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON at line {e.lineno}: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise DataError(path, f"not UTF-8 text (byte {e.start})") from None
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a JSON object, got {type(obj).__name__}")
    return obj


class NamedChatTemplates(dict):
    """A chat_template that tokenizer_config.json gives as a list of named templates none of which is named 'default'
    (tool_use and rag only, say): name -> jinja, as transformers keeps it. transformers loads such a tokenizer and
    refuses only to render with no template named, and so do we: resolve_template refuses it unless --template
    names one of ours. `where` is the file it came from."""

    def __init__(self, templates, where):
        super().__init__(templates)
        self.where = where


def _saved_chat_template(folder, tok_config):
    """The chat template a snapshot was saved with, looked up as transformers does: chat_template.jinja (where
    transformers 5 saves it) before tokenizer_config.json's chat_template, which may also be a list of named
    templates, of which the one named 'default' is used (a NamedChatTemplates where none is)."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                return f.read()
            except UnicodeDecodeError as e:
                raise DataError(path, f"not UTF-8 text (byte {e.start})") from None
    saved = tok_config.get("chat_template")
    where = os.path.join(folder, "tokenizer_config.json")
    if isinstance(saved, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in saved):
            raise DataError(where, "chat_template is a list whose entries must each be {name, template}, both "
                            "strings")
        named = {t["name"]: t["template"] for t in saved}
        return named["default"] if "default" in named else NamedChatTemplates(named, where)
    if saved is not None and not isinstance(saved, str):
        raise DataError(where, f"chat_template must be a jinja string or a list of {{name, template}}, got "
                        f"{type(saved).__name__}")
    return saved


def _register_special_tokens(tk, named):
    """Make each special token a tokenizer's files name an added token of `tk`, as transformers does at load: one that
    is only an ordinary vocab entry (an eos '</s>' missing from tokenizer.json's added_tokens, say) would otherwise be
    cut into byte pieces wherever a template writes it, so that it is never trained, nor stopped at. Each keeps its
    vocab id, as in transformers; one the vocab lacks, where transformers would append an id past the model's
    embedding table, is refused if it is bos, eos or pad (which are used) and said and left out otherwise. An added
    token named special that tokenizer.json flags otherwise is flagged special, so
    that decode(skip_special_tokens=True) drops it as transformers does. `named`: (where, field, token (a string or
    an AddedToken dict), special); a token that already is an added token (special, where it should be) is left as
    it is, so a tokenizer.json that already has them all (SmolLM2's) is unchanged."""
    added = {t.content: t for t in tk.get_added_tokens_decoder().values()}
    flag_names = ("single_word", "lstrip", "rstrip", "normalized")
    for where, field, value, special in named:
        content = _token_str(value)
        if not isinstance(content, str):
            raise DataError(where, f"{field} = {value!r} must be a token string")
        if content in added and (added[content].special or not special):
            continue
        if tk.token_to_id(content) is None:
            if field.split("[")[0] in ("bos_token", "eos_token", "pad_token"):  # used: rendered, trained, padded with
                raise DataError(where, f"{field} {content!r} is not in the vocabulary of tokenizer.json (transformers "
                                f"would add it as a new id, past the model's embedding table)")
            log.warning(f"{where}: {field} {content!r} is not in the vocabulary of tokenizer.json, so it is not "
                        f"added (transformers would give it a new id past the model's embedding table; nothing here "
                        f"uses it)")
            continue
        # an added token keeps its flags (only special changes); one given as an AddedToken dict takes its own; a
        # string one gets transformers' (normalized=False)
        if content in added:
            flags = {k: getattr(added[content], k) for k in flag_names}
        else:
            flags = {k: value[k] for k in flag_names if isinstance(value, dict) and isinstance(value.get(k), bool)}
        token = tokenizers.AddedToken(content, **{"normalized": False, **flags}, special=special)
        if special:
            tk.add_special_tokens([token])
        else:
            tk.add_tokens([token])
        added[content] = token


# tokenizer_config.json keys that Tokenizer.save_pretrained writes from its own state (the rest are carried over).
# tokenizer_class is always PreTrainedTokenizerFast, which takes tokenizer.json whole in transformers 4 and 5: for a
# snapshot's GPT2Tokenizer (SmolLM2's) transformers 5 builds a ByteLevel pre-tokenizer of its own and drops the
# stored one's other steps (SmolLM2's splits digits one by one), so the ids would differ from those trained on.
_SETTINGS_WE_WRITE = {"bos_token", "eos_token", "pad_token", "chat_template", "tokenizer_class"}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens a chat model needs (bos, eos, pad)."""

    def __init__(self, tk, bos_token, eos_token, pad_token=None, chat_template=None, settings=None,
                 generation_eos_ids=()):
        # A tokenizer.json may carry truncation or padding settings (transformers writes them when a script asked for
        # them once); transformers applies them only to calls that ask, and so do we: never here.
        tk.no_truncation()
        tk.no_padding()
        self._tk = tk
        # The snapshot's other tokenizer_config.json settings (model_max_length, unk_token,
        # additional_special_tokens, ...): not used here, but written back on save so that transformers and lm-eval
        # see the saved tokenizer exactly as they saw the snapshot's.
        self.settings = dict(settings or {})
        # Offsets come from a copy without the post-processor: ByteLevel's post-processor trims whitespace out of
        # the offsets (a lone ' ' or '\n' token gets an empty span), which would break span-based masks. It adds no
        # tokens when add_special_tokens=False, so the ids of both are identical.
        self._offsets_tk = tokenizers.Tokenizer.from_str(tk.to_str())
        self._offsets_tk.post_processor = None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        # A template name ('tulu', 'chatml') or a raw jinja string; written into tokenizer_config.json on save so
        # that transformers users get the template the model was trained with. Trainers set it.
        self.chat_template = chat_template
        for name in ("bos_token", "eos_token", "pad_token"):
            token = getattr(self, name)
            if token is not None and tk.token_to_id(token) is None:
                raise ValueError(f"tokenizer: {name} {token!r} is not in the vocabulary")
        self.bos_id = tk.token_to_id(bos_token) if bos_token is not None else None
        self.eos_id = tk.token_to_id(eos_token)
        self.pad_id = tk.token_to_id(self.pad_token)
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self._added_tokens = {t.content for t in tk.get_added_tokens_decoder().values()}
        # The eos ids the snapshot's generation_config.json lists (Llama 3 style lists name several): transformers'
        # generate stops at each of them, so ours does too (see stop_token_ids).
        self.generation_eos_ids = [int(i) for i in generation_eos_ids]

    @classmethod
    def from_pretrained(cls, path, bos_token=None, eos_token=None, pad_token=None):
        """Load tokenizer.json from a folder (or the file itself). Special tokens come from, in order: the arguments,
        tokenizer_config.json and special_tokens_map.json (in transformers' order, below), generation_config.json
        (ids), then '<|endoftext|>' for eos; a bos that none of them names is None, as in transformers (a template's
        {{ bos_token }} renders nothing)."""
        if not path:
            raise FileNotFoundError("tokenizer: no folder given (pass --model=PATH, or --tokenizer=PATH)")
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer: {path} does not exist")
        if not os.path.exists(file):
            raise FileNotFoundError(f"tokenizer: no tokenizer.json at {file}")
        try:
            tk = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the library raises a bare Exception for a broken file
            raise DataError(file, f"not a readable tokenizer ({e})") from None
        tok_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
        gen_config = _read_json(os.path.join(folder, "generation_config.json"))
        # Which file wins where they disagree is transformers' rule: a tokenizer_config.json with
        # added_tokens_decoder (what transformers has written since 4.34, SmolLM2's included) is the whole truth
        # and special_tokens_map.json only fills its gaps; an older one is overridden by the map.
        files = [(tok_config, "tokenizer_config.json"), (special_map, "special_tokens_map.json")]
        if "added_tokens_decoder" not in tok_config:
            files.reverse()

        # Every special token the files name, as (where, field, value, special), for _register_special_tokens
        named = []

        def resolve(name, given):
            if given is not None:
                named.append((f"tokenizer: {name}=", name, given, True))
                return given
            for source, file in files:
                token = _token_str(source.get(name))
                if token is not None:
                    if not isinstance(token, str):
                        raise DataError(os.path.join(folder, file), f"{name} = {token!r} must be a token string")
                    named.append((os.path.join(folder, file), name, source[name], True))
                    return token
            token_ids = generation_ids(name)  # generation_config may list several eos ids; the first is the main one
            token = tk.id_to_token(token_ids[0]) if token_ids else \
                "<|endoftext|>" if name == "eos_token" and tk.token_to_id("<|endoftext|>") is not None else None
            # An eos that would be cut into pieces ('</s>' only in the vocab) is made one token, as one the files
            # name is, so that a template can end a turn with it; one that is already one token stays as it is (it
            # may be ordinary text, '!', that other text merges with)
            if name == "eos_token" and token is not None and tk.encode(token, add_special_tokens=False).ids != \
                    [tk.token_to_id(token)]:
                named.append((os.path.join(folder, "generation_config.json"), "eos_token_id", token, True))
            return token

        def generation_ids(name, config=gen_config, file="generation_config.json"):
            token_ids = config.get(f"{name}_id")
            token_ids = [] if token_ids is None else token_ids if isinstance(token_ids, list) else [token_ids]
            for token_id in token_ids:
                if not isinstance(token_id, int) or isinstance(token_id, bool) or tk.id_to_token(token_id) is None:
                    raise DataError(os.path.join(folder, file), f"{name}_id = {token_id!r} is not a token id of the "
                                    "tokenizer")
            return token_ids

        eos = resolve("eos_token", eos_token)
        if eos is None:
            raise DataError(folder, "no eos token in its tokenizer files; pass eos_token=")
        bos, pad = resolve("bos_token", bos_token), resolve("pad_token", pad_token)
        # The special tokens transformers also registers at load (SPECIAL_TOKENS_ATTRIBUTES, the additional or extra
        # special tokens, added_tokens_decoder), each from the file that wins for it
        for key in ("unk_token", "sep_token", "cls_token", "mask_token", "additional_special_tokens",
                    "extra_special_tokens", "added_tokens_decoder"):
            source, file = next(((source, file) for source, file in files if source.get(key) is not None), ({}, ""))
            value, where = source.get(key), os.path.join(folder, file)
            if key == "added_tokens_decoder" and isinstance(value, dict):
                # its own special flag for each, as transformers adds them
                named += [(where, f"{key}[{i!r}]", t, t.get("special", False) if isinstance(t, dict) else True)
                          for i, t in value.items()]
            elif key.endswith("special_tokens") and isinstance(value, (list, dict)):
                # a list, or (transformers 5's extra_special_tokens) a dict of name -> token
                named += [(where, f"{key}[{i!r}]", t, True)
                          for i, t in (value.items() if isinstance(value, dict) else enumerate(value))]
            elif value is not None and key.endswith("_token"):
                named.append((where, key, value, True))
        _register_special_tokens(tk, named)
        settings = {k: v for k, v in {**files[1][0], **files[0][0]}.items() if k not in _SETTINGS_WE_WRITE}
        # special_tokens_map.json may spell tokens as AddedToken dicts, which tokenizer_config.json does not take
        for key in ("unk_token", "sep_token", "cls_token", "mask_token"):
            if key in settings:
                settings[key] = _token_str(settings[key])
        if isinstance(settings.get("additional_special_tokens"), list):
            settings["additional_special_tokens"] = [_token_str(t) for t in settings["additional_special_tokens"]]
        try:
            return cls(tk, bos, eos, pad,
                       chat_template=_saved_chat_template(folder, tok_config), settings=settings,
                       # where generation_config.json names none, transformers generates with config.json's
                       generation_eos_ids=generation_ids("eos_token") if "eos_token_id" in gen_config else
                       generation_ids("eos_token", _read_json(os.path.join(folder, "config.json")), "config.json"))
        except DataError:
            raise
        except ValueError as e:  # a special token missing from the vocabulary: say which folder named it
            raise DataError(folder, str(e).removeprefix("tokenizer: ")) from None

    def encode(self, text):
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text):
        """(ids, [(start, end) char offsets]) of `text`, offsets untrimmed."""
        enc = self._offsets_tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            # transformers counts bos, eos and pad as special whatever tokenizer.json flags them: from_pretrained
            # flags the ones the files name (_register_special_tokens), but an eos set since (use_chat_template's
            # <|im_end|>, which a saved model names as its eos) may still be flagged otherwise. Only added tokens:
            # a bos or pad taken from generation_config.json's ids may be an ordinary token ('!'), part of the text.
            special = {i for i, token in ((self.bos_id, self.bos_token), (self.eos_id, self.eos_token),
                                          (self.pad_id, self.pad_token)) if self.is_added_token(token)}
            ids = [i for i in ids if i not in special]
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self._tk.token_to_id(token)

    def is_added_token(self, token):
        """Whether `token` is one of tokenizer.json's added tokens, which are split out of the text before the
        pre-tokenizer sees it, so that it is one token wherever it appears. An ordinary vocab entry such as
        '<|im_end|>' is not: the byte-level pre-tokenizer cuts '<|' and '|>' off it, so it comes out in pieces."""
        return token in self._added_tokens

    def same_ids(self, other):
        """Whether both turn text into the same token ids (the same tokenizer.json), whatever their bos, eos and pad."""
        return self._tk.to_str() == other._tk.to_str()

    def fingerprint(self):
        """Hash of everything that changes token ids or rendered text (the cache keys use it)."""
        h = hashlib.sha256(self._tk.to_str().encode())
        h.update(json.dumps([self.bos_token, self.eos_token, self.pad_token]).encode())
        return h.hexdigest()

    def use_chat_template(self, template):
        """Record the template (a name or jinja) a model is trained with: save_pretrained writes it. A ChatML model
        ends its turns with <|im_end|>, which becomes its eos, as in SmolLM2-Instruct's files, so that tools that stop
        at the tokenizer's eos (TRL, lm-eval) stop at the end of a turn; pad keeps its token."""
        self.chat_template = template
        im_end = self.token_to_id("<|im_end|>")
        if im_end is not None and template_name(template, self) == "chatml":
            self.eos_token, self.eos_id = "<|im_end|>", im_end

    def end_of_turn_ids(self):
        """Ids that end an assistant turn under this tokenizer's chat template: the eos ids a saved model's
        generation_config.json lists, so that transformers and vLLM stop at ChatML's <|im_end|> too."""
        return stop_token_ids(self, template_name(self.chat_template, self))

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # links into a cache's blobs/: replaced (model.py)
            if os.path.islink(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        self._tk.save(os.path.join(path, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **self.settings, "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token}
        if isinstance(self.chat_template, dict):  # named templates, none of them the default: as they were given
            config["chat_template"] = [{"name": name, "template": t} for name, t in self.chat_template.items()]
        elif self.chat_template is not None:
            config["chat_template"] = CHAT_TEMPLATES.get(self.chat_template, self.chat_template)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        # transformers (and _saved_chat_template) read a chat_template.jinja before tokenizer_config.json's: one
        # left in the folder by an earlier save would replace the template written above
        if os.path.exists(os.path.join(path, "chat_template.jinja")):
            os.remove(os.path.join(path, "chat_template.jinja"))

    def __getstate__(self):  # picklable for the tokenization worker processes
        return {"json": self._tk.to_str(), "bos": self.bos_token, "eos": self.eos_token, "pad": self.pad_token,
                "chat_template": self.chat_template, "settings": self.settings,
                "generation_eos_ids": self.generation_eos_ids}

    def __setstate__(self, state):
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), state["bos"], state["eos"], state["pad"],
                      state["chat_template"], state["settings"], state["generation_eos_ids"])


# ----------------------------------------------------------------------------------------------------------------
# Chat templates. The jinja strings are what transformers runs (saved into tokenizer_config.json); render_chat
# produces exactly the same text in Python, and additionally knows which characters are trained.

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHAT_TEMPLATES = {"tulu": TULU_TEMPLATE, "chatml": CHATML_TEMPLATE}
ROLES = ("system", "user", "assistant")


def lone_surrogate(text):
    """Where text holds a lone surrogate, or None. JSON may escape one (\\ud800): it is no text, and no tokenizer
    (nor a UTF-8 file) can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def validate_messages(messages, where, require_assistant=False):
    """Raise DataError naming `where` and the problem unless `messages` is a non-empty list of
    {'role': system|user|assistant, 'content': str}."""
    if not isinstance(messages, list):
        raise DataError(where, f"messages must be a list of {{role, content}}, got {type(messages).__name__}")
    if not messages:
        raise DataError(where, "messages is an empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(where, f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise DataError(where, f"message {i} has no 'role'")
        if m["role"] not in ROLES:
            raise DataError(where, f"message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if "content" not in m:
            raise DataError(where, f"message {i} ({m['role']}) has no 'content'")
        if not isinstance(m["content"], str):
            raise DataError(where, f"message {i} ({m['role']}) has non-string content of type "
                                   f"{type(m['content']).__name__}")
        at = lone_surrogate(m["content"])
        if at is not None:
            raise DataError(where, f"message {i} ({m['role']}) has an unpaired surrogate {m['content'][at]!r} "
                                   f"at character {at}, which is not text")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(where, "no assistant message (nothing to train on)")


def _render_parts(messages, template, eos_token, add_generation_prompt, train_from):
    """The rendered conversation as a list of (text, trained) pieces. Assistant messages with index >= train_from
    are trained (preference data trains only the final response)."""
    parts = []
    last = len(messages) - 1
    if template == "tulu":
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                parts.append(("<|assistant|>\n", False))
                parts.append((m["content"] + eos_token, i >= train_from))
                if i != last:  # open-instruct masks it: its span of the next message starts after the eos
                    parts.append(("\n", False))
            else:
                parts.append((f"<|{m['role']}|>\n{m['content']}\n", False))
        if add_generation_prompt:
            parts.append(("<|assistant|>\n", False))
    elif template == "chatml":
        if messages[0]["role"] != "system":
            parts.append((f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n", False))
        for i, m in enumerate(messages):
            parts.append((f"<|im_start|>{m['role']}\n", False))
            if m["role"] == "assistant":
                parts.append((m["content"] + "<|im_end|>", i >= train_from))
                parts.append(("\n", False))
            else:
                parts.append((m["content"] + "<|im_end|>\n", False))
        if add_generation_prompt:
            parts.append(("<|im_start|>assistant\n", False))
    else:
        raise ValueError(f"unknown chat template {template!r} (expected one of {', '.join(CHAT_TEMPLATES)})")
    return parts


def _render(tok, messages, template, add_generation_prompt=False, train_from=0):
    validate_messages(messages, "messages")
    parts = _render_parts(messages, template, tok.eos_token, add_generation_prompt, train_from)
    spans, pos = [], 0
    for text, trained in parts:
        if trained and text:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    ids, offsets = tok.encode_with_offsets("".join(text for text, _ in parts))
    # Tokenise the whole string once (so ids equal HF's apply_chat_template) and mark a token trained when its
    # characters overlap a trained span; tokens and spans are both sorted, so one pass suffices.
    mask, j = [0] * len(ids), 0
    for t, (start, end) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and spans[j][0] < max(end, start + 1):
            mask[t] = 1
    return ids, mask


def render_chat(tok, messages, template="tulu", add_generation_prompt=False):
    """Render messages with a chat template -> (ids, train_mask): ids equal tokenizing the full rendered text;
    mask is 1 on assistant content and its end token (tulu: eos; chatml: <|im_end|>), the newline after either
    untrained. With add_generation_prompt the generation header is appended, untrained."""
    return _render(tok, messages, template, add_generation_prompt)


def render_chat_text(tok, messages, template="tulu", add_generation_prompt=False):
    """The text render_chat tokenizes (evaluation builds prompts as text, as lighteval does)."""
    validate_messages(messages, "messages")
    return _render_text(messages, template, tok.eos_token, add_generation_prompt)


def _render_text(messages, template, eos_token, add_generation_prompt):
    return "".join(text for text, _ in _render_parts(messages, template, eos_token, add_generation_prompt, 0))


def stop_token_ids(tok, template, generation_config=True):
    """Token ids that end an assistant turn under `template` (for generation): eos, and for ChatML <|im_end|> first
    (its eos once trained in ChatML: see Tokenizer.use_chat_template) and <|endoftext|>, the eos before that; then,
    unless generation_config=False, the other eos ids the snapshot's generation_config.json lists, where
    transformers' generate and vLLM stop too (lighteval, which eval.py follows, passes generate the tokenizer's eos,
    which replaces that list)."""
    im_end = tok.token_to_id("<|im_end|>")
    ends = [im_end, tok.eos_id, tok.token_to_id("<|endoftext|>")] if template == "chatml" and im_end is not None \
        else [tok.eos_id]
    extra = tok.generation_eos_ids if generation_config else []
    return list(dict.fromkeys(i for i in (*ends, *extra) if i is not None))


def check_vocab(tok, vocab_size, where):
    """A token id past the embedding table fails deep inside the model (a device-side assert on GPU): say so here."""
    if tok.vocab_size > vocab_size:
        raise DataError(where, f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                        f"{vocab_size}; they must come from the same snapshot")


def check_template_name(requested):
    """--template is one of ours, or '' (the one the model was saved with): checked at start-up, before any work."""
    if requested and requested not in CHAT_TEMPLATES:
        raise DataError(f"--template={requested}", f"expected {' or '.join(CHAT_TEMPLATES)} (or nothing: the template "
                                                   f"the model was saved with)")


def check_template_tokens(template, tok, where=None):
    """The markers of `template` that must each be one token of `tok` (an added token): the end of an assistant turn,
    which is trained and which generation stops at (tulu: eos; chatml: <|im_end|>), and ChatML's <|im_start|>. A
    tokenizer without them would render them as pieces of text: the end of a turn never trained as one token (ChatML's
    stop ids then fall back to eos, which ChatML never trains), so generation would run on to max_new_tokens."""
    markers = {"tulu": [tok.eos_token], "chatml": ["<|im_start|>", "<|im_end|>"]}[template]
    for marker in markers:
        if not tok.is_added_token(marker):
            has = "no" if tok.token_to_id(marker) is None else "only an ordinary vocabulary entry (no added token) for"
            hint = "; --template=tulu needs none but the tokenizer's eos" if template == "chatml" else ""
            raise DataError(where or f"--template={template}", f"the tokenizer has {has} {marker}, which the "
                            f"{template} chat template needs as one token{hint}")


def resolve_template(requested, tok):
    """The chat template to render with: `requested`, else the one the model was saved with (tulu when none).
    Rendering in another format than the model was saved with is allowed, but said; a saved template that renders
    neither like tulu nor like chatml needs a `requested` one. Either way, the tokenizer must have the template's
    tokens (check_template_tokens)."""
    check_template_name(requested)
    saved = template_name(tok.chat_template, tok)
    if requested:
        check_template_tokens(requested, tok)
        if saved and requested != saved:
            # a model trained in ChatML keeps <|im_end|> as its eos, which tulu then ends its turns with
            eos = f" (whose turns end with this tokenizer's eos, {tok.eos_token})" if requested == "tulu" else ""
            log.warning(f"the model was saved with the {saved} chat template; using {requested}{eos} (--template)")
        return requested
    if isinstance(tok.chat_template, NamedChatTemplates):
        raise DataError(tok.chat_template.where, f"chat_template lists the templates {sorted(tok.chat_template)}, "
                        f"none of them named 'default'; pass --template=tulu or --template=chatml")
    if tok.chat_template and saved is None:
        messages, add_generation_prompt = TEMPLATE_PROBES[0]
        try:
            theirs = repr(_render_jinja(tok.chat_template, messages, add_generation_prompt, tok))
        except Exception as e:  # jinja's errors, or whatever the template's own code raises
            theirs = f"an error ({type(e).__name__}: {e})"
        ours = ", ".join(f"{name} {_render_text(messages, name, tok.eos_token, add_generation_prompt)!r}"
                         for name in CHAT_TEMPLATES)
        raise DataError("the model's saved chat template", f"renders neither like tulu nor like chatml (a user turn "
                        f"'Hi' with the generation prompt: {theirs[:300]}; ours: {ours}); pass --template=tulu or "
                        f"--template=chatml to train and evaluate with ours (a trained model is saved with it)")
    check_template_tokens(saved or "tulu", tok, f"the model's saved chat template ({saved})" if saved else
                          "the default chat template (tulu)")
    return saved or "tulu"


# Conversations on which our templates and their look-alikes differ: ChatML's default system turn (SmolLM2's
# inserts one when the first message is not a system message, whatever comes later), a given system turn, the
# newline after a non-final assistant turn and none after the final one (Tulu 3's), where eos goes, a bos before
# everything (OLMo 2's Tulu), content kept as it is (no trimming), the generation prompt.
TEMPLATE_PROBES = [
    ([{"role": "user", "content": "Hi"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
      {"role": "assistant", "content": "6"}], False),
    ([{"role": "user", "content": "  Spaced out \n\n"}, {"role": "system", "content": " Later. "},
      {"role": "assistant", "content": "\n ok  "}], False),
]


def _render_jinja(template, messages, add_generation_prompt, tok):
    """A saved jinja chat template rendered as transformers' apply_chat_template renders it: a sandboxed jinja2
    environment (jinja2 comes with torch) that trims the whitespace around blocks, with transformers' extras
    (raise_exception, strftime_now, a tojson that keeps non-ASCII text, the {% generation %} tag that marks
    assistant text, tools and documents given as None) and the special tokens."""
    import datetime

    import jinja2.ext
    import jinja2.sandbox

    class GenerationTag(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    tokens = {name: getattr(tok, name) for name in ("bos_token", "eos_token", "pad_token")
              if getattr(tok, name) is not None}
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            tools=None, documents=None, **tokens)


def template_name(chat_template, tok):
    """Which of our templates a saved chat_template is: our trainers save 'tulu' or 'chatml' (as their jinja, in
    tokenizer_config.json); other jinja (SmolLM2-Instruct's, AllenAI's Tulu 3 models') is the one of ours it renders
    exactly like on TEMPLATE_PROBES, with `tok`'s special tokens. None when there is no template, or it renders like
    neither (a ChatML without SmolLM2's default system turn, say, on which ours would train something else)."""
    if not isinstance(chat_template, str):  # none, or named templates with no default (NamedChatTemplates)
        return None
    if chat_template in CHAT_TEMPLATES:
        return chat_template
    if not chat_template:
        return None
    try:
        theirs = [_render_jinja(chat_template, messages, generation, tok) for messages, generation in TEMPLATE_PROBES]
    except Exception:  # a template that cannot render these conversations is not one of ours
        return None
    for name in CHAT_TEMPLATES:
        if theirs == [_render_text(messages, name, tok.eos_token, generation) for messages, generation in
                      TEMPLATE_PROBES]:
            return name
    return None


# ----------------------------------------------------------------------------------------------------------------
# Readers: jsonl / json / parquet; a file, a folder, a glob, a list of those, or a list of in-memory row dicts.

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


# A split is the word a hub file name starts with; UltraFeedback's and ultrachat's suffixes name splits of their own
# (train_prefs, test_sft, ...), while a user's train_math.jsonl and train_code.jsonl are parts of one.
_SPLIT = re.compile(r"(train|test|validation|valid|dev|eval)(_(?:prefs|sft|gen))?(?=[-_.\d]|$)", re.IGNORECASE)


def split_names(files):
    """{split: its files} for the files whose names say which dataset split they hold: 'train' for train.jsonl,
    train_1.jsonl or train-00000-of-00004.parquet, 'test_prefs' for UltraFeedback's test_prefs-00000-of-00001.parquet,
    'train_sft' for ultrachat_200k's train_sft-00000-of-00003-a3ecf92756993583.parquet, and the folder's for the
    hub's parquet export (default/test/0000.parquet). Names that start with no split word (rows.jsonl,
    training_data.jsonl) say nothing."""
    splits = {}
    for f in files:
        name = os.path.basename(f)
        said = _SPLIT.match(name) or (re.match(r"\d+\.", name) and _SPLIT.match(os.path.basename(os.path.dirname(f))))
        if said:
            splits.setdefault(said.group().lower(), []).append(f)
    return splits


def data_files(spec):
    """The data files of spec (a file, a folder, a glob, or a list of those), sorted; DataError if none, or if a
    folder or a glob takes the files of several splits (a hub dataset's train and test shards), which read as one
    would train on the test split, or one file in two formats (train.jsonl beside train.parquet)."""
    if isinstance(spec, (list, tuple)):
        return [f for s in spec for f in data_files(s)]
    spec = os.fspath(spec)
    files = _data_files(spec)
    splits = split_names(files)
    if len(splits) > 1:
        one = min(splits, key=lambda s: (not s.startswith("train"), s))  # a train split, as an example
        some = ", ".join(splits[one][:3]) + (f" and {len(splits[one]) - 3} more" if len(splits[one]) > 3 else "")
        raise DataError(spec, f"holds the files of {len(splits)} splits ({', '.join(sorted(splits))}), which would be "
                              f"read as one: name one split's files (a file, or a glob that takes only them; {one}: "
                              f"{some})")
    by_stem = {}
    for f in files:
        by_stem.setdefault(os.path.splitext(f)[0], []).append(f)
    twice = next((same for same in by_stem.values() if len(same) > 1), None)
    if twice:  # an export in two formats beside each other: read as one, every row would be trained on twice
        raise DataError(spec, f"holds the same file in {len(twice)} formats ({', '.join(twice)}), which would be read "
                              "as one: name one of them")
    return files


def _data_files(spec):
    if os.path.isdir(spec):
        names = sorted(os.listdir(spec))
        files = [os.path.join(spec, f) for f in names if f.endswith(DATA_SUFFIXES)]
        if not files:
            subfolders = [f for f in names if os.path.isdir(os.path.join(spec, f)) and not f.startswith(".")]
            hint = f" (its subfolders: {', '.join(subfolders[:5])}; give one, or a glob such as " \
                   f"{os.path.join(spec, '**', '*.parquet')})" if subfolders else ""
            raise DataError(spec, f"folder has no {'/'.join(DATA_SUFFIXES)} files{hint}")
        others = [f for f in names if not f.endswith(DATA_SUFFIXES) and not f.startswith(".")]
        if others:  # a .jsonl.gz or a subfolder of shards is not read: say so
            log.warning(f"{spec}: reading the {len(files)} {'/'.join(DATA_SUFFIXES)} file(s) only, not "
                        f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''} (subfolders and other types)")
        return files
    if os.path.isfile(spec):
        if not spec.endswith(DATA_SUFFIXES):
            raise DataError(spec, f"unsupported file type (expected {', '.join(DATA_SUFFIXES)})")
        return [spec]
    if glob.has_magic(spec):
        files = sorted(f for f in glob.glob(spec, recursive=True) if f.endswith(DATA_SUFFIXES))
        if not files:
            raise DataError(spec, "glob matches no data files")
        return files
    raise DataError(spec, "no such file, folder or glob")


def _jsonl_rows(path, lines):
    for lineno, line in enumerate(lines, 1):
        where = f"{path} line {lineno}"
        if isinstance(line, bytes):  # decoded here, line by line, so that a bad byte is named with its line
            try:
                line = line.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: skip a byte-order mark
            except UnicodeDecodeError as e:
                yield where, DataError(where, f"not UTF-8 text ({e.reason} at byte {e.start} of the line)")
                continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, DataError(where, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        yield where, row if isinstance(row, dict) else DataError(where, f"row is a {type(row).__name__}, not an object")


def _is_one_json_object(text):
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:  # JSON lines: "Extra data" after the first row
        return False


def _iter_raw(spec):
    """Yield (where, row dict or DataError) so that loaders can either raise or skip bad rows."""
    if isinstance(spec, (list, tuple)) and any(isinstance(r, dict) for r in spec):  # rows, not paths
        for i, row in enumerate(spec):
            where = f"rows[{i}]"
            not_object = DataError(where, f"row is a {type(row).__name__}, not an object")
            yield where, row if isinstance(row, dict) else not_object
        return
    for path in data_files(spec):
        if path.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or convert it to jsonl)")
            i = 0
            try:
                parquet = pq.ParquetFile(path)
            except Exception as e:  # pyarrow's errors (a truncated download: "magic bytes not found") name no file
                raise DataError(path, f"not a readable parquet file ({e})") from None
            batches = parquet.iter_batches(batch_size=1024)
            while True:
                try:
                    batch = next(batches, None)
                except Exception as e:  # a damaged page behind an intact footer; pyarrow names no file
                    raise DataError(path, f"unreadable after row {i} ({e})") from None
                if batch is None:
                    break
                for row in batch.to_pylist():
                    yield f"{path} row {i}", row
                    i += 1
            continue
        if path.endswith(".jsonl"):
            with open(path, "rb") as f:  # line by line: a multi-GB export never sits in memory
                yield from _jsonl_rows(path, f)
            continue
        with open(path, encoding="utf-8-sig") as f:
            try:
                text = f.read()
            except UnicodeDecodeError as e:
                raise DataError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.lstrip().startswith("["):  # datasets' to_json writes JSON lines into .json files
            if "\n" in text.strip() and _is_one_json_object(text):
                yield path, DataError(path, "a .json file must hold a list of row objects, or one object per line; "
                                            "this one holds a single object spanning several lines")
                continue
            # split on \n only: JSON strings may hold U+2028 and other characters that str.splitlines breaks on
            yield from _jsonl_rows(path, text.split("\n"))
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            yield path, DataError(f"{path} line {e.lineno}", f"invalid JSON ({e.msg})")
            continue
        if not isinstance(data, list):
            yield path, DataError(path, "a .json file must hold a list of row objects")
            continue
        for i, row in enumerate(data):
            where = f"{path} row {i}"
            yield where, row if isinstance(row, dict) else DataError(where, f"row is a {type(row).__name__}, not an object")


def read_rows(spec):
    """Iterate (where, row) over every row of spec; raise DataError on an unreadable row."""
    for where, row in _iter_raw(spec):
        if isinstance(row, DataError):
            raise row
        yield where, row


class Rows(list):
    """A list of normalised rows that remembers how many bad rows were skipped to build it; tokenized rows also
    carry a digest of what made them (data, tokenizer, template, length), which a resumed run checks."""
    num_skipped = 0
    digest = None


def _load(spec, normalize, kind, skip_bad):
    rows, skipped, first_error = Rows(), 0, None
    for where, raw in _iter_raw(spec):
        try:
            if isinstance(raw, DataError):
                raise raw
            rows.append(normalize(raw, where))
        except DataError as e:
            if not skip_bad:  # the trainers' --skip_bad_rows=true sets skip_bad
                raise DataError(e.where, f"{e.problem} (skip_bad_rows=true skips such rows, counting them)") from None
            skipped += 1
            first_error = first_error or e
    if skipped:
        log.warning(f"skipped {skipped} bad {kind} rows of {skipped + len(rows)} (skip_bad=True); first: {first_error}")
    if not rows:
        where = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else f"{len(spec)} specs/rows"
        raise DataError(where, f"no usable {kind} rows")
    rows.num_skipped = skipped
    return rows


def _normalize_sft(row, where):
    if "messages" not in row:
        raise DataError(where, f"missing 'messages' (keys: {', '.join(row) or 'none'})")
    validate_messages(row["messages"], where, require_assistant=True)
    return row


def load_sft_rows(spec, skip_bad=False):
    """SFT rows {'messages': [...], ...} (Tulu SFT format); other keys (id, source) are kept."""
    return _load(spec, _normalize_sft, "SFT", skip_bad)


def _as_messages(value, role, where, name):
    # The prompt/chosen/rejected form may give plain strings instead of message lists
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if value is None:
        raise DataError(where, f"'{name}' is null")
    if not isinstance(value, list):
        raise DataError(where, f"'{name}' must be a string or a list of messages, got {type(value).__name__}")
    return value


def _is_json_messages(text):
    if not text.lstrip().startswith("["):
        return False
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _normalize_preference(row, where):
    """Two layouts. Tulu's: chosen and rejected are whole conversations sharing everything but the final
    assistant message (the mixture's `prompt` column, a string copy of the first user turn, is then not used).
    The prompt + responses one (TRL's): chosen and rejected hold only responses (strings or assistant messages)
    and `prompt` (a string or messages) the conversation before them."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(where, f"missing '{key}' (keys: {', '.join(row) or 'none'})")
    if all(isinstance(row[key], str) and _is_json_messages(row[key]) for key in ("chosen", "rejected")):
        # an export that stored the message lists as JSON text: read as plain responses, the JSON would be trained
        raise DataError(where, "chosen and rejected are strings holding JSON lists of messages: store the lists "
                               "themselves (decode the columns with json.loads)")
    given = {}
    for key in ("chosen", "rejected"):
        given[key] = _as_messages(row[key], "assistant", where, key)
        validate_messages(given[key], f"{where} ({key})")
    if any(m["role"] != "assistant" for msgs in given.values() for m in msgs):  # whole conversations
        for key, msgs in given.items():
            if msgs[-1]["role"] != "assistant":
                raise DataError(where, f"{key} does not end with an assistant message")
        prompt = given["chosen"][:-1]
        if given["rejected"][:-1] != prompt:
            n = min(len(prompt), len(given["rejected"]) - 1)
            k = next((i for i in range(n) if prompt[i] != given["rejected"][i]), n)
            raise DataError(where, f"chosen and rejected prompts differ (first difference at message {k})")
        responses = {key: msgs[-1:] for key, msgs in given.items()}
    else:
        if row.get("prompt") is None:
            raise DataError(where, "no prompt: chosen/rejected hold only responses and there is no 'prompt'")
        prompt = _as_messages(row["prompt"], "user", where, "prompt")
        validate_messages(prompt, f"{where} (prompt)")
        responses = given
    for key, msgs in responses.items():
        if not msgs:
            raise DataError(where, f"empty {key} response (no messages after the prompt)")
        validate_messages(msgs, f"{where} ({key})")
        if msgs[-1]["role"] != "assistant":
            raise DataError(where, f"{key} response does not end with an assistant message")
        # an empty response is kept, as open-instruct keeps it: a model that answered nothing is a real rejected
        # answer, and its end-of-turn token is still trained
    out = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    out.update(prompt=prompt, chosen=responses["chosen"], rejected=responses["rejected"])
    return out


def load_preference_rows(spec, skip_bad=False):
    """Preference rows, normalised to {'prompt': messages, 'chosen': [assistant msg], 'rejected': [...]}.
    Accepts Tulu's full chosen/rejected lists (sharing the prompt) and the prompt + chosen + rejected form."""
    rows = _load(spec, _normalize_preference, "preference", skip_bad)
    same = [r for r in rows if r["chosen"] == r["rejected"]]
    if same:  # kept (they are valid rows), but said: they teach nothing and count as misranked
        first = same[0]
        which = f"id {first['id']!r}" if first.get("id") is not None else \
            f"the pair whose prompt ends {first['prompt'][-1]['content'][-60:]!r}"
        log.warning(f"{spec if isinstance(spec, str) else 'preference rows'}: {len(same)} of {len(rows)} pairs have "
                    f"the same chosen and rejected answer (no gradient; counted as wrong in preference accuracy); "
                    f"first: {which}")
    return rows


def _normalize_rlvr(row, where, check_ground_truth=None):
    for key in ("messages", "ground_truth", "dataset"):
        if row.get(key) is None:
            raise DataError(where, f"'{key}' is null" if key in row else f"missing '{key}'")
    messages = row["messages"]
    validate_messages(messages, where)
    if len(messages) > 1 and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # the reference answer is not part of the prompt
    if messages[-1]["role"] == "assistant":
        raise DataError(where, "the prompt ends with an assistant message (only the last message may be the "
                        "reference answer)" if len(messages) > 1 else "prompt holds only an assistant message")
    if not any(m["role"] == "user" for m in messages):  # a system prompt alone: no question to verify an answer to
        raise DataError(where, "the prompt has no user message")
    gt = row["ground_truth"]
    if isinstance(gt, (list, dict)):
        if str(row["dataset"]).lower() != "ifeval":  # a JSON dump of ['5'] would never verify against '5'
            raise DataError(where, f"ground_truth of a {row['dataset']!r} row must be a string or a number, "
                            f"got a {type(gt).__name__}: {gt!r}")
        gt = json.dumps(gt)
    elif isinstance(gt, (int, float)) and not isinstance(gt, bool):
        gt = str(gt)
    if not isinstance(gt, str) or not gt.strip():
        raise DataError(where, f"ground_truth must be a non-empty string, got {gt!r}")
    if not isinstance(row["dataset"], str) or not row["dataset"].strip():
        raise DataError(where, f"dataset must be a non-empty string, got {row['dataset']!r}")
    if check_ground_truth is not None:
        try:
            check_ground_truth(row["dataset"], gt)
        except ValueError as e:
            raise DataError(where, str(e)) from None
    return {"messages": messages, "ground_truth": gt, "dataset": row["dataset"]}


def load_rlvr_rows(spec, skip_bad=False, check_ground_truth=None):
    """RLVR rows normalised to {'messages': prompt (reference answer dropped), 'ground_truth': str, 'dataset': str}.
    check_ground_truth(dataset, ground_truth) raising ValueError (train_rlvr.py passes the verifier) makes a truth
    the reward could not use a bad row here, named, instead of an error in the middle of training."""
    return _load(spec, functools.partial(_normalize_rlvr, check_ground_truth=check_ground_truth), "RLVR", skip_bad)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization, in parallel, cached on disk keyed by (data, tokenizer, template, max length, settings).

_worker_tok = None
# per kind of cache: bump one when its rendering or truncation rules change, so its old caches are not reused
CACHE_VERSIONS = {"sft": 4, "pref": 5}


def _init_worker(tok):
    global _worker_tok
    _worker_tok = tok
    # a forked worker inherits the trainer's SIGTERM handler (common.run_script), and the pool ends its workers with
    # SIGTERM: each then raised, and printed a traceback, at every run's tokenization
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _tokenize_sft_chunk(args):
    rows, template, max_seq_len = args
    out = []
    for row in rows:
        ids, mask = _render(_worker_tok, row["messages"], template)
        out.append((ids[:max_seq_len], mask[:max_seq_len]))
    return out


def _truncate_pair(pair, max_seq_len, policy):
    """[(ids, mask), (ids, mask)] cut to max_seq_len, or None (policy 'drop'). 'left' drops the same number of
    oldest prompt tokens from both sides, so that chosen and rejected are scored in the same context, keeping at
    least one prompt token so that the first response token has a label; a response that still does not fit loses
    its end, and a pair left without a response token on either side is dropped (None). 'right' cuts each side at
    its own end, as Tulu 3's DPO did (each side tokenized with truncation at max_length, then pairs with no label left
    on a side filtered out): the whole prompt is kept, and an overlong response loses its end and eos."""
    longest = max(len(ids) for ids, _ in pair)
    if longest <= max_seq_len:
        return pair
    if policy == "drop":
        return None
    if policy == "right":
        cut = [(ids[:max_seq_len], mask[:max_seq_len]) for ids, mask in pair]
        return cut if all(1 in mask for _, mask in cut) else None
    prompt_len = min(mask.index(1) if 1 in mask else len(ids) for ids, mask in pair)
    start = min(longest - max_seq_len, max(prompt_len - 1, 0))
    cut = [(ids[start:start + max_seq_len], mask[start:start + max_seq_len]) for ids, mask in pair]
    return cut if all(1 in mask for _, mask in cut) else None


def _tokenize_preference_chunk(args):
    rows, template, max_seq_len, policy = args
    out = []
    for row in rows:
        # only the final message is trained, as open-instruct does; a response of several (TRL's layout allows it)
        # keeps the others as context, so that a cut that leaves none of the final message drops the pair
        pair = [_render(_worker_tok, row["prompt"] + row[key], template, train_from=len(row["prompt"] + row[key]) - 1)
                for key in ("chosen", "rejected")]
        pair = _truncate_pair(pair, max_seq_len, policy)
        # A dropped pair is stored as two empty sequences, so the cache keeps one entry per row
        out.extend([([], []), ([], [])] if pair is None else pair)
    return out


def fingerprint_rows(rows, keys):
    """A digest of the rows' values under `keys`, in order: the cache keys, and what a resume checks it trains on."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row[k] for k in keys], sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _map_chunks(fn, rows, extra, tok, num_workers, progress, desc):
    from tqdm import tqdm
    chunk = 256
    jobs = [(rows[i:i + chunk],) + extra for i in range(0, len(rows), chunk)]
    bar = tqdm(total=len(rows), desc=desc, unit="rows", disable=not progress)
    out = []
    if num_workers > 1 and len(jobs) > 1:
        # fork keeps start-up cheap (no re-import of torch); workers only touch the tokenizer
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(min(num_workers, len(jobs)), initializer=_init_worker, initargs=(tok,)) as pool:
            for job, result in zip(jobs, pool.imap(fn, jobs)):
                out.extend(result)
                bar.update(len(job[0]))
    else:
        _init_worker(tok)
        for job in jobs:
            out.extend(fn(job))
            bar.update(len(job[0]))
    bar.close()
    return out


def write_atomic(path, write):
    """Make the file at path by write(tmp), tmp a temporary name beside it, then a rename: readers (other ranks,
    other runs sharing the cache) see the whole file or none. The temporary name carries this host and pid, so that
    a later write into the folder deletes what a killed process (kill -9, an OOM kill) left half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    host = socket.gethostname()
    for name in os.listdir(folder):
        left = re.fullmatch(r".+\.tmp\.(.+)\.(\d+)", name)
        if left and left[1] == host and not _process_alive(int(left[2])):
            with contextlib.suppress(FileNotFoundError):  # another rank cleaned it first
                os.remove(os.path.join(folder, name))
    tmp = f"{path}.tmp.{host}.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk: leave no partial file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _process_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True


def _save_npz(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: given a name, np.savez would append .npz to it
            np.savez(f, **arrays)
    write_atomic(path, write)


def _digest(parts):
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _tokenize_cached(kind, fn, rows, key_parts, extra, tok, cache_dir, num_workers, progress):
    """Run fn over rows (in parallel) to sequences of (ids, mask), or load them from cache_dir. Returns the list of
    (ids int32, mask uint8)."""
    path = None
    if cache_dir is not None:
        key = _digest([CACHE_VERSIONS[kind], kind, *key_parts])[:24]
        path = os.path.join(cache_dir, f"{kind}-{key}.npz")
        if os.path.exists(path):
            try:
                with np.load(path) as z:
                    ids, mask, offsets = z["ids"], z["mask"], z["offsets"]
            except Exception as e:  # a disk that broke the file after its atomic write
                raise DataError(path, f"the cached tokenized {kind} data cannot be read ({type(e).__name__}: {e}); "
                                "delete the file to tokenize again") from e
            log.info(f"loaded {len(offsets) - 1} tokenized {kind} sequences from {path}")
            return [(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    seqs = _map_chunks(fn, rows, extra, tok, num_workers, progress, f"tokenizing {kind}")
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids, _ in seqs])
    ids = np.fromiter((t for s, _ in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    mask = np.fromiter((t for _, m in seqs for t in m), dtype=np.uint8, count=int(offsets[-1]))
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        _save_npz(path, ids=ids, mask=mask, offsets=offsets)
    return [(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def _default_workers():
    return min(os.cpu_count() or 1, 8)


def tokenize_sft(rows, tok, template, max_seq_len, cache_dir=None, num_workers=None, progress=True, split=""):
    """Render and tokenize SFT rows -> Rows of (ids np.int32, mask np.uint8), truncated to max_seq_len. A row with
    no trained token left after truncation is dropped (as open-instruct does) and counted in num_skipped.
    With cache_dir, the result is stored under a key of (data, tokenizer, template, max_seq_len) and reused.
    `split` ("train", "held-out") names the rows in the warnings."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r} (expected one of {', '.join(CHAT_TEMPLATES)})")
    key = (fingerprint_rows(rows, ["messages"]), tok.fingerprint(), template, max_seq_len)
    seqs = _tokenize_cached("sft", _tokenize_sft_chunk, rows, key, (template, max_seq_len), tok, cache_dir,
                            num_workers or _default_workers(), progress)
    out = Rows(s for s in seqs if s[1].any())
    out.num_skipped, out.digest = len(seqs) - len(out), _digest(key)
    what = f"{split} SFT rows".lstrip()
    if out.num_skipped:
        log.warning(f"dropped {out.num_skipped} {what} with no trained token within max_seq_len={max_seq_len}")
    full = sum(1 for ids, _ in out if len(ids) == max_seq_len)
    if full:
        log.warning(f"{full} {what} fill max_seq_len={max_seq_len}: longer ones were cut at the end")
    return out


TRUNCATIONS = ("left", "right", "drop")  # of preference pairs over max_seq_len (see _truncate_pair)


def tokenize_preference(rows, tok, template, max_seq_len, truncation="left", cache_dir=None, num_workers=None,
                        progress=True, split=""):
    """Tokenize normalised preference rows -> Rows of {'chosen': (ids, mask), 'rejected': (ids, mask)} where only
    the final response is trained. Pairs longer than max_seq_len are cut from the left of the prompt
    (truncation='left'), each side at its end (truncation='right', Tulu 3's DPO), a pair that keeps no response
    token on a side being dropped, or dropped (truncation='drop'); all are reported, naming the `split`."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r} (expected one of {', '.join(CHAT_TEMPLATES)})")
    key = (fingerprint_rows(rows, ["prompt", "chosen", "rejected"]), tok.fingerprint(), template, max_seq_len,
           truncation)
    seqs = _tokenize_cached("pref", _tokenize_preference_chunk, rows, key, (template, max_seq_len, truncation),
                            tok, cache_dir, num_workers or _default_workers(), progress)
    out = Rows()
    for c, r in zip(seqs[0::2], seqs[1::2]):
        if len(c[0]):
            out.append({"chosen": c, "rejected": r})
    out.num_skipped, out.digest = len(seqs) // 2 - len(out), _digest(key)
    what = f"{split} preference pairs".lstrip()
    if out.num_skipped:
        log.warning(f"dropped {out.num_skipped} {what} longer than {max_seq_len} tokens " +
                    ("(truncation='drop')" if truncation == "drop" else "that had no response token left when cut"))
    full = sum(1 for row in out if max_seq_len in (len(row["chosen"][0]), len(row["rejected"][0])))
    if truncation != "drop" and full:
        log.warning(f"{full} {what} fill max_seq_len={max_seq_len}: " + (
            "longer ones lost their oldest prompt tokens, and a response that still did not fit lost its end"
            if truncation == "left" else "longer responses lost their ends"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Packing and collation. Labels come out pre-shifted: labels[t] is the target for the prediction made at t.


def pack_best_fit(lengths, max_seq_len):
    """Best-fit decreasing: put each sequence (longest first) into the open bin with the least room that still
    fits it. Returns bins as lists of indices; no sequence is split."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    bins, free = [], []  # free: sorted (room left, bin index)
    for i in order:
        n = int(lengths[i])
        if n > max_seq_len:
            raise ValueError(f"pack_best_fit: sequence {i} has length {n} > max_seq_len {max_seq_len}")
        k = bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        insort(free, (room - n, b))
    return bins


def _collate(examples, groups, T, pad_id):
    import torch
    B = len(groups)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    doc_ids = np.zeros((B, T), dtype=np.int64)
    for b, group in enumerate(groups):
        p = 0
        for d, i in enumerate(group):
            ids = np.asarray(examples[i][0], dtype=np.int64)
            mask = np.asarray(examples[i][1], dtype=bool)
            n = len(ids)
            if p + n > T:
                raise ValueError(f"collate: row {b} needs {p + n} tokens > {T} (example {i} of length {n})")
            input_ids[b, p:p + n] = ids
            labels[b, p:p + n - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
            position_ids[b, p:p + n] = np.arange(n)
            doc_ids[b, p:p + n] = d
            p += n
        doc_ids[b, p:] = len(group)  # padding is its own document, so it never attends into a real one
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids), "doc_ids": torch.from_numpy(doc_ids)}


def collate_packed(examples, bins, max_seq_len, pad_id):
    """One row per bin (a list of example indices), rows of length max_seq_len; returns input_ids, labels
    (pre-shifted, -100 where not trained or across a document boundary), position_ids (restarting per document)
    and doc_ids (document number within the row; padding gets the next number)."""
    return _collate(examples, bins, max_seq_len, pad_id)


def collate_padded(examples, rows, max_seq_len, pad_id):
    """One example per row (rows: example indices), right-padded to the longest in the batch: input_ids and labels
    only. With the padding last, plain causal attention from position 0 is exact for every real token and nothing
    reads the padding's outputs, so the model needs no positions or document mask, and without a mask SDPA runs
    its flash kernel (a mask would send it to a slower one that computes the whole [T, T] square)."""
    T = max(len(examples[i][0]) for i in rows)
    if T > max_seq_len:
        raise ValueError(f"collate_padded: an example has length {T} > max_seq_len {max_seq_len}")
    batch = _collate(examples, [[i] for i in rows], T, pad_id)
    return {"input_ids": batch["input_ids"], "labels": batch["labels"]}


# ----------------------------------------------------------------------------------------------------------------
# Sampling


class EpochSampler:
    """One stream of item indices shared by every rank: epoch 0's shuffled order (from seed and epoch), then epoch 1's,
    and so on. Each call of next_batch(n), made by all ranks in lockstep, takes the stream's next n x world_size items
    and deals them round-robin, so this rank gets n of them. The stream does not depend on the number of ranks: the
    same effective batch trains on the same items whether it is split over ranks or over accumulation steps, each
    item once per epoch, and a run resumed on another number of ranks continues exactly where it stopped.
    A batch that runs past the end of an epoch continues with the next epoch's order."""

    def __init__(self, num_items, seed, rank=0, world_size=1):
        if num_items <= 0:
            raise ValueError(f"EpochSampler: num_items must be positive, got {num_items}")
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: rank {rank} not in [0, {world_size})")
        self.num_items, self.seed, self.rank, self.world_size = num_items, seed, rank, world_size
        self.epoch, self.consumed = 0, 0  # consumed: items of this epoch's order taken by all ranks together
        self._order = (None, None)  # (epoch, its order): drawn once per epoch, not on every micro-batch

    def order(self, epoch):
        """Every index, in the order `epoch` takes them (all ranks together)."""
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_items).tolist())
        return self._order[1]

    def next_batch(self, n):
        """This rank's n indices of the stream's next n x world_size."""
        block = []
        while len(block) < n * self.world_size:
            take = self.order(self.epoch)[self.consumed:self.consumed + n * self.world_size - len(block)]
            block.extend(take)
            self.consumed += len(take)
            if self.consumed == self.num_items:
                self.epoch, self.consumed = self.epoch + 1, 0
        return block[self.rank::self.world_size]

    def state_dict(self):
        return {"epoch": self.epoch, "consumed": self.consumed, "num_items": self.num_items, "seed": self.seed}

    def load_state_dict(self, state):
        for key in ("num_items", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"EpochSampler.load_state_dict: checkpoint has {key}={state[key]}, "
                                 f"this run has {getattr(self, key)} (the data or seed changed)")
        # checkpoints written before the stream was shared held each rank's position in its share of the epoch
        consumed = state["consumed"] if "consumed" in state else \
            state["position"] * state.get("world_size", self.world_size)
        self.epoch, self.consumed = int(state["epoch"]), int(consumed)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic demo tasks: small enough for a ~1M-parameter model trained from scratch on a CPU for minutes.
# (a) arithmetic word problems with numbers 1..20, one or two steps, answer after '####' as in GSM8K;
# (b) short writing requests with one verifiable constraint, checked like open-instruct's RLVR IF data.

_NAMES = ["Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lea"]
_OBJECTS = ["apples", "books", "coins", "pens", "cards", "shells", "stickers", "marbles", "eggs", "cups"]
# (prompt, steps) where steps are (x, op, y) with y given by name; '_' refers to the previous result
_ARITH_TEMPLATES = [
    ("{n} has {a} {o}. {n} finds {b} more {o}. How many {o} does {n} have now?", [("a", "+", "b")]),
    ("{n} has {a} {o} and {m} has {b} {o}. How many {o} do they have together?", [("a", "+", "b")]),
    ("{n} has {a} {o}. {m} has {b} more {o} than {n}. How many {o} does {m} have?", [("a", "+", "b")]),
    ("{n} has {a} {o} and gives {b} {o} to {m}. How many {o} does {n} have left?", [("a", "-", "b")]),
    ("{n} has {a} {o}. {n} buys {b} more and then loses {c}. How many {o} does {n} have now?",
     [("a", "+", "b"), ("_", "-", "c")]),
    ("{n} had {a} {o}, gave away {b}, and then got {c} more. How many {o} does {n} have now?",
     [("a", "-", "b"), ("_", "+", "c")]),
]


def _arith_problem(rng):
    prompt, steps = rng.choice(_ARITH_TEMPLATES)
    n, m = rng.sample(_NAMES, 2)
    # subtraction never goes below 1, so every answer is a positive count
    vals = {"a": rng.randint(2 if steps[0][1] == "-" else 1, 20)}
    lines, result = [], None
    for x, op, y in steps:
        left = vals["a"] if x == "a" else result
        vals[y] = rng.randint(1, 20) if op == "+" else rng.randint(1, min(left - 1, 20))
        result = left + vals[y] if op == "+" else left - vals[y]
        lines.append((left, op, vals[y], result))
    return prompt.format(n=n, m=m, o=rng.choice(_OBJECTS), **vals), lines, result


def _arith_response(lines, final):
    steps = [f"{x} {op} {y} = {z}" for x, op, y, z in lines[:-1]]
    x, op, y, _ = lines[-1]
    return "\n".join(steps + [f"{x} {op} {y} = {final}", f"#### {final}"])


_TOPICS = ["the sea", "cats", "the moon", "bread", "trains", "winter", "gardens", "music", "rain", "bikes", "tea",
           "birds", "snow", "maps", "clocks", "dogs", "summer", "forests", "boats", "stars", "soup", "hills",
           "lamps", "bees", "kites", "cheese", "owls", "autumn", "buses", "shoes"]
_PROMPTS = ["Write a short note about {t}.", "Tell me about {t}.", "Describe {t} in a few sentences.",
            "Say something about {t}.", "Write a few lines on {t}."]
_SENTENCES = ["I often think about {t}.", "Many people enjoy {t}.", "I like to learn about {t}.",
              "A day with {t} is calm.", "There is much to say about {t}.", "People write songs about {t}."]
_COMMA_SENTENCES = ["In the end, {t} made me smile.", "For me, thinking about {t} brings calm.",
                    "Honestly, I could talk about {t} all day."]
_KEYWORDS = ["apple", "river", "happy", "golden", "window", "friend"]
_END_PHRASES = ["Is there anything else?", "That is all.", "Thank you for reading.", "Have a nice day."]
_WORD_LIMITS = [8, 10, 12]
# (constraint kind, parameter) variants; every prompt names exactly one
_CONSTRAINTS = ([("lowercase", None), ("no_commas", None)] + [("keyword", k) for k in _KEYWORDS]
                + [("end", p) for p in _END_PHRASES] + [("max_words", n) for n in _WORD_LIMITS])


def _constraint_instruction(kind, arg):
    return {"lowercase": "Use only lowercase letters.", "no_commas": "Do not use any commas.",
            "keyword": f"Include the word {arg}.", "end": f'End your reply with the phrase "{arg}".',
            "max_words": f"Use at most {arg} words."}[kind]


def _constraint_ground_truth(kind, arg):
    return json.dumps({"lowercase": {"func_name": "validate_lowercase"},
                       "no_commas": {"func_name": "validate_no_commas"},
                       "keyword": {"func_name": "verify_keywords", "keyword_list": [arg]},
                       "end": {"func_name": "validate_end", "end_phrase": arg},
                       "max_words": {"func_name": "validate_word_constraint", "N": arg, "quantifier": "at most"}}[kind])


def _constraint_responses(rng, topic, kind, arg):
    """(chosen that satisfies the constraint, rejected that breaks it)."""
    plain = [s.format(t=topic) for s in rng.sample(_SENTENCES, 3)]
    comma = rng.choice(_COMMA_SENTENCES).format(t=topic)
    base = " ".join(plain[:2])
    if kind == "lowercase":
        return base.lower() + " " + comma.lower(), base + " " + comma
    if kind == "no_commas":
        return " ".join(plain), base + " " + comma
    if kind == "keyword":
        return f"{base} It makes me think of the word {arg}.", base + " " + comma
    if kind == "end":
        return f"{base} {arg}", base + " " + comma
    # every sentence has at most 8 words (the smallest limit) and three always exceed 12
    return plain[0], " ".join(plain)


def _unique_problems(make, count, rng, what):
    seen, out, attempts = set(), [], 0
    while len(out) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"make_demo_data: cannot draw {count} distinct {what} problems; ask for fewer")
        problem = make(rng)
        if problem[0] not in seen:
            seen.add(problem[0])
            out.append(problem)
    return out


def _constraint_problem(rng):
    topic, template = rng.choice(_TOPICS), rng.choice(_PROMPTS)
    kind, arg = rng.choice(_CONSTRAINTS)
    prompt = template.format(t=topic) + " " + _constraint_instruction(kind, arg)
    return prompt, topic, kind, arg


def _demo_rows(problems, rng, split, sft_noise=0.0):
    sft, pref, rlvr = [], [], []
    for i, (task, problem) in enumerate(problems):
        prompt = problem[0]
        user = [{"role": "user", "content": prompt}]
        if task == "arith":
            _, lines, answer = problem
            wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3])
            wrong = wrong if wrong >= 0 else answer + 1
            chosen, rejected = _arith_response(lines, answer), _arith_response(lines, wrong)
            dataset, ground_truth, source = "gsm8k", str(answer), "demo_arith"
            demonstration = chosen
        else:
            _, topic, kind, arg = problem
            chosen, rejected = _constraint_responses(rng, topic, kind, arg)
            dataset, ground_truth, source = "ifeval", _constraint_ground_truth(kind, arg), "demo_constraint"
            # a noisy teacher: some demonstrations ignore the instruction's constraint, as real SFT data often
            # does, so the SFT model breaks constraints that preference tuning and RL can then teach it to keep
            demonstration = rejected if rng.random() < sft_noise else chosen
        sft.append({"messages": user + [{"role": "assistant", "content": demonstration}], "id": f"demo-{split}-{i}",
                    "source": source})
        pref.append({"chosen": user + [{"role": "assistant", "content": chosen}],
                     "rejected": user + [{"role": "assistant", "content": rejected}], "source": source})
        rlvr.append({"messages": user, "ground_truth": ground_truth, "dataset": dataset, "source": source})
    return sft, pref, rlvr


def make_demo_data(seed=0, n_train=2000, n_heldout=200, n_rlvr=600, sft_noise=0.6):
    """The synthetic demo, half arithmetic and half constraint problems in every split, no prompt shared between
    splits:
      sft_train / pref_train   n_train problems: SFT conversations and preference pairs on the same prompts;
                               a share `sft_noise` of the constraint conversations ignore their constraint
      rlvr_train               n_rlvr fresh prompts with ground truth, so RL gains must generalise
      *_heldout                n_heldout problems in all three forms (clean), for evaluation"""
    rng = random.Random(seed)
    sizes = {"train": n_train, "rlvr": n_rlvr, "heldout": n_heldout}
    n_arith = {k: (n + 1) // 2 for k, n in sizes.items()}
    arith = _unique_problems(_arith_problem, sum(n_arith.values()), rng, "arithmetic")
    constraint = _unique_problems(_constraint_problem, sum(sizes.values()) - sum(n_arith.values()), rng,
                                  "constraint")
    data = {}
    a = c = 0
    for split, n in sizes.items():
        na, nc = n_arith[split], n - n_arith[split]
        problems = [("arith", p) for p in arith[a:a + na]] + [("constraint", p) for p in constraint[c:c + nc]]
        a, c = a + na, c + nc
        rng.shuffle(problems)
        sft, pref, rlvr = _demo_rows(problems, rng, split, sft_noise if split == "train" else 0.0)
        if split == "rlvr":
            data["rlvr_train"] = rlvr
        else:
            data[f"sft_{split}"], data[f"pref_{split}"] = sft, pref
            if split == "heldout":
                data["rlvr_heldout"] = rlvr
    return data


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_demo_tokenizer(rows, vocab_size=1024):
    """A byte-level BPE trained on the demo text, with the chat special tokens (<|endoftext|> = id 0 = bos = eos =
    pad). `rows`: any demo rows, or a dict of lists as returned by make_demo_data."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    if isinstance(rows, dict):
        rows = [r for split in rows.values() for r in split]

    def texts():
        yield f"system user assistant {SMOLLM_SYSTEM}"
        for row in rows:
            for key in ("messages", "chosen", "rejected"):
                for m in row.get(key, []):
                    yield m["content"]

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts(), trainer)
    return Tokenizer(tk, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", chat_template="tulu")
