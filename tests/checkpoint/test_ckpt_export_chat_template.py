"""megallama-to-hf of a chat fine-tuned run writes a ``chat_template``: HF's ``apply_chat_template`` on the exported
folder gives, token for token, the ids ``sft_dataset.ChatTemplate`` trained on and ``tools/generate.py --chat``
prompts with (the bundled sentencepiece tokenizer with text markers, a Llama 3 style tokenizer.json with Llama 3's
special tokens); a source tokenizer's template is kept only if it renders the same; a base run gets none."""
import json
import os
import sys

import pytest

from ckpt_helpers import corpus

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint as conv  # noqa: E402

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
TURNS = [{"role": "user", "content": "What is 7 plus 5?"}, {"role": "assistant", "content": "7 plus 5 is 12."},
         {"role": "user", "content": "  And the capital of France?\n"}]
CHATS = [
    [SYSTEM, {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}],
    [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 4."},
     {"role": "user", "content": "And 3 plus 3?"}, {"role": "assistant", "content": "It is 6."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]
TINY = ["--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
        "--lr", "1e-3", "--device", "cpu", "--no-progress-bar", "--no-fused-kernels", "--split", "100,0,0"]
# a Llama 3 Instruct template spelled otherwise than Meta's (and megallama's): same rendering, other text
EQUIVALENT = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' ~ m.role ~ '<|end_header_id|>\\n\\n' "
              "~ m.content | trim ~ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template
META = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _chat_jsonl(path):
    with open(path, "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": CHATS[i % len(CHATS)]}) + "\n")
    return str(path)


def _llama3_style_tokenizer(folder, chat_template=None):
    """A 400-token byte-level BPE tokenizer.json with Llama 3's pre-tokenizer and its first ten special tokens
    after the base vocabulary, as Meta's HF release lays them out (bos prepended by the post-processor)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from megallama.data.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    text = [m["content"] for c in CHATS + [[SYSTEM] + TURNS] for m in c] * 4
    t.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens(LLAMA3_SPECIAL_TOKENS[:10])
    t.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", t.token_to_id("<|begin_of_text|>"))])
    os.makedirs(folder, exist_ok=True)
    t.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
           "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        cfg["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(folder)


def _finetune(tmp_path, *flags):
    import finetune_llama
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    run = str(tmp_path / "sft")
    out = pretrain(finetune_llama.prepare_finetune_args(parse_args(
        TINY + ["--data-path", _chat_jsonl(tmp_path / "chat.jsonl"), "--save", run, *flags], world_size=1)))
    assert sorted(out["losses"]) == [1, 2]
    return run


def _export(run, out):
    notes = []
    conv.megallama_to_hf(run, str(out), notes=notes)
    return notes


def _assert_hf_renders_as_megallama(run, hf_dir):
    """HF's apply_chat_template ids == ChatTemplate.encode_dialog's (what SFT trained on and generate.py --chat
    prompts with), with and without a system message, with and without the generation prompt."""
    from megallama.checkpointing.full import saved_args
    from megallama.data.sft_dataset import ChatTemplate
    from megallama.data.tokenizer_export import run_tokenizer
    ours = ChatTemplate(run_tokenizer(saved_args(run)))
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for messages in ([SYSTEM] + TURNS, TURNS, TURNS[:1], [SYSTEM] + TURNS[:2]):
        for gen in (True, False):
            want = ours.encode_dialog(messages, add_generation_prompt=gen)[0]
            got = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert list(got) == want, (messages, gen)
    return ours


def test_bundled_tokenizer_chat_export_renders_as_trained(tmp_path):
    """The bundled sentencepiece tokenizer: Llama 3's layout with <s>/</s> and the header markers as text, each
    piece encoded apart (its dummy prefix), while the export's bos_token is the eod generate.py starts a plain
    prompt with (before: no chat_template, so apply_chat_template raised)."""
    run = _finetune(tmp_path, "--vocab-size", "8192")
    notes = _export(run, tmp_path / "hf")
    assert any(n.startswith("chat_template: Llama 3's layout with text markers") for n in notes), notes
    ours = _assert_hf_renders_as_megallama(run, tmp_path / "hf")
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["eos_token_id"] == ours.eot  # the end of turn is the eos: nothing to add


def test_llama3_style_tokenizer_chat_export_renders_as_trained(tmp_path):
    """A Llama 3 style tokenizer.json, run trained from scratch (the export's bos_token is the eod): the template
    begins with <|begin_of_text|> as training did, uses Llama 3's special tokens, and config.json lists
    <|eot_id|> among the eos ids so HF generate and vLLM stop at the end of the turn."""
    tok_dir = _llama3_style_tokenizer(tmp_path / "tok")
    run = _finetune(tmp_path, "--tokenizer-type", "hf", "--tokenizer-model", tok_dir)
    notes = _export(run, tmp_path / "hf")
    assert any(n.startswith("chat_template: Llama 3's, as the run trained on") for n in notes), notes
    ours = _assert_hf_renders_as_megallama(run, tmp_path / "hf")
    assert ours.native
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["eos_token_id"] == [ours.tokenizer.eos_id, ours.eot]


def test_source_chat_template_kept_only_if_it_renders_the_same(tmp_path):
    """Fine-tuned from an HF folder: a ChatML template there renders another format, so the export writes
    megallama's (and says so); an equivalent Llama 3 template is kept as the source wrote it."""
    torch = pytest.importorskip("torch")
    tok_dir = _llama3_style_tokenizer(tmp_path / "base", chat_template=CHATML)
    vocab = tokenizers.Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4)).save_pretrained(tok_dir)
    run = _finetune(tmp_path, "--pretrained-checkpoint", tok_dir, "--use-checkpoint-args")
    notes = _export(run, tmp_path / "hf")
    assert any("replacing the source tokenizer's, which renders another format" in n for n in notes), notes
    assert json.load(open(tmp_path / "hf" / "tokenizer_config.json"))["chat_template"] != CHATML
    _assert_hf_renders_as_megallama(run, tmp_path / "hf")
    # an imported Llama 3 keeps its bos: the written template is Meta's, to the character
    assert json.load(open(tmp_path / "hf" / "tokenizer_config.json"))["chat_template"] == META

    # a source whose template renders the same: fine-tuned from it (the conversion copies the tokenizer into the
    # checkpoint, so the source folder is read when the run starts, not at export)
    second = tmp_path / "second"
    second.mkdir()
    tok_dir2 = _llama3_style_tokenizer(second / "base", chat_template=EQUIVALENT)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4)).save_pretrained(tok_dir2)
    run = _finetune(second, "--pretrained-checkpoint", tok_dir2, "--use-checkpoint-args")
    notes = _export(run, tmp_path / "hf2")
    assert "chat_template: the source tokenizer's, which renders what the run trained on" in notes, notes
    assert json.load(open(tmp_path / "hf2" / "tokenizer_config.json"))["chat_template"] == EQUIVALENT
    _assert_hf_renders_as_megallama(run, tmp_path / "hf2")


def test_base_run_export_has_no_chat_template(tmp_path):
    """A pretraining run never saw the chat format: its export ships no chat_template (as Meta's base models)."""
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    run = str(tmp_path / "run")
    pretrain(parse_args(TINY + ["--vocab-size", "8192", "--data-path", corpus(tmp_path / "c.jsonl"),
                                "--data-cache-dir", str(tmp_path / "cache"), "--save", run], world_size=1))
    notes = _export(run, tmp_path / "hf")
    assert not any(n.startswith("chat_template") for n in notes), notes
    assert "chat_template" not in json.load(open(tmp_path / "hf" / "tokenizer_config.json"))
