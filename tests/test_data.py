import copy
import glob
import json
import logging
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizerCore, decoders, models, pre_tokenizers, processors, trainers

import data
from data import DataError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hi, how can I help?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "6, of course."}],
    [{"role": "user", "content": "Ünïcödé: 日本語 ☕ 🙂 naïve café"},
     {"role": "assistant", "content": "  leading spaces and\n\nnewlines 🙂 ☕"}],
    [{"role": "user", "content": "multi\nline\n\nprompt"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "one more"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    # A small byte-level BPE like SmolLM2's (including the offset-trimming ByteLevel post-processor)
    tk = HFTokenizerCore(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=True)
    corpus = [m["content"] for conv in CONVERSATIONS for m in conv] + ["system user assistant", data.SMOLLM_SYSTEM]
    tk.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=data.SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok")
    tok = data.Tokenizer(tk, "<|endoftext|>", "<|endoftext|>")
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return data.Tokenizer.from_pretrained(tok_dir)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and chat templates


def test_tokenizer_special_tokens_from_config_and_overrides(tok_dir, tmp_path):
    tok = data.Tokenizer.from_pretrained(tok_dir)
    assert tok.eos_id == tok.bos_id == tok.pad_id == 0 and tok.eos_token == "<|endoftext|>"
    assert tok.decode(tok.encode("Hello there! 🙂")) == "Hello there! 🙂"
    over = data.Tokenizer.from_pretrained(tok_dir, eos_token="<|im_end|>", pad_token="<|user|>")
    assert over.eos_id == over.token_to_id("<|im_end|>") and over.pad_id == over.token_to_id("<|user|>")
    # given the tokenizer.json file itself, the settings come from the folder it is in
    over.save_pretrained(str(tmp_path / "over"))
    by_file = data.Tokenizer.from_pretrained(str(tmp_path / "over" / "tokenizer.json"))
    assert (by_file.eos_token, by_file.pad_token) == ("<|im_end|>", "<|user|>")
    # generation_config.json ids are used when tokenizer_config.json names no token
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [2, 0]}))
    gen = data.Tokenizer.from_pretrained(str(tmp_path))
    assert gen.eos_token == "<|im_end|>" and gen.bos_token == "<|endoftext|>" and gen.pad_id == gen.eos_id
    with pytest.raises(ValueError, match="not in the vocabulary"):
        data.Tokenizer.from_pretrained(tok_dir, eos_token="<|nope|>")


def test_generation_stops_at_every_eos_id_the_snapshot_lists_as_transformers_does(tok_dir, tmp_path):
    """transformers' generate stops at each eos id of generation_config.json (of config.json where there is none):
    so do the stop ids of our eval and RLVR, after the template's own."""
    import pickle
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    shutil.copy(os.path.join(tok_dir, "tokenizer_config.json"), tmp_path / "tokenizer_config.json")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    assert data.stop_token_ids(data.Tokenizer.from_pretrained(str(tmp_path)), "tulu") == [0, 5]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7, 3]}))
    tok = data.Tokenizer.from_pretrained(str(tmp_path))
    assert tok.eos_id == 0
    assert data.stop_token_ids(tok, "tulu") == [0, 7, 3]
    assert data.stop_token_ids(tok, "chatml") == [tok.token_to_id("<|im_end|>"), 0, 7, 3]
    assert data.stop_token_ids(pickle.loads(pickle.dumps(tok)), "tulu") == [0, 7, 3]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 10**9]}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id = 1000000000 is not a token id"):
        data.Tokenizer.from_pretrained(str(tmp_path))


def _added_tokens_decoder():
    return {str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                     "special": True} for i, t in enumerate(data.SPECIAL_TOKENS)}


@pytest.mark.parametrize("modern", [True, False], ids=["added_tokens_decoder", "legacy"])
def test_tokenizer_config_and_special_tokens_map_disagreeing_resolve_as_transformers_does(tok_dir, tmp_path, modern):
    """A tokenizer_config.json with added_tokens_decoder wins over special_tokens_map.json; an older one without it
    loses to the map, token and setting alike. Loaded by us and saved, the folder reads the same in transformers."""
    import transformers
    snapshot, saved = tmp_path / "snapshot", tmp_path / "saved"
    snapshot.mkdir()
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), snapshot / "tokenizer.json")
    config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "model_max_length": 8192}
    if modern:
        config["added_tokens_decoder"] = _added_tokens_decoder()
    (snapshot / "tokenizer_config.json").write_text(json.dumps(config))
    (snapshot / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>", "lstrip": False}, "pad_token": "<|user|>", "bos_token": "<|im_start|>",
        "model_max_length": 2048}))
    hf = transformers.AutoTokenizer.from_pretrained(str(snapshot))
    ours = data.Tokenizer.from_pretrained(str(snapshot))
    expected = ("<|endoftext|>",) * 3 + (8192,) if modern else ("<|im_end|>", "<|user|>", "<|im_start|>", 2048)
    assert (hf.eos_token, hf.pad_token, hf.bos_token, hf.model_max_length) == expected  # the rule, in transformers
    assert (ours.eos_token, ours.pad_token, ours.bos_token) == expected[:3]
    assert ours.eos_id == ours.token_to_id(expected[0])
    ours.save_pretrained(str(saved))
    again = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert (again.eos_token, again.pad_token, again.bos_token, again.model_max_length) == expected


def _snapshot(folder, special_tokens, tok_config, edit=lambda tokenizer_json: None):
    """A tokenizer folder as a snapshot may hold it: a small byte-level BPE with `special_tokens` added, its
    tokenizer.json changed by `edit`, and `tok_config` as its tokenizer_config.json."""
    tk = HFTokenizerCore(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["Hello there, how can I help?"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer_json = json.loads(tk.to_str())
    edit(tokenizer_json)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f)
    return str(folder)


def test_special_tokens_that_are_plain_vocab_entries_are_one_token_as_in_transformers(tok_dir, tmp_path, caplog):
    """transformers registers the special tokens tokenizer_config.json names (bos, eos, pad, unk, additional special
    tokens, added_tokens_decoder) as added tokens at load, keeping their vocab ids: an eos '</s>' that tokenizer.json
    has only as an ordinary vocab entry is then one token in rendered text, the id that is trained and stopped at,
    where it would otherwise be cut into byte pieces."""
    from transformers import PreTrainedTokenizerFast

    def plain_entries(tokenizer_json):
        tokenizer_json["model"]["vocab"].update({"</s>": 1000, "<sep>": 1001, "<tool>": 1002})

    folder = _snapshot(tmp_path / "a", ["<|endoftext|>"], {
        "eos_token": "</s>", "unk_token": "<sep>", "additional_special_tokens": ["<tool>"]}, plain_entries)
    ours, hf = data.Tokenizer.from_pretrained(folder), PreTrainedTokenizerFast.from_pretrained(folder)
    hf.chat_template = data.TULU_TEMPLATE
    conv = CONVERSATIONS[0]
    ids, mask = data.render_chat(ours, conv, "tulu")
    assert ours.eos_id == hf.eos_token_id == 1000 and ids[-1] == 1000 and mask[-1] == 1
    assert ids == hf.apply_chat_template(conv, tokenize=True)["input_ids"]
    for text in ("a<sep>b", "<tool>Hello</s>"):
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.encode("<tool>")[0] == 1002
    # saved, the folder reads the same in transformers, and in ours
    ours.save_pretrained(str(tmp_path / "saved"))
    assert data.render_chat(data.Tokenizer.from_pretrained(str(tmp_path / "saved")), conv, "tulu")[0] == ids
    assert PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "saved")).encode(
        "Hi</s>", add_special_tokens=False) == ours.encode("Hi</s>")
    # A special token the vocabulary lacks would be a new id past the model's embedding table: refused, named, where
    # it is used (bos, eos, pad); said and left out where nothing uses it
    with pytest.raises(DataError, match=re.escape("tokenizer_config.json: pad_token '<pad>' is not in the vocabulary "
                                                  "of tokenizer.json")):
        data.Tokenizer.from_pretrained(_snapshot(tmp_path / "b", ["<|endoftext|>"],
                                                 {"eos_token": "</s>", "pad_token": "<pad>"}, plain_entries))
    for config, unused in (({"eos_token": "</s>", "unk_token": "<unk>"}, "unk_token '<unk>'"),
                           ({"eos_token": "</s>", "additional_special_tokens": ["<tool>", "<rag>"]},
                            "additional_special_tokens[1] '<rag>'")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nanotulu.data"):
            tok = data.Tokenizer.from_pretrained(_snapshot(tmp_path / "b", ["<|endoftext|>"], config, plain_entries))
        assert f"tokenizer_config.json: {unused} is not in the vocabulary of tokenizer.json, so it is not added" \
            in caplog.text
        assert tok.eos_id == 1000 and tok.token_to_id(re.findall(r"'(.*)'", unused)[0]) is None
    # a tokenizer.json whose special tokens all are added tokens already (SmolLM2's) is left as it is: same cache keys
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "added_tokens_decoder": _added_tokens_decoder()}))
    assert data.Tokenizer.from_pretrained(str(tmp_path))._tk.to_str() == \
        HFTokenizerCore.from_file(os.path.join(tok_dir, "tokenizer.json")).to_str()


def test_decode_drops_the_special_tokens_the_config_names_as_transformers_does(tmp_path):
    """An eos that tokenizer.json has as an added token flagged special=false is still special to transformers (the
    config names it), so decode(skip_special_tokens=True) drops it: a rollout's text has no '<|im_end|>' at its end
    (IFEval's end_phrase checks would fail on it). So does an eos set after load (ChatML's <|im_end|>), which the
    saved model names as its eos."""
    from transformers import PreTrainedTokenizerFast

    def not_special(tokenizer_json):
        for token in tokenizer_json["added_tokens"]:
            token["special"] = token["content"] == "<|endoftext|>"

    folder = _snapshot(tmp_path / "a", ["<|endoftext|>", "<|im_end|>", "<|im_start|>"],
                       {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, not_special)
    ours, hf = data.Tokenizer.from_pretrained(folder), PreTrainedTokenizerFast.from_pretrained(folder)
    response = ours.encode("Can I help?") + [ours.eos_id, ours.pad_id]
    assert ours.decode(response) == hf.decode(response, skip_special_tokens=True) == "Can I help?"
    assert ours.decode(response, skip_special_tokens=False) == "Can I help?<|im_end|><|endoftext|>"
    # trained in ChatML, <|im_end|> (an added token flagged non-special, named by no file) becomes the eos
    folder = _snapshot(tmp_path / "b", ["<|endoftext|>", "<|im_end|>", "<|im_start|>"],
                       {"eos_token": "<|endoftext|>"}, not_special)
    ours = data.Tokenizer.from_pretrained(folder)
    ours.use_chat_template("chatml")
    ours.save_pretrained(str(tmp_path / "saved"))
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "saved"))
    response = ours.encode("Can I help?") + [ours.eos_id]
    assert ours.decode(response) == hf.decode(response, skip_special_tokens=True) == "Can I help?"


def test_a_special_token_made_special_at_load_keeps_its_added_token_flags(tmp_path):
    """An added token flagged special=false in tokenizer.json that the config names as eos is flagged special, and
    keeps its other flags: with rstrip it swallows the spaces after it, in ours as in transformers."""
    from transformers import PreTrainedTokenizerFast

    def rstrip_not_special(tokenizer_json):
        for token in tokenizer_json["added_tokens"]:
            if token["content"] == "<|end|>":
                token.update(special=False, rstrip=True)

    folder = _snapshot(tmp_path, ["<|endoftext|>", "<|end|>"], {"eos_token": "<|end|>"}, rstrip_not_special)
    ours, hf = data.Tokenizer.from_pretrained(folder), PreTrainedTokenizerFast.from_pretrained(folder)
    text = "Hi<|end|>   Hello"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text)[-2:] == [ours.eos_id] + ours.encode("Hello")


def test_a_bos_or_pad_from_generation_config_that_is_an_ordinary_token_stays_in_decoded_text(tmp_path):
    """With no tokenizer file naming them, bos and pad come from generation_config.json's ids, which may be ordinary
    tokens ('!'): decoding keeps them, as it is text the model wrote."""
    folder = _snapshot(tmp_path, ["<|endoftext|>"], {"eos_token": "<|endoftext|>", "bos_token": None})
    bang = data.Tokenizer.from_pretrained(folder).token_to_id("!")
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": bang, "pad_token_id": bang}))
    tok = data.Tokenizer.from_pretrained(folder)
    assert tok.bos_id == tok.pad_id == bang
    assert tok.decode(tok.encode("Hello! Hi!!")) == "Hello! Hi!!"


def test_an_eos_that_only_generation_config_names_is_one_token_and_renders_in_tulu(tmp_path):
    """A base model whose tokenizer files name no eos: its eos is generation_config.json's, and it is registered like
    one the files name, so the tulu template (and eval's raw-text mode, which resolves it) takes it."""
    def plain_eos(tokenizer_json):
        tokenizer_json["model"]["vocab"]["</s>"] = 1000

    folder = _snapshot(tmp_path, ["<|endoftext|>"], {}, plain_eos)
    os.remove(os.path.join(folder, "tokenizer_config.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1000}))
    tok = data.Tokenizer.from_pretrained(folder)
    assert tok.eos_id == 1000 and tok.encode("Hi</s>")[-1] == 1000
    assert data.resolve_template("", tok) == "tulu"
    # one that is one token already ('!': ordinary text, which other text may merge with) is left as it is
    bang = tok.token_to_id("!")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": bang}))
    tok = data.Tokenizer.from_pretrained(folder)
    assert tok.eos_id == bang and not tok.is_added_token("!") and tok.decode(tok.encode("Hi!")) == "Hi!"


def test_saving_keeps_the_snapshots_other_tokenizer_settings(tok_dir, tmp_path):
    """model_max_length (lm-eval's context length), unk and additional special tokens (what decode skips) survive a
    load and save, from tokenizer_config.json or special_tokens_map.json; the special tokens we resolve win."""
    import transformers
    snapshot, saved = tmp_path / "snapshot", tmp_path / "saved"
    snapshot.mkdir()
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), snapshot / "tokenizer.json")
    (snapshot / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 8192, "unk_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "add_prefix_space": False, "added_tokens_decoder": _added_tokens_decoder()}))
    (snapshot / "special_tokens_map.json").write_text(json.dumps({  # tokens as strings or AddedToken dicts
        "additional_special_tokens": ["<|im_start|>", {"content": "<|im_end|>", "lstrip": False}],
        "model_max_length": 1}))
    tok = data.Tokenizer.from_pretrained(str(snapshot), eos_token="<|im_end|>")
    tok.chat_template = "chatml"
    tok.save_pretrained(str(saved))
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 8192 and config["unk_token"] == "<|endoftext|>"  # tokenizer_config wins
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_prefix_space"] is False
    assert config["eos_token"] == "<|im_end|>" and config["chat_template"] == data.CHAT_TEMPLATES["chatml"]
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert hf.model_max_length == 8192 and hf.eos_token == "<|im_end|>"
    assert hf.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"
    unpickled = pickle.loads(pickle.dumps(tok))  # the tokenization workers get them too
    assert unpickled.settings == tok.settings
    assert unpickled.chat_template == "chatml"


def test_a_saved_tokenizer_splits_text_in_transformers_as_its_tokenizer_json_does(tmp_path):
    """SmolLM2's tokenizer.json splits digits one by one before its ByteLevel step, and its tokenizer_config.json says
    GPT2Tokenizer, for which transformers 5 builds a ByteLevel pre-tokenizer of its own and drops the Digits step. A
    saved folder names PreTrainedTokenizerFast, so transformers tokenizes it as the model was trained."""
    import transformers
    snapshot, saved = tmp_path / "snapshot", tmp_path / "saved"
    snapshot.mkdir()
    tk = HFTokenizerCore(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["Sum:\n\n15 and  3 and 12345, said the assistant"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=data.SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(snapshot / "tokenizer.json"))
    (snapshot / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder()}))
    ours = data.Tokenizer.from_pretrained(str(snapshot))
    ours.save_pretrained(str(saved))
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    for text in ("Sum:\n\n15", "and  3", "12345 said"):
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text) == tk.encode(text).ids, text


def test_saving_over_a_folder_replaces_its_chat_template_jinja(tok_dir, tmp_path):
    """transformers reads chat_template.jinja before tokenizer_config.json's template: one left by an earlier save
    would win over the template a save writes."""
    import transformers
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(data.CHAT_TEMPLATES["chatml"])
    tok = data.Tokenizer.from_pretrained(str(tmp_path))
    assert tok.chat_template == data.CHAT_TEMPLATES["chatml"]
    tok.chat_template = "tulu"
    tok.save_pretrained(str(tmp_path))
    assert data.Tokenizer.from_pretrained(str(tmp_path)).chat_template == data.TULU_TEMPLATE
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).chat_template == data.TULU_TEMPLATE


@pytest.mark.parametrize("template", ["tulu", "chatml"])
def test_chat_template_ids_match_transformers(tok, tmp_path, template):
    import transformers
    tok.chat_template = template
    tok.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == data.CHAT_TEMPLATES[template]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for conv in CONVERSATIONS:
        for gen in (False, True):
            expected = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            if not isinstance(expected, list):  # transformers 5 may return a BatchEncoding
                expected = expected["input_ids"]
            ids, mask = data.render_chat(tok, conv, template, add_generation_prompt=gen)
            assert ids == list(expected), (template, gen, conv)
            text = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert data.render_chat_text(tok, conv, template, add_generation_prompt=gen) == text
            assert len(mask) == len(ids)


def _trained_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)


def test_tulu_masks_equal_open_instructs_rule(tok, tmp_path):
    """open-instruct's encode_sft_example: tokenize the whole conversation with the template, then mask each
    non-assistant message from the length of the conversation rendered up to it (the previous assistant turn, now
    the last, renders without its trailing newline) to the length up to and including it (plus the generation
    header when an assistant turn follows). The newline after a non-final eos thus falls in the next message's
    masked span."""
    import transformers
    tok.chat_template = "tulu"
    tok.save_pretrained(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))

    def length(messages, generation_prompt=False):
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        return len(ids if isinstance(ids, list) else ids["input_ids"])

    conversations = CONVERSATIONS + [CONVERSATIONS[1] + [{"role": "user", "content": "Thanks"},
                                                         {"role": "assistant", "content": "Bye\n"}]]
    for conv in conversations:
        expected = [1] * length(conv)
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                start = length(conv[:i]) if i else 0
                follows = i + 1 < len(conv) and conv[i + 1]["role"] == "assistant"
                expected[start:length(conv[:i + 1], generation_prompt=follows)] = [0] * (
                    length(conv[:i + 1], generation_prompt=follows) - start)
        ids, mask = data.render_chat(tok, conv, "tulu")
        assert len(ids) == len(expected) and mask == expected, conv


def test_masks_cover_assistant_content_and_end_token(tok):
    conv = CONVERSATIONS[1]
    ids, mask = data.render_chat(tok, conv, "tulu")
    assert _trained_text(tok, ids, mask) == "4<|endoftext|>6, of course.<|endoftext|>"
    ids, mask = data.render_chat(tok, conv, "chatml")
    assert _trained_text(tok, ids, mask) == "4<|im_end|>6, of course.<|im_end|>"
    # chatml inserts SmolLM2's default system message when none is given; it is not trained
    ids, mask = data.render_chat(tok, CONVERSATIONS[0], "chatml")
    assert tok.decode(ids, skip_special_tokens=False).startswith(f"<|im_start|>system\n{data.SMOLLM_SYSTEM}<|im_end|>\n")
    assert _trained_text(tok, ids, mask) == "Hi, how can I help?<|im_end|>"
    # unicode and leading whitespace in the content: all of it is trained, exactly
    ids, mask = data.render_chat(tok, CONVERSATIONS[2], "tulu")
    assert _trained_text(tok, ids, mask).endswith("newlines 🙂 ☕<|endoftext|>")
    # the generation prompt is appended and nothing after the last message is trained
    for template, header in (("tulu", "<|assistant|>\n"), ("chatml", "<|im_start|>assistant\n")):
        ids, mask = data.render_chat(tok, CONVERSATIONS[3], template, add_generation_prompt=True)
        assert tok.decode(ids, skip_special_tokens=False).endswith("one more" + ("\n" if template == "tulu" else
                                                                                  "<|im_end|>\n") + header)
        plain_ids, plain_mask = data.render_chat(tok, CONVERSATIONS[3], template)
        assert ids[:len(plain_ids)] == plain_ids and mask[:len(plain_mask)] == plain_mask
        assert ids[len(plain_ids):] == tok.encode(header) and not any(mask[len(plain_ids):])
        assert _trained_text(tok, ids, mask) == "ok" + ("<|endoftext|>" if template == "tulu" else "<|im_end|>")


def test_a_token_joining_the_header_and_an_indented_response_is_trained():
    """A BPE trained on code (as SmolLM2's is) merges a newline with the spaces after it, so the header's '\n' and
    an indented answer's first spaces are one token. It holds response characters, so it is trained: offsets that
    the ByteLevel post-processor trimmed would put it before the response and leave the indentation untrained."""
    tk = HFTokenizerCore(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=True)
    tk.train_from_iterator(["def f():\n    return 1"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=data.SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = data.Tokenizer(tk, "<|endoftext|>", "<|endoftext|>")
    assert tok.decode(tok.encode("\n    return")[:1]) == "\n   "  # the merged token this test is about
    conv = [{"role": "user", "content": "Code?"}, {"role": "assistant", "content": "    return 1"}]
    for template, end in (("tulu", "<|endoftext|>"), ("chatml", "<|im_end|>")):
        ids, mask = data.render_chat(tok, conv, template)
        assert _trained_text(tok, ids, mask) == "\n    return 1" + end, template


def test_bad_messages_name_where_and_why(tok):
    cases = [
        ([], "empty list"),
        ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
        ([{"role": "user", "content": 3}], "non-string content of type int"),
        ([{"role": "user"}], "has no 'content'"),
        ("hello", "must be a list"),
    ]
    for messages, why in cases:
        with pytest.raises(DataError, match=re.escape(why)) as e:
            data.validate_messages(messages, "somefile.jsonl line 7")
        assert str(e.value).startswith("somefile.jsonl line 7: ")
        with pytest.raises(DataError, match=re.escape(why)):
            data.render_chat(tok, messages)
    with pytest.raises(ValueError, match="unknown chat template"):
        data.render_chat(tok, CONVERSATIONS[0], "llama")


# ---------------------------------------------------------------------------------------------------------------
# Readers and validation

SFT_ROWS = [{"messages": c, "id": f"r{i}", "source": "test"} for i, c in enumerate(CONVERSATIONS[:3])]


def _write_all_formats(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "a.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in SFT_ROWS[:2]) + "\n\n")
    with open(os.path.join(folder, "b.json"), "w") as f:
        json.dump(SFT_ROWS[2:], f)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(SFT_ROWS), os.path.join(folder, "c.parquet"))


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(SFT_ROWS[0]).encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not UTF-8 text \(invalid start byte at byte 14 of"):
        list(data.read_rows(str(bad)))
    # a bad row like any other: skip_bad_rows skips and counts it
    assert len(data.load_sft_rows(str(bad), skip_bad=True)) == 1
    bad.write_bytes(b"\xef\xbb\xbf" + json.dumps(SFT_ROWS[0]).encode() + b"\r\n")  # a BOM, Windows line ends
    assert [row for _, row in data.read_rows(str(bad))] == SFT_ROWS[:1]
    _write_all_formats(str(tmp_path / "shards"))
    cut = tmp_path / "shards" / "c.parquet"
    cut.write_bytes(cut.read_bytes()[:40])  # a download cut short
    with pytest.raises(DataError, match=r"c.parquet: not a readable parquet file"):
        list(data.read_rows(str(cut)))


def test_readers_jsonl_json_parquet_folder_glob(tmp_path):
    folder = str(tmp_path / "shards")
    _write_all_formats(folder)
    by_file = {os.path.basename(p): [r for _, r in data.read_rows(p)] for p in glob.glob(folder + "/*")}
    assert by_file["a.jsonl"] == SFT_ROWS[:2] and by_file["b.json"] == SFT_ROWS[2:]
    assert by_file["c.parquet"] == SFT_ROWS
    from_folder = list(data.read_rows(folder))
    assert [r for _, r in from_folder] == SFT_ROWS + SFT_ROWS
    assert [w for w, _ in from_folder][:3] == [f"{folder}/a.jsonl line 1", f"{folder}/a.jsonl line 2",
                                               f"{folder}/b.json row 0"]
    assert [r for _, r in data.read_rows(folder + "/*.parquet")] == SFT_ROWS
    assert data.load_sft_rows([folder + "/a.jsonl", folder + "/b.json"]) == SFT_ROWS
    # a byte-order mark before the first row (Windows tools write one) is not part of it
    for name, text in (("bom.jsonl", "\n".join(json.dumps(r) for r in SFT_ROWS)), ("bom.json", json.dumps(SFT_ROWS))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert data.load_sft_rows(str(tmp_path / name)) == SFT_ROWS, name
    # the JSON-lines-in-a-.json-file layout that datasets' to_json writes
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in SFT_ROWS))
    assert data.load_sft_rows(str(tmp_path / "lines.json")) == SFT_ROWS
    # ... with unescaped U+2028 inside a string (str.splitlines would cut the row there), and a bad first line that
    # costs only itself under skip_bad
    odd = [{"messages": [{"role": "user", "content": "a\u2028b\u0085c"}, {"role": "assistant", "content": "d"}]}]
    lines = ["{broken"] + [json.dumps(r, ensure_ascii=False) for r in odd + SFT_ROWS]
    (tmp_path / "odd.json").write_text("\n".join(lines))
    assert data.load_sft_rows(str(tmp_path / "odd.json"), skip_bad=True) == odd + SFT_ROWS
    with pytest.raises(DataError, match=r"odd.json line 1: invalid JSON"):
        data.load_sft_rows(str(tmp_path / "odd.json"))
    # in-memory rows: a row that is not an object is named, not mistaken for a path
    with pytest.raises(DataError, match=r"rows\[1\]: row is a NoneType, not an object"):
        data.load_sft_rows([SFT_ROWS[0], None])
    # committed fixture shards
    assert len(data.load_sft_rows(os.path.join(FIXTURES, "sft.jsonl"))) == 3
    with pytest.raises(DataError, match="no such file"):
        data.load_sft_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="glob matches no data files"):
        data.load_sft_rows(str(tmp_path / "nothing*.jsonl"))


def test_a_folder_or_glob_with_the_files_of_several_splits_is_refused(tmp_path):
    """A hub dataset's folder holds every split (gsm8k/main: train and test shards; UltraFeedback: train_prefs,
    test_prefs, train_sft, ...): read as one, a run would train on its test split, and decontamination would count
    the few-shot train rows as benchmark rows."""
    row = json.dumps(SFT_ROWS[0]) + "\n"
    for name in ("train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl", "test-00000-of-00001.jsonl",
                 "notes.jsonl", "training_data.jsonl"):
        (tmp_path / "gsm8k" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "gsm8k" / name).write_text(row)
    for spec in (tmp_path / "gsm8k", tmp_path / "gsm8k" / "*.jsonl"):
        with pytest.raises(DataError, match=r"gsm8k\S*: holds the files of 2 splits \(test, train\), which would be read "
                                            r"as one: name one split's files \(a file, or a glob that takes only them; "
                                            r"train: \S+/train-00000-of-00002.jsonl, \S+/train-00001-of-00002.jsonl\)"):
            data.load_sft_rows(str(spec))
    assert len(data.load_sft_rows(str(tmp_path / "gsm8k" / "train-*"))) == 2
    (tmp_path / "gsm8k" / "test-00000-of-00001.jsonl").unlink()  # one split, and names that say none: read whole
    assert len(data.load_sft_rows(str(tmp_path / "gsm8k"))) == 4
    assert sorted(data.split_names(["d/train_prefs-00000-of-00001.parquet", "d/test_prefs-00000-of-00001.parquet",
                                    "validation.jsonl", "evaluation.json", "Dev.jsonl", "train_gen.parquet"])) == \
        ["dev", "test_prefs", "train_gen", "train_prefs", "validation"]
    assert sorted(data.split_names(["default/train/0000.parquet", "default/test/0000.parquet"])) == ["test", "train"]
    # one split each: ultrachat_200k's hashed shards, shards without a count, a user's numbered or named parts, a
    # folder whose name starts with a split word
    for one in (["train_sft-00000-of-00003-a3ecf92756993583.parquet", "train_sft-00001-of-00003-0a1f.parquet"],
                ["train-00000.parquet", "train-00001.parquet"], ["train_1.jsonl", "train_2.jsonl", "rows.jsonl"],
                ["train_math.jsonl", "train_code.jsonl"], ["test_run/train.jsonl", "test_run/rows.jsonl"]):
        assert len(data.split_names(one)) == 1, one


def test_a_folder_with_one_file_in_two_formats_is_refused(tmp_path):
    """train.jsonl beside its parquet export: read as one, every row would be trained on twice."""
    rows = SFT_ROWS[:2]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.json").write_text(json.dumps(rows))
    for spec in (tmp_path, tmp_path / "train.*"):
        with pytest.raises(DataError, match=r"holds the same file in 2 formats \(\S+/train.json, \S+/train.jsonl\), "
                                            "which would be read as one: name one of them"):
            data.load_sft_rows(str(spec))
    assert len(data.load_sft_rows(str(tmp_path / "train.jsonl"))) == 2


def test_sft_bad_rows_each_name_file_line_and_problem():
    path = os.path.join(FIXTURES, "sft_bad.jsonl")
    expected = {2: "missing 'messages'", 3: "unknown role 'robot'", 4: "non-string content", 5: "empty list",
                6: "no assistant message", 7: "invalid JSON", 8: "row is a list"}
    lines = open(path).read().splitlines()
    for lineno, why in expected.items():
        single = [lines[0], lines[lineno - 1]]  # a good row, then the bad one
        tmp = path + f".{lineno}.tmp.jsonl"
        try:
            with open(tmp, "w") as f:
                f.write("\n".join(single))
            with pytest.raises(DataError, match=re.escape(why)) as e:
                data.load_sft_rows(tmp)
            assert str(e.value).startswith(f"{tmp} line 2: ")
        finally:
            os.remove(tmp)
    with pytest.raises(DataError, match=r"sft_bad.jsonl line 2: missing 'messages'"):
        data.load_sft_rows(path)


@pytest.mark.parametrize("load, row", [
    (data.load_sft_rows, {"messages": [{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "a"}]}),
    (data.load_preference_rows, {"prompt": "q", "chosen": [{"role": "assistant", "content": "\udc80"}],
                                 "rejected": [{"role": "assistant", "content": "b"}]}),
    (data.load_rlvr_rows, {"messages": [{"role": "user", "content": "x \ud83d"}], "ground_truth": "1",
                           "dataset": "gsm8k"})])
def test_an_unpaired_surrogate_is_a_bad_row_named_at_load(load, row, tmp_path):
    """Valid JSON (an escaped lone surrogate) that no tokenizer can encode: named at load, where skip_bad can skip
    it, not a UnicodeEncodeError deep in tokenization."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")  # json.dumps escapes the surrogate as \udXXX
    with pytest.raises(DataError, match=r"rows.jsonl line 1.*: message 0 \((user|assistant)\) has an unpaired "
                                        r"surrogate"):
        load(str(path))


def test_skip_bad_skips_and_reports_count(caplog):
    with caplog.at_level(logging.WARNING, logger="nanotulu.data"):
        rows = data.load_sft_rows(os.path.join(FIXTURES, "sft_bad.jsonl"), skip_bad=True)
    assert len(rows) == 2 and rows.num_skipped == 7
    assert "skipped 7 bad SFT rows of 9" in caplog.text
    assert "first: " + os.path.join(FIXTURES, "sft_bad.jsonl") + " line 2: missing 'messages'" in caplog.text


def test_preference_rows_both_forms_and_errors():
    rows = data.load_preference_rows(os.path.join(FIXTURES, "pref.jsonl"))
    assert len(rows) == 2
    # the Tulu full-list form and the prompt + chosen + rejected form normalise to the same thing
    assert rows[0]["prompt"] == rows[1]["prompt"] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert rows[0]["chosen"] == rows[1]["chosen"] == [{"role": "assistant", "content": "2 + 3 = 5\n#### 5"}]
    assert rows[0]["rejected"] == rows[1]["rejected"] == [{"role": "assistant", "content": "2 + 3 = 6\n#### 6"}]
    user = {"role": "user", "content": "q"}
    bad = [
        ({"chosen": [user, {"role": "assistant", "content": "a"}]}, "missing 'rejected'"),
        ({"chosen": [user, {"role": "assistant", "content": "a"}],
          "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
         "chosen and rejected prompts differ (first difference at message 0)"),
        # the rejected conversation has one more turn: the prompts agree as far as the shorter goes
        ({"chosen": [user, {"role": "assistant", "content": "a"}],
          "rejected": [user, user, {"role": "assistant", "content": "b"}]},
         "chosen and rejected prompts differ (first difference at message 1)"),
        # whole conversations on one side, a bare response on the other
        ({"prompt": "q", "chosen": [user, {"role": "assistant", "content": "a"}], "rejected": "b"},
         "chosen and rejected prompts differ (first difference at message 0)"),
        ({"chosen": [user], "rejected": [user]}, "chosen does not end with an assistant message"),
        ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
         "no prompt"),
    ]
    for row, why in bad:
        with pytest.raises(DataError, match=re.escape(why)) as e:
            data.load_preference_rows([{"chosen": [user, {"role": "assistant", "content": "ok"}],
                                        "rejected": [user, {"role": "assistant", "content": "no"}]}, row])
        assert str(e.value).startswith("rows[1]") and "skip_bad_rows=true skips such rows" in str(e.value)


def test_preference_columns_stored_as_json_text_are_refused_not_trained_as_text(tmp_path):
    # an export with the message lists as JSON strings: read as plain responses, the JSON itself would be trained
    user = {"role": "user", "content": "Q?"}
    good, bad = ({"role": "assistant", "content": c} for c in ("good", "bad"))
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "chosen": json.dumps([user, good]),
                                "rejected": json.dumps([user, bad])}) + "\n")
    with pytest.raises(DataError, match=r"line 1: chosen and rejected are strings holding JSON lists of messages"):
        data.load_preference_rows(str(path))
    # text that only looks like JSON is a response, and so is one answer that is a JSON list of messages
    rows = data.load_preference_rows([{"prompt": "Q?", "chosen": "[1, 2] and [3]", "rejected": "[]"},
                                      {"prompt": "Q?", "chosen": json.dumps([good]), "rejected": "no"}])
    assert rows[0]["chosen"][0]["content"] == "[1, 2] and [3]" and rows[0]["rejected"][0]["content"] == "[]"
    assert rows[1]["chosen"][0]["content"] == json.dumps([good])


def test_an_empty_response_is_a_preference_pair_whose_end_of_turn_is_trained(demo_tok):
    """open-instruct keeps such pairs (a model's empty answer is a real rejected response): so do we, and the eos
    that ends the empty turn is its one trained token."""
    user = {"role": "user", "content": "q"}
    rows = data.load_preference_rows([
        {"chosen": [user, {"role": "assistant", "content": "a"}],
         "rejected": [user, {"role": "assistant", "content": ""}]},
        {"prompt": "q", "chosen": "", "rejected": "b"}])
    assert rows[0]["rejected"] == rows[1]["chosen"] == [{"role": "assistant", "content": ""}]
    pairs = data.tokenize_preference(rows, demo_tok, "tulu", 64, num_workers=1, progress=False)
    for pair, side in ((pairs[0], "rejected"), (pairs[1], "chosen")):
        ids, mask = pair[side]
        assert [int(i) for i, m in zip(ids, mask) if m] == [demo_tok.eos_id]


def test_tulu_rows_with_a_prompt_column_keep_the_whole_conversation_once():
    """Tulu's preference mixture has a `prompt` string beside whole chosen/rejected conversations. The prompt is
    what precedes the final assistant turn, however the string reads: never rendered twice."""
    system = {"role": "system", "content": "Be brief."}
    user, later = {"role": "user", "content": "Hello there!"}, {"role": "user", "content": "And 3 + 3?"}
    earlier = {"role": "assistant", "content": "Hi."}
    chosen, rejected = {"role": "assistant", "content": "6"}, {"role": "assistant", "content": "7"}
    rows = [{"prompt": "Hello there!", "chosen": [system, user, chosen], "rejected": [system, user, rejected]},
            {"prompt": "Hello there! ", "chosen": [user, chosen], "rejected": [user, rejected]},
            {"prompt": "Hello there!", "chosen": [user, earlier, later, chosen],
             "rejected": [user, earlier, later, rejected]}]
    got = data.load_preference_rows(rows)
    assert [r["prompt"] for r in got] == [[system, user], [user], [user, earlier, later]]
    assert all(r["chosen"] == [chosen] and r["rejected"] == [rejected] for r in got)


def test_rlvr_rows_drop_reference_answer_and_validate():
    rows = data.load_rlvr_rows(os.path.join(FIXTURES, "rlvr.jsonl"))
    assert rows[0] == {"messages": [{"role": "user", "content": "What is 4 + 4?"}], "ground_truth": "8",
                       "dataset": "gsm8k"}
    assert rows[1]["messages"] == [{"role": "user", "content": "Write in lowercase."}]
    assert json.loads(rows[1]["ground_truth"]) == {"func_name": "validate_lowercase"}
    assert rows[2]["ground_truth"] == "12"  # a numeric ground truth becomes its string
    for row, why in [({"messages": [{"role": "user", "content": "q"}], "dataset": "gsm8k"}, "missing 'ground_truth'"),
                     ({"messages": [{"role": "user", "content": "q"}], "ground_truth": "1"}, "missing 'dataset'"),
                     ({"messages": [{"role": "user", "content": "q"}], "ground_truth": None, "dataset": "gsm8k"},
                      "'ground_truth' is null"),
                     ({"messages": [{"role": "user", "content": "q"}], "ground_truth": " ", "dataset": "gsm8k"},
                      "ground_truth must be a non-empty string"),
                     ({"messages": [{"role": "user", "content": "q"}], "ground_truth": ["5"], "dataset": "MATH"},
                      "ground_truth of a 'MATH' row must be a string or a number, got a list"),
                     ({"messages": [{"role": "user", "content": "q"}], "ground_truth": True, "dataset": "gsm8k"},
                      "ground_truth must be a non-empty string, got True"),
                     ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                    {"role": "assistant", "content": "b"}], "ground_truth": "1", "dataset": "gsm8k"},
                      "the prompt ends with an assistant message"),
                     ({"messages": [{"role": "assistant", "content": "a"}], "ground_truth": "1", "dataset": "gsm8k"},
                      "prompt holds only an assistant message"),
                     ({"messages": [{"role": "system", "content": "Be brief."}], "ground_truth": "1",
                       "dataset": "gsm8k"}, "the prompt has no user message")]:
        with pytest.raises(DataError, match=re.escape(why)):
            data.load_rlvr_rows([row])
    # the verifiers match dataset names in any case, so 'IFEval' rows may carry their constraints as JSON objects
    ifeval = {"messages": [{"role": "user", "content": "q"}], "ground_truth": {"func_name": "validate_lowercase"},
              "dataset": "IFEval"}
    assert data.load_rlvr_rows([ifeval])[0]["ground_truth"] == '{"func_name": "validate_lowercase"}'


def test_files_the_readers_cannot_use_are_named_not_passed_over(tmp_path, caplog):
    folder = tmp_path / "shards"
    _write_all_formats(str(folder))
    (folder / "d.jsonl.gz").write_bytes(b"")
    (folder / "more").mkdir()
    with caplog.at_level(logging.WARNING, logger="nanotulu.data"):
        assert len(data.load_sft_rows(str(folder))) == 2 * len(SFT_ROWS)
    assert "reading the 3 .jsonl/.json/.parquet file(s) only, not d.jsonl.gz, more" in caplog.text
    # a hub snapshot's root: its shards are in a subfolder
    (tmp_path / "snapshot" / "data").mkdir(parents=True)
    (tmp_path / "snapshot" / "README.md").write_text("# card")
    with pytest.raises(DataError, match=r"snapshot: folder has no .jsonl/.json/.parquet files \(its subfolders: data; "
                                        r"give one, or a glob such as .*snapshot/\*\*/\*.parquet\)"):
        data.load_sft_rows(str(tmp_path / "snapshot"))
    # one object pretty-printed over several lines is neither a list of rows nor JSON lines
    (tmp_path / "object.json").write_text(json.dumps({"data": SFT_ROWS}, indent=2))
    with pytest.raises(DataError, match=r"object.json: a .json file must hold a list of row objects, or one object "
                                        r"per line; this one holds a single object spanning several lines"):
        data.load_sft_rows(str(tmp_path / "object.json"))
    # a parquet file whose footer is intact but whose pages are damaged
    damaged = bytearray((folder / "c.parquet").read_bytes())
    damaged[4:60] = b"\xff" * 56
    (tmp_path / "damaged.parquet").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"damaged.parquet: unreadable after row 0"):
        data.load_sft_rows(str(tmp_path / "damaged.parquet"))


def test_parquet_missing_pyarrow_message(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *args, **kwargs)

    (tmp_path / "x.parquet").write_bytes(b"")
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ImportError, match="needs pyarrow: pip install pyarrow"):
        data.load_sft_rows(str(tmp_path / "x.parquet"))


# ---------------------------------------------------------------------------------------------------------------
# Tokenization cache, truncation


@pytest.fixture(scope="module")
def demo():
    return data.make_demo_data(seed=0, n_train=600, n_heldout=60, n_rlvr=200)


@pytest.fixture(scope="module")
def demo_tok(demo):
    return data.build_demo_tokenizer(demo)


def test_write_atomic_deletes_what_a_killed_writer_left_and_nothing_else(tmp_path):
    """A process killed (-9) while writing into the cache leaves its temporary file; the next write into the folder
    deletes it, and leaves alone a live process's, another host's, and every other file."""
    import signal
    import socket
    import subprocess
    import sys
    target = tmp_path / "table.npz"
    killed = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); import data\n"
        "def write(tmp):\n"
        "    open(tmp, 'wb').write(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "data.write_atomic(sys.argv[2], write)\n"), os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        str(target)])
    assert killed.wait() == -signal.SIGKILL
    host = socket.gethostname()
    left = tmp_path / f"table.npz.tmp.{host}.{killed.pid}"
    assert left.read_bytes() == b"half" and not target.exists()
    live = tmp_path / f"other.npz.tmp.{host}.{os.getpid()}"  # a writer still at work (this process)
    elsewhere = tmp_path / f"other.npz.tmp.another-host.{killed.pid}"  # its pids mean nothing here
    unrelated = tmp_path / "notes.tmp"
    for path in (live, elsewhere, unrelated):
        path.write_bytes(b"keep")
    data.write_atomic(str(target), lambda tmp: open(tmp, "wb").write(b"whole"))
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, elsewhere.name, "notes.tmp"])

    def full_disk(tmp):
        open(tmp, "wb").write(b"part")
        raise OSError("No space left on device")
    with pytest.raises(OSError, match="No space"):
        data.write_atomic(str(target), full_disk)
    assert target.read_bytes() == b"whole" and not list(tmp_path.glob(f"table.npz.tmp.{host}.*"))


def test_tokenize_sft_parallel_equals_render_and_cache_is_reused(demo, demo_tok, tmp_path, monkeypatch):
    rows = demo["sft_train"]
    cache = str(tmp_path / "cache")
    seqs = data.tokenize_sft(rows, demo_tok, "tulu", 64, cache_dir=cache, num_workers=2, progress=False)
    assert len(seqs) == len(rows)
    for row, (ids, mask) in zip(rows[:50], seqs[:50]):
        ref_ids, ref_mask = data.render_chat(demo_tok, row["messages"], "tulu")
        assert ids.dtype == np.int32 and mask.dtype == np.uint8
        assert ids.tolist() == ref_ids[:64] and mask.tolist() == ref_mask[:64]
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".npz")

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("cache miss: tokenized again")

    monkeypatch.setattr(data, "_map_chunks", must_not_tokenize)
    again = data.tokenize_sft(rows, demo_tok, "tulu", 64, cache_dir=cache, progress=False)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(seqs, again))
    monkeypatch.undo()
    # the key changes with max_seq_len, template, tokenizer (its vocabulary, or its eos, which tulu renders) and data
    other_tok = data.build_demo_tokenizer(demo, vocab_size=600)
    demo_tok.save_pretrained(str(tmp_path / "tok"))
    im_end_tok = data.Tokenizer.from_pretrained(str(tmp_path / "tok"), eos_token="<|im_end|>")
    data.tokenize_sft(rows, demo_tok, "tulu", 32, cache_dir=cache, num_workers=1, progress=False)
    data.tokenize_sft(rows, demo_tok, "chatml", 64, cache_dir=cache, num_workers=1, progress=False)
    data.tokenize_sft(rows, other_tok, "tulu", 64, cache_dir=cache, num_workers=1, progress=False)
    data.tokenize_sft(rows[1:], demo_tok, "tulu", 64, cache_dir=cache, num_workers=1, progress=False)
    im_end = data.tokenize_sft(rows, im_end_tok, "tulu", 64, cache_dir=cache, num_workers=1, progress=False)
    assert im_end[0][0][-1] == im_end_tok.eos_id != demo_tok.eos_id
    assert len(os.listdir(cache)) == 6 and not any(".tmp." in f for f in os.listdir(cache))
    # a cache file broken after it was written is named, with what to do
    (tmp_path / "cache" / files[0]).write_bytes(b"not a zip")
    with pytest.raises(DataError, match=rf"{files[0]}: the cached tokenized sft data cannot be read .*delete the "
                                           "file to tokenize again"):
        data.tokenize_sft(rows, demo_tok, "tulu", 64, cache_dir=cache, progress=False)


# As published: SmolLM2-Instruct's chat template (newlines inside its strings), AllenAI's Tulu 3 models' (jinja's
# escaped newlines), and look-alikes that render otherwise.
SMOLLM2_HUB_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
TULU3_HUB_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == "
    "'assistant' %}{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}{% else %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}{% if loop.last and "
    "add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}")
LOOK_ALIKES = {
    "ChatML without SmolLM2's default system turn": SMOLLM2_HUB_TEMPLATE.replace(
        "{% if loop.first and messages[0]['role'] != 'system' %}", "{% if false %}"),
    "OLMo 2's Tulu, with a bos first": "{{ bos_token }}" + TULU3_HUB_TEMPLATE,
    "Tulu with a newline after the final turn too": TULU3_HUB_TEMPLATE.replace(
        "+ eos_token }}", "+ eos_token + '\\n' }}"),
    "Llama 3's headers": "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
                         "\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}",
    "ChatML trimming the content": SMOLLM2_HUB_TEMPLATE.replace("message['content']", "message['content'] | trim"),
    "ChatML without the default system turn when any message is a system one": (
        "{% set ns = namespace(system=false) %}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.system = true %}{% endif %}{% endfor %}" + SMOLLM2_HUB_TEMPLATE.replace(
            "{% if loop.first and messages[0]['role'] != 'system' %}", "{% if loop.first and not ns.system %}")),
    "a template that raises": "{{ raise_exception('no') }}",
}
# Written otherwise, rendered the same: with transformers' extras (the assistant mask's generation tag, the date,
# tools) and whitespace control.
SAME_AS_CHATML = [
    SMOLLM2_HUB_TEMPLATE.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\n' }}"),
    "{% set today = strftime_now('%Y-%m-%d') %}{% if tools is not none %}{{ tools | tojson }}{% endif %}"
    + SMOLLM2_HUB_TEMPLATE,
    "{%- for message in messages -%}\n  " + SMOLLM2_HUB_TEMPLATE.split("{% for message in messages %}")[1]
    .replace("{% endfor %}", "\n{%- endfor -%}"),
]


def test_template_name_of_a_saved_chat_template_is_the_one_it_renders_like(demo_tok):
    """A saved template is ours when it renders exactly as ours (in transformers' jinja environment, checked here
    against transformers itself); SmolLM2's and Tulu 3's published ones do, look-alikes that would train on other text
    do not."""
    import transformers
    assert data.template_name("tulu", demo_tok) == data.template_name(data.TULU_TEMPLATE, demo_tok) == "tulu"
    assert data.template_name("chatml", demo_tok) == data.template_name(data.CHATML_TEMPLATE, demo_tok) == "chatml"
    assert data.template_name(SMOLLM2_HUB_TEMPLATE, demo_tok) == "chatml"
    assert data.template_name(TULU3_HUB_TEMPLATE, demo_tok) == "tulu"
    assert data.template_name(None, demo_tok) is None
    for what, template in LOOK_ALIKES.items():
        assert data.template_name(template, demo_tok) is None, what
    for template in SAME_AS_CHATML:
        assert data.template_name(template, demo_tok) == "chatml", template
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=demo_tok._tk, bos_token=demo_tok.bos_token,
                                              eos_token=demo_tok.eos_token, pad_token=demo_tok.pad_token)
    for template in [SMOLLM2_HUB_TEMPLATE, TULU3_HUB_TEMPLATE, *list(LOOK_ALIKES.values())[:-1], *SAME_AS_CHATML]:
        for messages, add_generation_prompt in data.TEMPLATE_PROBES:
            assert data._render_jinja(template, messages, add_generation_prompt, demo_tok) == hf.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_resolve_template_takes_the_saved_one_and_says_when_overridden(demo_tok, caplog):
    tok = copy.copy(demo_tok)
    tok.use_chat_template(data.CHATML_TEMPLATE)
    assert data.resolve_template("", tok) == "chatml"
    with caplog.at_level(logging.WARNING, logger="nanotulu.data"):
        assert data.resolve_template("tulu", tok) == "tulu"
    # (trained in ChatML, its eos is <|im_end|>, which tulu's turns then end with)
    assert "saved with the chatml chat template; using tulu (whose turns end with this tokenizer's eos, <|im_end|>)" \
        in caplog.text
    tok.chat_template = None
    assert data.resolve_template("", tok) == "tulu"
    tok.chat_template = LOOK_ALIKES["ChatML without SmolLM2's default system turn"]
    with pytest.raises(data.DataError, match=r"saved chat template: renders neither like tulu nor like chatml \(a "
                       r"user turn 'Hi' with the generation prompt: '<\|im_start\|>user\\nHi<\|im_end\|>\\n<\|im_start\|>"
                       r"assistant\\n'; ours: tulu .*pass --template=tulu or --template=chatml"):
        data.resolve_template("", tok)
    assert data.resolve_template("chatml", tok) == "chatml"
    with pytest.raises(data.DataError, match=r"--template=ChatML: expected tulu or chatml \(or nothing"):
        data.resolve_template("ChatML", tok)


def test_a_template_whose_tokens_the_tokenizer_lacks_is_refused(tmp_path):
    """ChatML's <|im_end|> is trained and generation stops at it, and tulu's eos likewise: a tokenizer without them as
    added tokens would render them as pieces of text, so that the end of a turn is never one trained token and
    generation never stops at it (ChatML's stop ids fall back to eos, which ChatML never trains). Refused, naming the
    token, whether the template is asked for or saved with the model."""
    import train_sft
    conv = CONVERSATIONS[0]
    no_chatml = data.Tokenizer.from_pretrained(_snapshot(tmp_path / "a", ["<|endoftext|>"],
                                                         {"eos_token": "<|endoftext|>"}))
    assert data.resolve_template("tulu", no_chatml) == "tulu"
    with pytest.raises(DataError, match=r"--template=chatml: the tokenizer has no <\|im_start\|>, which the chatml "
                                        r"chat template needs as one token; --template=tulu needs none but"):
        data.resolve_template("chatml", no_chatml)
    no_chatml.chat_template = data.CHATML_TEMPLATE  # saved with it (trained elsewhere with another tokenizer)
    with pytest.raises(DataError, match=r"saved chat template \(chatml\): the tokenizer has no <\|im_start\|>"):
        data.resolve_template("", no_chatml)
    # SFT, which takes --template=chatml without resolving it against a saved one, refuses it too
    (tmp_path / "rows.jsonl").write_text(json.dumps({"messages": conv}) + "\n")
    with pytest.raises(DataError, match=r"--template=chatml: the tokenizer has no <\|im_start\|>"):
        train_sft.load_rows(train_sft.SFTConfig(data=str(tmp_path / "rows.jsonl"), model=str(tmp_path / "a"),
                                                template="chatml"))
    # <|im_end|> an ordinary vocab entry, which byte-level pre-tokenization cuts into pieces
    im_end_in_vocab = data.Tokenizer.from_pretrained(_snapshot(
        tmp_path / "b", ["<|endoftext|>", "<|im_start|>"], {"eos_token": "<|endoftext|>"},
        lambda tokenizer_json: tokenizer_json["model"]["vocab"].update({"<|im_end|>": 1000})))
    assert len(im_end_in_vocab.encode("Hi<|im_end|>")) > 2
    with pytest.raises(DataError, match=r"--template=chatml: the tokenizer has only an ordinary vocabulary entry "
                                        r"\(no added token\) for <\|im_end\|>"):
        data.resolve_template("chatml", im_end_in_vocab)
    # tulu's eos likewise (from_pretrained makes the files' eos an added token; one made otherwise may not be)
    core = HFTokenizerCore.from_str(im_end_in_vocab._tk.to_str())
    eos_in_vocab = data.Tokenizer(core, None, "<|im_end|>")
    with pytest.raises(DataError, match=r"default chat template \(tulu\): the tokenizer has only an ordinary "
                                        r"vocabulary entry \(no added token\) for <\|im_end\|>, which the tulu"):
        data.resolve_template("", eos_in_vocab)


def test_the_chat_template_is_found_where_transformers_saves_it(tok_dir, tmp_path):
    """transformers 5 saves the template as chat_template.jinja, which wins over tokenizer_config.json's; the
    config's may also be a list of named templates, of which transformers uses 'default'."""
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    hf.chat_template = data.CHATML_TEMPLATE
    hf.save_pretrained(str(tmp_path / "hf"))
    assert os.path.exists(tmp_path / "hf" / "chat_template.jinja")
    assert data.Tokenizer.from_pretrained(str(tmp_path / "hf")).chat_template == data.CHATML_TEMPLATE

    def folder(name, chat_template):
        shutil.copytree(tok_dir, tmp_path / name)
        config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
        return str(tmp_path / name)

    listed = folder("listed", [{"name": "tool_use", "template": data.TULU_TEMPLATE},
                               {"name": "default", "template": data.CHATML_TEMPLATE}])
    assert data.Tokenizer.from_pretrained(listed).chat_template == data.CHATML_TEMPLATE
    conv = CONVERSATIONS[1]
    assert data.render_chat(data.Tokenizer.from_pretrained(listed), conv, "chatml")[0] == \
        transformers.AutoTokenizer.from_pretrained(listed).apply_chat_template(conv, tokenize=True)["input_ids"]
    for entries in ([{"name": "default", "template": 3}], [{"name": "default"}], ["<|user|>"]):
        with pytest.raises(ValueError, match=r"listed2.tokenizer_config.json: chat_template is a list whose entries "
                                             r"must each be \{name, template\}, both strings"):
            data.Tokenizer.from_pretrained(folder("listed2", entries))
        shutil.rmtree(tmp_path / "listed2")
    with pytest.raises(ValueError, match="chat_template must be a jinja string .* got int"):
        data.Tokenizer.from_pretrained(folder("number", 3))


def test_named_chat_templates_with_no_default_are_refused_only_where_a_template_is_needed(tok_dir, tmp_path):
    """A tokenizer_config.json chat_template listing named templates none of which is 'default' (tool_use and rag):
    transformers loads the tokenizer and refuses only to render with no template named; so do we, so that
    --template=tulu or chatml trains and evaluates with it, and --template= (the saved one) is refused, naming the
    file. Saved again (no template trained into it), the list stays as it was."""
    import transformers
    shutil.copytree(tok_dir, tmp_path / "snapshot")
    config = json.loads((tmp_path / "snapshot" / "tokenizer_config.json").read_text())
    listed = [{"name": "tool_use", "template": data.TULU_TEMPLATE}, {"name": "rag", "template": data.CHATML_TEMPLATE}]
    (tmp_path / "snapshot" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": listed}))
    tok = data.Tokenizer.from_pretrained(str(tmp_path / "snapshot"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "snapshot"))
    conv = CONVERSATIONS[1]
    with pytest.raises(ValueError, match="no default"):  # transformers' refusal, where a template is needed
        hf.apply_chat_template(conv)
    for template in ("tulu", "chatml"):
        assert data.resolve_template(template, tok) == template
        assert data.render_chat(tok, conv, template)[0] == hf.apply_chat_template(
            conv, chat_template=data.CHAT_TEMPLATES[template], tokenize=True)["input_ids"]
    with pytest.raises(DataError, match=r"snapshot.tokenizer_config.json: chat_template lists the templates "
                                        r"\['rag', 'tool_use'\], none of them named 'default'; pass --template=tulu"):
        data.resolve_template("", tok)
    assert data.template_name(tok.chat_template, tok) is None and tok.end_of_turn_ids() == [tok.eos_id]
    assert pickle.loads(pickle.dumps(tok)).chat_template == tok.chat_template
    tok.save_pretrained(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["chat_template"] == listed
    with pytest.raises(DataError, match=r"saved.tokenizer_config.json: chat_template lists the templates"):
        data.resolve_template("", data.Tokenizer.from_pretrained(str(tmp_path / "saved")))
    tok.use_chat_template("tulu")  # trained in tulu: saved with it
    tok.save_pretrained(str(tmp_path / "trained"))
    assert data.resolve_template("", data.Tokenizer.from_pretrained(str(tmp_path / "trained"))) == "tulu"


def test_truncation_and_padding_stored_in_tokenizer_json_are_not_applied(tok_dir, tmp_path):
    """transformers writes them into tokenizer.json after a call that asked for them, and applies them only to calls
    that ask again: the ids of a long conversation still equal apply_chat_template's, and nothing is padded."""
    import transformers
    shutil.copytree(tok_dir, tmp_path / "t")
    core = HFTokenizerCore.from_file(str(tmp_path / "t" / "tokenizer.json"))
    core.enable_truncation(max_length=8)
    core.enable_padding(length=64, pad_id=0, pad_token="<|endoftext|>")
    core.save(str(tmp_path / "t" / "tokenizer.json"))
    tok = data.Tokenizer.from_pretrained(str(tmp_path / "t"))
    conv = CONVERSATIONS[1]
    ids, mask = data.render_chat(tok, conv, "tulu")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    hf.chat_template = data.TULU_TEMPLATE
    assert len(ids) > 8 and ids == hf.apply_chat_template(conv, tokenize=True)["input_ids"] and sum(mask) > 0
    assert tok.encode("Hello") == hf.encode("Hello", add_special_tokens=False) and len(tok.encode("Hello")) < 8


def test_a_tokenizer_larger_than_the_models_vocab_is_an_error(demo_tok):
    data.check_vocab(demo_tok, demo_tok.vocab_size, "m")
    with pytest.raises(ValueError, match=f"m: the tokenizer has {demo_tok.vocab_size} ids but the model's vocab_size "
                                         f"is {demo_tok.vocab_size - 1}"):
        data.check_vocab(demo_tok, demo_tok.vocab_size - 1, "m")


def test_broken_tokenizer_files_are_named(tok_dir, tmp_path):
    for nothing in ("", None):
        with pytest.raises(FileNotFoundError, match="no folder given"):
            data.Tokenizer.from_pretrained(nothing)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        data.Tokenizer.from_pretrained(str(tmp_path / "nowhere"))
    shutil.copytree(tok_dir, tmp_path / "a")
    (tmp_path / "a" / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(ValueError, match=r"tokenizer_config.json: invalid JSON at line 1"):
        data.Tokenizer.from_pretrained(str(tmp_path / "a"))
    (tmp_path / "a" / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: expected a JSON object, got list"):
        data.Tokenizer.from_pretrained(str(tmp_path / "a"))
    (tmp_path / "a" / "tokenizer_config.json").write_bytes(b'{"eos_token": "caf\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not UTF-8 text \(byte 18\)"):
        data.Tokenizer.from_pretrained(str(tmp_path / "a"))
    for value in (0, ["<|endoftext|>"]):
        (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"eos_token": value}))
        with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token = .* must be a token string"):
            data.Tokenizer.from_pretrained(str(tmp_path / "a"))
    (tmp_path / "a" / "tokenizer_config.json").unlink()
    for value in ("2", 10**9):
        (tmp_path / "a" / "generation_config.json").write_text(json.dumps({"bos_token_id": value}))
        with pytest.raises(ValueError, match=r"generation_config.json: bos_token_id = .* is not a token id"):
            data.Tokenizer.from_pretrained(str(tmp_path / "a"))
    (tmp_path / "a" / "generation_config.json").unlink()
    (tmp_path / "a" / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    with pytest.raises(ValueError, match=r"chat_template.jinja: not UTF-8 text \(byte 0\)"):
        data.Tokenizer.from_pretrained(str(tmp_path / "a"))
    (tmp_path / "a" / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ValueError, match=r"tokenizer.json: not a readable tokenizer"):
        data.Tokenizer.from_pretrained(str(tmp_path / "a"))


@pytest.mark.parametrize("template", ["tulu", "chatml"])
def test_a_saved_model_stops_at_its_templates_end_of_turn_in_transformers(demo_tok, tmp_path, template):
    """A model trained in ChatML names <|im_end|> as its eos in tokenizer_config.json, config.json and
    generation_config.json, as SmolLM2-Instruct's files do, so tools that stop at the tokenizer's eos (TRL, lm-eval)
    stop at the end of a turn too; pad keeps its token. Tulu's turns end with eos, which stays."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from model import ModelConfig, Transformer
    tok = copy.copy(demo_tok)
    tok.use_chat_template(template)
    Transformer(ModelConfig.from_preset("tiny", eos_token_id=0)).save_pretrained(str(tmp_path), tokenizer=tok)
    end = 0 if template == "tulu" else tok.token_to_id("<|im_end|>")
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.eos_token_id, hf.pad_token_id) == (end, 0)
    assert AutoConfig.from_pretrained(str(tmp_path)).eos_token_id == end
    # generation stops at <|endoftext|> too, the eos before, as it did before the model was trained in ChatML
    stops = [0] if template == "tulu" else [end, 0]
    assert GenerationConfig.from_pretrained(str(tmp_path)).eos_token_id == (stops if len(stops) > 1 else stops[0])
    reloaded = data.Tokenizer.from_pretrained(str(tmp_path))
    assert data.stop_token_ids(reloaded, template) == data.stop_token_ids(tok, template) == \
        data.stop_token_ids(demo_tok, template) == stops


def test_a_bos_that_no_file_names_is_none_as_in_transformers(tok_dir, tmp_path):
    """A template's {{ bos_token }} then renders nothing, as transformers renders it, and OLMo 2's Tulu (a bos first)
    is tulu for such a tokenizer."""
    from transformers import PreTrainedTokenizerFast
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    template = LOOK_ALIKES["OLMo 2's Tulu, with a bos first"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                                 "chat_template": template}))
    ours, hf = data.Tokenizer.from_pretrained(str(tmp_path)), PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert ours.bos_token is None and ours.bos_id is None and hf.bos_token is None
    for messages in CONVERSATIONS:
        assert data._render_jinja(template, messages, False, ours) == hf.apply_chat_template(messages, tokenize=False)
    assert data.template_name(template, ours) == "tulu"
    ours.save_pretrained(str(tmp_path / "saved"))
    assert data.Tokenizer.from_pretrained(str(tmp_path / "saved")).bos_token is None
    assert PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "saved")).bos_token is None


def test_sft_rows_cut_at_max_seq_len_are_reported(demo, demo_tok, caplog):
    rows = demo["sft_train"][:40]
    lengths = [len(ids) for ids, _ in data.tokenize_sft(rows, demo_tok, "tulu", 10_000, num_workers=1, progress=False)]
    limit = sorted(lengths)[len(lengths) // 2]
    with caplog.at_level(logging.WARNING, logger="nanotulu.data"):
        cut = data.tokenize_sft(rows, demo_tok, "tulu", limit, num_workers=1, progress=False, split="held-out")
    full = sum(len(ids) == limit for ids, _ in cut)
    assert full >= sum(n > limit for n in lengths) > 0
    assert f"{full} held-out SFT rows fill max_seq_len={limit}: longer ones were cut at the end" in caplog.text


def test_truncation_to_max_seq_len_drops_rows_left_with_nothing_to_train(demo, demo_tok, caplog):
    rows = demo["sft_train"][:40]
    full = data.tokenize_sft(rows, demo_tok, "tulu", 10_000, num_workers=1, progress=False)
    with caplog.at_level(logging.WARNING, logger="nanotulu.data"):
        cut = data.tokenize_sft(rows, demo_tok, "tulu", 24, num_workers=1, progress=False)
    assert full.num_skipped == 0 and max(len(ids) for ids, _ in full) > 24
    kept = [(ids[:24], mask[:24]) for ids, mask in full if mask[:24].any()]
    assert 0 < len(kept) < len(full) and cut.num_skipped == len(full) - len(kept)
    assert f"dropped {cut.num_skipped} SFT rows with no trained token within max_seq_len=24" in caplog.text
    for (ki, km), (ci, cm) in zip(kept, cut, strict=True):
        assert np.array_equal(ci, ki) and np.array_equal(cm, km)


def test_pairs_with_the_same_chosen_and_rejected_answer_are_kept_counted_and_the_first_named(caplog):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "a"}]
    with caplog.at_level(logging.WARNING, logger="nanotulu.data"):
        assert len(data.load_preference_rows(rows)) == 2
    assert "preference rows: 1 of 2 pairs have the same chosen and rejected answer" in caplog.text
    assert "first: the pair whose prompt ends 'q'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nanotulu.data"):
        data.load_preference_rows([dict(row, id=f"pair-{i}") for i, row in enumerate(rows + rows)])
    assert "2 of 4 pairs" in caplog.text and "first: id 'pair-1'" in caplog.text


def test_tokenize_preference_trains_only_final_response_and_truncates(demo_tok, caplog):
    user = {"role": "user", "content": "Tell me about cats. Use only lowercase letters."}
    row = {"prompt": [user, {"role": "assistant", "content": "earlier answer"}, user],
           "chosen": [{"role": "assistant", "content": "many people enjoy cats."}],
           "rejected": [{"role": "assistant", "content": "Many people enjoy cats."}]}
    (pair,) = data.tokenize_preference([row], demo_tok, "tulu", 1000, num_workers=1, progress=False)
    for key in ("chosen", "rejected"):
        ids, mask = pair[key]
        assert _trained_text(demo_tok, ids.tolist(), mask.tolist()) == row[key][0]["content"] + "<|endoftext|>"
    n_resp = int(pair["chosen"][1].sum())
    (short,) = data.tokenize_preference([row], demo_tok, "tulu", n_resp + 3, num_workers=1, progress=False)
    ids, mask = short["chosen"]
    assert len(ids) == n_resp + 3 and np.array_equal(ids, pair["chosen"][0][-(n_resp + 3):])
    dropped = data.tokenize_preference([row], demo_tok, "tulu", n_resp + 3, truncation="drop", num_workers=1,
                                       progress=False)
    assert len(dropped) == 0 and dropped.num_skipped == 1
    # a cut that keeps one prompt token leaves no room for the response at max_seq_len=1: dropped, not a pair with
    # nothing to score (collate_pairs failed on it with an IndexError)
    with caplog.at_level(logging.WARNING, logger="nanotulu.data"):
        none_left = data.tokenize_preference([row], demo_tok, "tulu", 1, num_workers=1, progress=False)
    assert len(none_left) == 0 and none_left.num_skipped == 1
    assert "dropped 1 preference pairs longer than 1 tokens that had no response token left when cut" in caplog.text


def test_a_response_of_several_messages_trains_only_its_last(demo_tok):
    """TRL's layout lets a response hold several assistant messages; the final one alone is trained, as the README
    says and open-instruct does, and a cut that leaves none of it drops the pair rather than training an earlier one."""
    row = {"prompt": [{"role": "user", "content": "Tell me about cats."}],
           "chosen": [{"role": "assistant", "content": "first part."}, {"role": "assistant", "content": "cats purr."}],
           "rejected": [{"role": "assistant", "content": "no."}]}
    (pair,) = data.tokenize_preference([row], demo_tok, "tulu", 1000, num_workers=1, progress=False)
    ids, mask = pair["chosen"]
    assert _trained_text(demo_tok, ids.tolist(), mask.tolist()) == "cats purr.<|endoftext|>"
    final = int(mask.sum())
    cut = data.tokenize_preference([row], demo_tok, "tulu", len(ids) - final, truncation="right", num_workers=1,
                                   progress=False)
    assert len(cut) == 0 and cut.num_skipped == 1


def test_left_truncation_cuts_chosen_and_rejected_alike(demo_tok):
    """Only the longer side overflows, yet both lose the same prompt tokens: the two responses are scored in the
    same context."""
    user = {"role": "user", "content": "Tell me about cats and dogs and birds. Use only lowercase letters."}
    row = {"prompt": [user], "chosen": [{"role": "assistant", "content": "many people enjoy cats and dogs."}],
           "rejected": [{"role": "assistant", "content": "cats."}]}
    (full,) = data.tokenize_preference([row], demo_tok, "tulu", 1000, num_workers=1, progress=False)
    (c_ids, c_mask), (r_ids, r_mask) = full["chosen"], full["rejected"]
    assert len(c_ids) > len(r_ids) + 2
    limit = len(c_ids) - 2
    (cut,) = data.tokenize_preference([row], demo_tok, "tulu", limit, num_workers=1, progress=False)
    assert np.array_equal(cut["chosen"][0], c_ids[2:]) and np.array_equal(cut["chosen"][1], c_mask[2:])
    assert np.array_equal(cut["rejected"][0], r_ids[2:]) and np.array_equal(cut["rejected"][1], r_mask[2:])


def test_right_truncation_cuts_each_side_at_its_own_end_as_tulu3(demo_tok, caplog):
    """Tulu 3's DPO tokenized each side with truncation at max_length and kept a pair while both sides had a label:
    the overflowing side loses its end (eos included), the other stays whole, the prompt is never cut."""
    user = {"role": "user", "content": "Tell me about cats and dogs and birds. Use only lowercase letters."}
    row = {"prompt": [user], "chosen": [{"role": "assistant", "content": "many people enjoy cats and dogs."}],
           "rejected": [{"role": "assistant", "content": "cats."}]}
    (full,) = data.tokenize_preference([row], demo_tok, "tulu", 1000, num_workers=1, progress=False)
    (c_ids, c_mask), (r_ids, r_mask) = full["chosen"], full["rejected"]
    limit = len(c_ids) - 2
    assert len(r_ids) <= limit
    (cut,) = data.tokenize_preference([row], demo_tok, "tulu", limit, truncation="right", num_workers=1,
                                      progress=False)
    assert np.array_equal(cut["chosen"][0], c_ids[:limit]) and np.array_equal(cut["chosen"][1], c_mask[:limit])
    assert np.array_equal(cut["rejected"][0], r_ids) and np.array_equal(cut["rejected"][1], r_mask)
    assert "1 preference pairs fill max_seq_len" in caplog.text and "longer responses lost their ends" in caplog.text
    prompt_len = list(r_mask).index(1)  # no response token of either side fits: the pair goes
    gone = data.tokenize_preference([row], demo_tok, "tulu", prompt_len, truncation="right", num_workers=1,
                                    progress=False)
    assert len(gone) == 0 and gone.num_skipped == 1


def test_the_preference_cache_key_covers_both_responses_and_the_truncation(demo, demo_tok, tmp_path):
    """A cached tokenization is reused only for the same pairs under the same truncation: another rejected answer,
    or 'drop' after 'left', tokenizes afresh."""
    rows = data.load_preference_rows(demo["pref_train"][:8])
    edited = copy.deepcopy(rows)
    edited[0]["rejected"][0]["content"] += " And more."

    def tokenize(rows, truncation, cache_dir):
        # 38 tokens: five of the eight pairs are longer, so 'left' cuts them and 'drop' drops them; one is exactly 38
        # tokens long, which fits
        return data.tokenize_preference(rows, demo_tok, "tulu", 38, truncation=truncation, cache_dir=cache_dir,
                                        num_workers=1, progress=False)
    cache = str(tmp_path / "cache")
    assert len(tokenize(rows, "left", cache)) == 8
    for variant, truncation in ((rows, "drop"), (edited, "left")):
        cached, fresh = tokenize(variant, truncation, cache), tokenize(variant, truncation, None)
        assert len(cached) == len(fresh) == (3 if truncation == "drop" else 8)
        for a, b in zip(cached, fresh, strict=True):
            for key in ("chosen", "rejected"):
                assert np.array_equal(a[key][0], b[key][0]) and np.array_equal(a[key][1], b[key][1]), key


# ---------------------------------------------------------------------------------------------------------------
# Packing and collation


def test_pack_best_fit_respects_capacity_and_uses_every_sequence_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=300).tolist()
    bins = data.pack_best_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= int(np.ceil(sum(lengths) / 64 * 1.15))  # best fit wastes little room
    assert data.pack_best_fit([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    with pytest.raises(ValueError, match="sequence 1 has length 9 > max_seq_len 8"):
        data.pack_best_fit([3, 9], 8)


def test_packed_batch_equals_unpacked_per_document(demo, demo_tok):
    examples = data.tokenize_sft(demo["sft_train"][:40], demo_tok, "tulu", 48, num_workers=1, progress=False)
    bins = data.pack_best_fit([len(ids) for ids, _ in examples], 128)
    packed = data.collate_packed(examples, bins, 128, demo_tok.pad_id)
    assert packed["input_ids"].shape == (len(bins), 128)
    for b, group in enumerate(bins):
        p = 0
        for d, i in enumerate(group):
            padded = data.collate_padded(examples, [i], 48, demo_tok.pad_id)
            n = len(examples[i][0])
            for key in ("input_ids", "labels"):
                assert torch.equal(packed[key][b, p:p + n], padded[key][0, :n]), key
            assert sorted(padded) == ["input_ids", "labels"]  # positions 0..n-1 and one document: the defaults
            assert torch.equal(packed["position_ids"][b, p:p + n], torch.arange(n))
            assert (packed["doc_ids"][b, p:p + n] == d).all()
            p += n
        assert (packed["labels"][b, p:] == -100).all() and (packed["input_ids"][b, p:] == demo_tok.pad_id).all()
        assert (packed["doc_ids"][b, p:] == len(group)).all()


def test_labels_are_shifted_and_masked():
    examples = [(np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1])), (np.array([20, 21, 22]), np.array([0, 1, 0]))]
    batch = data.collate_packed(examples, [[0, 1]], 8, pad_id=9)
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 13, 20, 21, 22, 9]
    assert batch["labels"][0].tolist() == [-100, 12, 13, -100, 21, -100, -100, -100]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert batch["doc_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    padded = data.collate_padded(examples, [0, 1], 8, pad_id=9)
    assert padded["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, 22, 9]]
    assert padded["labels"].tolist() == [[-100, 12, 13, -100], [21, -100, -100, -100]]


# ---------------------------------------------------------------------------------------------------------------
# Sampler


def test_sampler_deterministic_shuffled_per_epoch_and_resumable():
    a, b = data.EpochSampler(10, seed=3), data.EpochSampler(10, seed=3)
    e0 = a.next_batch(10)
    assert e0 == b.next_batch(10) == a.order(0) and sorted(e0) == list(range(10))
    e1 = a.next_batch(10)
    assert sorted(e1) == list(range(10)) and e1 != e0  # a new permutation each epoch
    assert len({tuple(a.order(epoch)) for epoch in range(4)}) == 4  # not a short cycle of orders either
    assert data.EpochSampler(10, seed=4).next_batch(10) != e0
    # resume: a restored sampler continues with exactly the indices the uninterrupted one gives
    s = data.EpochSampler(10, seed=3, rank=1, world_size=2)
    first = s.next_batch(3) + s.next_batch(3)
    state = s.state_dict()
    rest = s.next_batch(7)
    r = data.EpochSampler(10, seed=3, rank=1, world_size=2)
    r.load_state_dict(state)
    assert r.next_batch(7) == rest and state["epoch"] == 1 and state["consumed"] == 2
    stream = a.order(0) + a.order(1) + a.order(2)
    assert first + rest == stream[1:26:2]  # rank 1 of 2: every other item of the stream
    with pytest.raises(ValueError, match="num_items=10"):
        data.EpochSampler(11, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"checkpoint has seed=3, this run has 4 \(the data or seed changed\)"):
        data.EpochSampler(10, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"rank 2 not in \[0, 2\)"):
        data.EpochSampler(10, seed=3, rank=2, world_size=2)


@pytest.mark.parametrize("num_items", [20, 45])
def test_the_ranks_and_accumulation_steps_of_an_effective_batch_take_the_same_items(num_items):
    """1 rank x 4 accumulation steps, 2 ranks x 2 and 4 ranks x 1 (micro-batch 2) train each optimizer step on the
    same 8 items, across epoch boundaries too (45 is not a multiple of any world size), and each epoch holds every
    item once."""
    def steps(world, accum, count):
        ranks = [data.EpochSampler(num_items, seed=3, rank=r, world_size=world) for r in range(world)]
        return [sorted(i for _ in range(accum) for r in ranks for i in r.next_batch(2)) for _ in range(count)]
    one = steps(1, 4, 17)
    assert steps(2, 2, 17) == steps(4, 1, 17) == one
    stream = sum(one, [])
    assert sorted(stream[:num_items // 8 * 8]) == sorted(data.EpochSampler(num_items, 3).order(0)[:num_items // 8 * 8])
    assert len(set(data.EpochSampler(num_items, 3, rank=1, world_size=2).next_batch(num_items // 2))) == num_items // 2


def test_a_sampler_resumed_on_another_number_of_ranks_continues_the_same_stream():
    """One rank that took 6 of an epoch's 20 items leaves the same 14 for 2, 3 or 4 ranks resumed from its state,
    and 2 ranks' state resumes on 1."""
    one = data.EpochSampler(20, seed=3)
    one.next_batch(6)
    state = one.state_dict()
    rest = one.next_batch(12)
    for world in (2, 3, 4):
        ranks = [data.EpochSampler(20, seed=3, rank=r, world_size=world) for r in range(world)]
        for r in ranks:
            r.load_state_dict(state)
        dealt = [r.next_batch(12 // world) for r in ranks]
        assert [dealt[i % world][i // world] for i in range(12)] == rest
    two = data.EpochSampler(20, seed=3, rank=1, world_size=2)
    two.next_batch(3)
    resumed = data.EpochSampler(20, seed=3)
    resumed.load_state_dict(two.state_dict())
    assert resumed.next_batch(14) == one.order(0)[6:20]
    # a checkpoint from before the shared stream: rank 1 of 2 had taken 3 of its share
    old_format = data.EpochSampler(20, seed=3)
    old_format.load_state_dict({"epoch": 0, "position": 3, "num_items": 20, "seed": 3, "world_size": 2})
    assert old_format.next_batch(14) == one.order(0)[6:20]
    # ... and from before states recorded the world size, resumed on the same number of ranks
    older = [data.EpochSampler(20, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in older:
        r.load_state_dict({"epoch": 0, "position": 3, "num_items": 20, "seed": 3})
    assert sorted(older[0].next_batch(7) + older[1].next_batch(7)) == sorted(one.order(0)[6:20])


# ---------------------------------------------------------------------------------------------------------------
# Synthetic demo data


def _arith_steps(response):
    """(every step line's arithmetic is right, the '#### N' answer) of a demo arithmetic response."""
    *steps, final = response.split("\n")
    right = True
    for line in steps:
        x, op, y, eq, z = line.split()
        right &= eq == "=" and int(z) == (int(x) + int(y) if op == "+" else int(x) - int(y)) and int(z) > 0
    assert final == f"#### {z}"  # the answer restates the last step's result
    return right, final[len("#### "):]


def _check_constraint(response, gt):
    gt = json.loads(gt)
    f = gt["func_name"]
    if f == "validate_lowercase":
        return response == response.lower()
    if f == "validate_no_commas":
        return "," not in response
    if f == "verify_keywords":
        return all(k.lower() in response.lower() for k in gt["keyword_list"])
    if f == "validate_end":
        return response.strip().endswith(gt["end_phrase"])
    if f == "validate_word_constraint":
        assert gt["quantifier"] == "at most"
        return len(response.split()) <= gt["N"]
    raise AssertionError(f"unexpected func_name {f}")


def test_demo_data_is_deterministic_and_heldout_is_disjoint(demo):
    assert data.make_demo_data(seed=0, n_train=600, n_heldout=60, n_rlvr=200) == demo
    assert data.make_demo_data(seed=1, n_train=600, n_heldout=60, n_rlvr=200) != demo
    assert [len(demo[k]) for k in ("sft_train", "pref_train", "rlvr_train")] == [600, 600, 200]
    assert [len(demo[k]) for k in ("sft_heldout", "pref_heldout", "rlvr_heldout")] == [60] * 3
    prompt = lambda r: (r.get("messages") or r["chosen"])[0]["content"]
    splits = {k: {prompt(r) for r in demo[k]} for k in demo}
    assert splits["sft_train"] == splits["pref_train"] and len(splits["sft_train"]) == 600
    assert splits["sft_heldout"] == splits["pref_heldout"] == splits["rlvr_heldout"]
    # three disjoint prompt sets: SFT/DPO training, RLVR training (fresh, so RL gains must generalise), held-out
    train, rlvr, held = splits["sft_train"], splits["rlvr_train"], splits["sft_heldout"]
    assert len(rlvr) == 200 and len(held) == 60 and not (train & rlvr or train & held or rlvr & held)
    tasks = [r["source"] for r in demo["sft_train"]]
    assert tasks.count("demo_arith") == 300 and tasks.count("demo_constraint") == 300
    # every reader accepts the demo rows as they are
    assert len(data.load_sft_rows(demo["sft_train"])) == 600
    assert len(data.load_preference_rows(demo["pref_train"])) == 600
    assert len(data.load_rlvr_rows(demo["rlvr_train"])) == 200


def test_demo_ground_truths_are_consistent(demo):
    heldout = zip(demo["sft_heldout"], demo["pref_heldout"], demo["rlvr_heldout"])
    for sft, pref, rlvr in heldout:
        task = rlvr["source"]
        assert task == sft["source"] == pref["source"]
        assert rlvr["messages"] == sft["messages"][:1] == pref["chosen"][:1] == pref["rejected"][:1]
        assert sft["messages"][1] == pref["chosen"][1]  # held-out demonstrations are clean
        if task == "demo_arith":
            assert rlvr["dataset"] == "gsm8k" and rlvr["ground_truth"].isdigit()
            assert _arith_steps(pref["chosen"][-1]["content"]) == (True, rlvr["ground_truth"])
            right, answer = _arith_steps(pref["rejected"][-1]["content"])
            assert not right and answer != rlvr["ground_truth"]
        else:
            assert rlvr["dataset"] == "ifeval"
            assert _check_constraint(pref["chosen"][-1]["content"], rlvr["ground_truth"])
            assert not _check_constraint(pref["rejected"][-1]["content"], rlvr["ground_truth"])
    for rlvr in demo["rlvr_train"]:
        assert rlvr["dataset"] in ("gsm8k", "ifeval") and data.load_rlvr_rows([rlvr])
    for sft, pref in zip(demo["sft_train"], demo["pref_train"]):
        assert sft["messages"][:1] == pref["chosen"][:1] == pref["rejected"][:1]
        if sft["source"] == "demo_arith":
            assert sft["messages"][1] == pref["chosen"][1]
        else:  # the noisy teacher: a demonstration either keeps its constraint (chosen) or ignores it (rejected)
            assert sft["messages"][1] in (pref["chosen"][1], pref["rejected"][1])
    constraint = [(s, p) for s, p in zip(demo["sft_train"], demo["pref_train"]) if s["source"] == "demo_constraint"]
    noisy = sum(s["messages"][1] == p["rejected"][1] for s, p in constraint) / len(constraint)
    assert abs(noisy - 0.6) < 0.08  # sft_noise's default, within sampling error for 300 draws
    clean = data.make_demo_data(seed=0, n_train=600, n_heldout=60, n_rlvr=200, sft_noise=0.0)
    assert all(s["messages"][1] == p["chosen"][1] for s, p in zip(clean["sft_train"], clean["pref_train"]))
    funcs = {json.loads(r["ground_truth"])["func_name"] for r in demo["rlvr_train"] if r["dataset"] == "ifeval"}
    assert funcs == {"validate_lowercase", "validate_no_commas", "verify_keywords", "validate_end",
                     "validate_word_constraint"}


def test_demo_tokenizer_and_lengths(demo, demo_tok, tmp_path):
    assert demo_tok.vocab_size <= 1024
    assert [demo_tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == list(range(len(data.SPECIAL_TOKENS)))
    assert demo_tok.bos_id == demo_tok.eos_id == demo_tok.pad_id == 0
    # responses stay short so a tiny model can learn them
    lengths = [len(demo_tok.encode(r["messages"][-1]["content"])) for r in demo["sft_train"]]
    assert max(lengths) < 40
    demo_tok.save_pretrained(str(tmp_path))
    again = data.Tokenizer.from_pretrained(str(tmp_path))
    assert again.fingerprint() == demo_tok.fingerprint() and again.chat_template == data.TULU_TEMPLATE
    assert data.stop_token_ids(demo_tok, "tulu") == [0]
    assert data.stop_token_ids(demo_tok, "chatml") == [demo_tok.token_to_id("<|im_end|>"), 0]


def _sigterm_handlers(job):  # (module level: the pool runs it in its workers)
    import signal
    return [signal.getsignal(signal.SIGTERM) is signal.SIG_DFL]


def test_tokenization_workers_end_quietly_under_a_trainers_sigterm_handler():
    """A forked worker inherited common.run_script's SIGTERM handler, and the pool ends its workers with SIGTERM:
    each raised common.Terminated and printed a traceback at every tokenization, on every run."""
    import signal

    import common
    previous = signal.signal(signal.SIGTERM, common._terminated)
    try:
        handlers = data._map_chunks(_sigterm_handlers, list(range(600)), (), None, 2, False, "test")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert handlers == [True] * 3  # one per chunk of 256 rows, each in a worker that dies as SIGTERM says
