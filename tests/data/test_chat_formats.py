"""Instruction-data row formats (ShareGPT, TRL prompt/completion, prompt/response, Alpaca) read as the equivalent
``messages`` file, bad and mixed files refused in one line; Meta's Llama 2 chat format byte- and id-exact against
Meta's reference and HF's apply_chat_template, trained exactly on each answer and its </s>; --chat-template auto
follows the tokenizer."""
import json
import os

import numpy as np
import pytest

from megallama.data.chat_templates import Llama2ChatTemplate, resolve_chat_format
from megallama.data.sft_dataset import ChatTemplate, build_sft_datasets, read_chat_jsonl, tokenize_conversations
from megallama.data.tokenizer import build_tokenizer
from megallama.errors import ConfigError

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [SYSTEM, {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "  2 plus 2 is 4.\n"}, {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "It is 6."}]
ONE = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]
ALPACA_USER = "Translate to French.\n\nGood morning"
# the same conversations in each row format, and as messages
ROWS = {
    "sharegpt": ([{"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                      "value": m["content"]} for m in CHAT]},
                  {"conversations": [{"from": "user", "value": ONE[0]["content"]},
                                     {"from": "assistant", "value": ONE[1]["content"]}]}], [CHAT, ONE]),
    "prompt_completion": ([{"prompt": ONE[0]["content"], "completion": ONE[1]["content"]},
                           {"prompt": CHAT[:2], "completion": CHAT[2:3]}], [ONE, CHAT[:3]]),
    "prompt_response": ([{"prompt": ONE[0]["content"], "response": ONE[1]["content"], "id": 7}], [ONE]),
    "alpaca": ([{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
                {"instruction": ONE[0]["content"], "input": "", "output": ONE[1]["content"]},
                {"instruction": ONE[0]["content"], "output": ONE[1]["content"]}],
               [[{"role": "user", "content": ALPACA_USER}, {"role": "assistant", "content": "Bonjour"}], ONE, ONE]),
}
# Meta's Llama-2-chat template (meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json)
META_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# Meta's llama/generation.py chat_completion, written out for CHAT
META_TEXT = ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 plus 2? [/INST] 2 plus 2 is 4. </s>"
             "<s>[INST] And 3 plus 3? [/INST] It is 6. </s>")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _tokens(path, tok, fmt="auto"):
    train, _ = build_sft_datasets(path, tok, 256, split="100,0,0", chat_format=fmt)
    return sorted((t.tolist(), m.tolist()) for t, m in train.convs), train.chat_format


@pytest.mark.parametrize("fmt", sorted(ROWS))
@pytest.mark.parametrize("template", ["llama3", "llama2"])
def test_each_row_format_gives_the_tokens_and_masks_of_its_messages_file(tmp_path, fmt, template):
    rows, messages = ROWS[fmt]
    tok = build_tokenizer("bundled")
    assert read_chat_jsonl(_jsonl(tmp_path / "rows.jsonl", rows)) == messages
    ours = _tokens(str(tmp_path / "rows.jsonl"), tok, template)
    want = _tokens(_jsonl(tmp_path / "m.jsonl", [{"messages": m} for m in messages]), tok, template)
    assert ours == want and ours[1] == template


def test_trl_conversational_prompt_trains_the_completion_only(tmp_path):
    """TRL's prompt/completion loss is on the completion: an assistant turn inside the prompt is context."""
    row = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    tok = build_tokenizer("bundled")
    for template in (ChatTemplate(tok), Llama2ChatTemplate(tok)):
        got = tokenize_conversations(read_chat_jsonl(_jsonl(tmp_path / "p.jsonl", [row])), template)[0]
        t, m = (np.asarray(x) for x in template.encode_dialog(CHAT))
        assert got[0].tolist() == t.tolist()
        trained = tok.decode(got[0][got[1] == 1].tolist())
        assert "It is 6." in trained and "4" not in trained, trained
        assert got[1].sum() < m.sum()


@pytest.mark.parametrize("rows, says", [
    ([{"messages": ONE}, {"prompt": "a", "completion": "b"}],
     r"line 2 is a prompt_completion row, but line 1 made .* a messages file"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}], r'line 2 has no "output" key'),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], r'line 2 has no "completion" key'),
    ([{"prompt": "a", "response": "b"}, {"response": "c"}], r'line 2 has no "prompt" key'),
    ([{"instruction": "a", "input": "b"}], r'line 1 has no "output" key, which every row of this alpaca file'),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
     r"line 1: \"from\": 'bot' is not one of human, user, gpt"),
    ([{"conversations": [{"from": "human", "text": "a"}]}], r'line 1: a turn has no "value" key'),
    ([{"prompt": "a", "completion": ONE[1:]}], r'line 1: "prompt" and "completion" must both be strings or both'),
    ([{"text": "hello"}], r'line 1 has no "messages" list nor another chat format'),
    ([{"messages": ONE}, [1, 2]], r'line 2 has no "messages" key'),
])
def test_bad_and_mixed_files_are_one_line(tmp_path, rows, says):
    with pytest.raises(ConfigError, match=says) as e:
        read_chat_jsonl(_jsonl(tmp_path / "bad.jsonl", rows))
    assert "\n" not in str(e.value) and "bad.jsonl" in str(e.value)


def _byte_level(folder):
    """A small byte-level BPE tokenizer.json with Llama 2's <s>/</s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([m["content"] for m in CHAT] * 20 + ["[INST] <<SYS>> <</SYS>> [/INST]"] * 10,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(folder, exist_ok=True)
    t.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return str(folder)


def test_llama2_is_byte_and_id_exact_against_meta_and_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = _byte_level(tmp_path / "tok")
    tok = build_tokenizer("hf", folder)
    tpl = Llama2ChatTemplate(tok)
    ours, mask = tpl.encode_dialog(CHAT)
    assert tok.decode(ours) == META_TEXT
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                              bos_token="<s>", eos_token="</s>")
    for chat, gen in ((CHAT, False), (CHAT[:4], True), (CHAT[1:2], True), ([dict(SYSTEM, content="")] + ONE, False)):
        text = hf.apply_chat_template(chat, chat_template=META_LLAMA2, tokenize=False, add_generation_prompt=gen)
        ids = tpl.encode_dialog(chat, add_generation_prompt=gen)[0]
        assert tok.decode(ids) == text, chat
        assert ids == hf(text, add_special_tokens=False)["input_ids"], chat
    assert tok.decode(tpl.encode_dialog(CHAT[:4], add_generation_prompt=True)[0]).endswith("3 plus 3? [/INST]")
    spans, cur = [], []  # token by token: trained = each answer (with Meta's space around it) and its </s>
    for t, m in zip(ours + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            spans, cur = spans + [cur], []
    assert [tok.decode(s) for s in spans] == [" 2 plus 2 is 4. </s>", " It is 6. </s>"]
    assert len(ours) == len(mask)


def test_llama2_on_sentencepiece_is_metas_reference_encoding():
    """Meta's chat_completion: per user/answer pair, encode(f"[INST] {u} [/INST] {a} ", bos=True, eos=True)."""
    tok = build_tokenizer("bundled")
    ids, mask = Llama2ChatTemplate(tok).encode_dialog(CHAT)
    sp = tok.sp
    want = ([tok.bos_id] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 plus 2? [/INST] 2 plus 2 is 4. ")
            + [tok.eos_id, tok.bos_id] + sp.encode("[INST] And 3 plus 3? [/INST] It is 6. ") + [tok.eos_id])
    assert ids == want
    prompt = [tok.bos_id] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 plus 2? [/INST]")
    assert mask[:len(prompt)] == [0] * len(prompt) and ids[:len(prompt)] == prompt
    assert tok.decode([i for i, m in zip(ids, mask) if m]).split() == "2 plus 2 is 4. It is 6.".split()


def test_llama2_role_order_is_one_line_naming_the_file_line(tmp_path):
    rows = [{"messages": ONE}, {"messages": [ONE[0], SYSTEM, ONE[1]]}]
    with pytest.raises(ConfigError, match=r"bad\.jsonl line 2: message 2 is a system message where an assistant") as e:
        build_sft_datasets(_jsonl(tmp_path / "bad.jsonl", rows), build_tokenizer("bundled"), 256,
                           split="100,0,0", chat_format="llama2")
    assert "\n" not in str(e.value) and "--chat-template llama3" in str(e.value)
    build_sft_datasets(str(tmp_path / "bad.jsonl"), build_tokenizer("bundled"), 256, split="100,0,0",
                       chat_format="llama3")  # Llama 3's format takes any order


def test_auto_follows_the_tokenizer_and_says_which(tmp_path, capsys):
    bundled = build_tokenizer("bundled")
    assert resolve_chat_format("auto", bundled)[0] == "llama3"
    assert resolve_chat_format("auto", build_tokenizer("llama2", bundled.path))[0] == "llama2"  # Llama2Tokenizer
    shipped = _byte_level(tmp_path / "shipped")
    cfg = os.path.join(shipped, "tokenizer_config.json")
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": META_LLAMA2}, open(cfg, "w"))
    data = _jsonl(tmp_path / "c.jsonl", [{"messages": ONE}])
    assert _tokens(data, build_tokenizer("hf", shipped))[1] == "llama2"
    assert "chat template: llama2 (the tokenizer's own chat template; --chat-template overrides it)" in \
        capsys.readouterr().out
    assert _tokens(data, build_tokenizer("hf", shipped), "llama3")[1] == "llama3"
    out = capsys.readouterr()
    assert "chat template: llama3 (--chat-template)" in out.out
    assert "warning: tokenizer" in out.err and "ships a chat template that is not Llama 3's" in out.err


def test_exported_llama2_template_is_metas_text():
    """With the tokenizer's own <s>/</s> as bos_token/eos_token, the HF export's template is Meta's to the character."""
    from megallama.data.tokenizer_export import llama2_chat_template
    assert llama2_chat_template(build_tokenizer("bundled"), "<s>", "</s>") == META_LLAMA2
