"""SFT from a fine-tuning user's pass: the Llama 3 template is byte- and id-exact against HF's
``apply_chat_template`` with the loss on exactly the answers; an empty assistant answer is skipped with a count
(it was trained on, teaching the model to end its turn at once); a tokenizer that ships another chat format is
warned about; a fine-tuned chat model greedy-decodes its answer deterministically and stops at <|eot_id|>."""
import json
import os

import pytest

from megallama.data.sft_dataset import ChatTemplate, build_sft_datasets, read_chat_jsonl
from megallama.data.tokenizer import LLAMA3_SPECIAL_TOKENS, build_tokenizer
from megallama.errors import ConfigError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "  2 plus 2 is 4.\n"}, {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "It is 6."}]
# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + " \
                  "' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
# Llama 3's pre-tokenizer pattern
PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
       r"\s+(?!\S)|\s+")


def _llama3_like(folder, specials=LLAMA3_SPECIAL_TOKENS[:10], config=None):
    """A small byte-level BPE tokenizer.json with Llama 3's pre-tokenizer and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PAT), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    texts = [m["content"] for m in CHAT] * 20 + ["user assistant system\n\n"] * 10
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(folder, exist_ok=True)
    t.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config or {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, f)
    return str(folder)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_llama3_template_is_byte_and_id_exact_against_hf_apply_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = _llama3_like(tmp_path / "tok")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                              bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    hf.chat_template = LLAMA3_TEMPLATE
    tok = build_tokenizer("hf", folder)
    tpl = ChatTemplate(tok)
    assert tpl.native
    for chat, gen in ((CHAT, False), (CHAT[:2], True)):
        ours, mask = tpl.encode_dialog(chat, add_generation_prompt=gen)
        text = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert tok.decode(ours) == text
        assert ours == hf(text, add_special_tokens=False)["input_ids"]
    # token by token: the trained tokens are exactly each answer (trimmed) followed by its <|eot_id|>
    ours, mask = tpl.encode_dialog(CHAT)
    spans, cur = [], []
    for t, m in zip(ours + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            spans, cur = spans + [cur], []
    assert [tok.decode(s) for s in spans] == ["2 plus 2 is 4.<|eot_id|>", "It is 6.<|eot_id|>"]
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")


def test_empty_assistant_answer_is_skipped_with_a_count(tmp_path, capsys):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  \n"}]}
    later = {"messages": ok["messages"] + [{"role": "user", "content": "more"}, {"role": "assistant", "content": ""}]}
    path = _jsonl(tmp_path / "c.jsonl", [ok, empty, ok, later])
    convs = read_chat_jsonl(path)
    assert "skipped 2 conversations with an empty assistant answer (first at line 2)" in capsys.readouterr().err
    assert convs == [ok["messages"], ok["messages"]]
    with pytest.raises(ConfigError) as e:
        read_chat_jsonl(_jsonl(tmp_path / "e.jsonl", [empty, later]))
    assert "\n" not in str(e.value) and "every conversation" in str(e.value) and "lines 1...2" in str(e.value)


def test_a_tokenizer_shipping_another_chat_format_is_warned_about(tmp_path, capsys):
    bundled_rows = [{"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                                  {"role": "assistant", "content": "2 plus 2 is 4."}]}] * 4
    data = _jsonl(tmp_path / "c.jsonl", bundled_rows)
    llama2 = _llama3_like(tmp_path / "l2", ["<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>",
                                                              "chat_template": LLAMA2_TEMPLATE})
    build_sft_datasets(data, build_tokenizer("hf", llama2), 256, split="100,0,0", chat_format="llama3")
    assert "ships a chat template that is not Llama 3's" in capsys.readouterr().err  # auto would pick llama2
    llama3 = _llama3_like(tmp_path / "l3", config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                                    "chat_template": LLAMA3_TEMPLATE})
    build_sft_datasets(data, build_tokenizer("hf", llama3), 256, split="100,0,0")
    assert "warning:" not in capsys.readouterr().err


def test_finetuned_chat_model_decodes_its_answer_and_stops_at_eot(tmp_path, one_thread):
    """Full SFT of one conversation until memorised, then greedy chat decoding through the public API: the answer,
    nothing after its <|eot_id|>, the same text twice and in a batch."""
    import finetune_llama
    import megallama
    from megallama.arguments import parse_args
    from megallama.generation import SamplingConfig
    from megallama.mpu import parallel_state as ps
    from megallama.training import pretrain
    folder = _llama3_like(tmp_path / "tok")
    data = _jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[1:3]}] * 8)
    run = str(tmp_path / "sft")
    pretrain(finetune_llama.prepare_finetune_args(parse_args(
        ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--device", "cpu", "--no-progress-bar",
         "--tokenizer-type", "hf", "--tokenizer-model", folder, "--data-path", data, "--split", "100,0,0",
         "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "60",
         "--lr", "1e-2", "--save", run, "--save-interval", "60", "--log-interval", "60"], world_size=1)))
    ps.destroy_model_parallel()
    loaded = megallama.load_for_generation(run, device="cpu")
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    first = megallama.generate_text(loaded, ["What is 2 plus 2?"], cfg, chat=True)
    assert first == ["2 plus 2 is 4."]
    assert megallama.generate_text(loaded, ["What is 2 plus 2?", "And 3 plus 3?"], cfg, chat=True)[0] == first[0]
