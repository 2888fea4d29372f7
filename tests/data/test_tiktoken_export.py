"""A Llama 3 tiktoken ranks file exports as an HF fast tokenizer (tokenizer.json + configs) that gives megallama's
ids: same ids on prose, whitespace runs, digits, contractions, accents/CJK/emoji and special tokens, decode round
trips, the start token megallama prompts with, and a chat template rendering what SFT trained on (before: no
tokenizer was written for a tiktoken run)."""
import base64
import gzip
import json
import os
import sys

import pytest

from megallama.data import get_bundled_corpus_path
from megallama.data.tokenizer import LLAMA3_PATTERN, build_tokenizer
from megallama.errors import ConfigError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was the best of times.",
    "Hello   world\n\n\n  x\t\ty \r\n\r\nend  ", "   leading spaces", "trailing spaces    ", "\n\n", " ",
    "a\u00a0b",
    "12345678 and 1,000,000 and 3.14159 and 2024-06-01", "I'm sure you're right; they'll say it's WE'VE He'D",
    "naïve café — déjà vu, Ünïcödé", "日本語のテキストと中文", "emoji 🙂👍🏽🇫🇷 and ⚙️", "x" * 300 + " y",
    "def f(x):\n    return x + 1\n\n\tif x:\n\t\tpass", "hello world, the thing is in the ing the end",
]
SPECIAL_TEXTS = ["<|begin_of_text|>Hi<|eot_id|>", "a <|start_header_id|>user<|end_header_id|>\n\nb",
                 "end<|end_of_text|> <|reserved_special_token_100|>x"]
CHAT = [{"role": "user", "content": "What is 7 plus 5?"}, {"role": "assistant", "content": "7 plus 5 is 12."}]


def _corpus(n, skip=0):
    with gzip.open(get_bundled_corpus_path(), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(skip + n), f)][skip:]


@pytest.fixture(scope="module")
def ranks_file(tmp_path_factory):
    """A tiktoken ranks file as Meta lays Llama 3's out: the 256 bytes, then ~650 merges learned on the bundled
    corpus with Llama 3's pre-tokenizer (rank = merge order), then a few tokens appended after the merges (as Meta
    added tokens to cl100k's), some of which no merge reaches."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from megallama.data.tiktoken_to_hf import bytes_to_unicode
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.train_from_iterator(_corpus(200), trainers.BpeTrainer(
        vocab_size=900, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    byte = {c: b for b, c in bytes_to_unicode().items()}
    merges = json.loads(t.to_str())["model"]["merges"]
    ranks = [bytes([i]) for i in range(256)] + [bytes(byte[c] for c in a + b) for a, b in merges]
    ranks += [s.encode() for s in (" déjà", "日本", "🙂", "    ", " hello world", "ing the", "123")
              if s.encode() not in ranks]
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {r}\n" for r, tok in enumerate(ranks)))
    return str(path)


def _export(ranks_file, out, **saved):
    from megallama.data.tokenizer_export import export_tokenizer
    os.makedirs(out, exist_ok=True)
    saved = dict({"tokenizer_type": "llama3", "tokenizer_model": ranks_file}, **saved)
    return saved, export_tokenizer(saved, str(out))


def test_exported_tiktoken_tokenizer_gives_megallama_ids(ranks_file, tmp_path):
    tok = build_tokenizer("llama3", ranks_file)
    _, (bos, eos, said) = _export(ranks_file, tmp_path / "hf")
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json"), said  # the old export wrote none
    assert (bos, eos) == (tok.eod, tok.eos_id) and "<|end_of_text|>" in said
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eos_id
    for text in TEXTS + _corpus(150, skip=200):
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:80]
        # a megallama-trained run's documents follow an eod: HF starts a text with it, as tools/generate.py does
        assert hf(text)["input_ids"] == [tok.eod] + ids
        assert hf.decode(ids) == text and hf.decode([tok.eod] + ids, skip_special_tokens=True) == text
    ids = hf("12345678", add_special_tokens=False)["input_ids"]  # digits go in groups of up to 3, as Llama 3's do
    ends = [len(hf.decode(ids[:k + 1])) for k in range(len(ids))]
    assert ids == tok.encode("12345678") and {3, 6, 8} <= set(ends) and hf.decode(ids[:1]) == "123"
    for text in SPECIAL_TEXTS:  # HF's tokenizer reads special-token text as the control token (Meta's does too)
        ids = tok.model.encode(text, allowed_special="all")
        assert hf(text, add_special_tokens=False)["input_ids"] == ids and hf.decode(ids) == text


def test_imported_model_keeps_begin_of_text(ranks_file, tmp_path):
    """A run fine-tuned from an imported Llama 3 prompts with <|begin_of_text|>: the export starts texts with it."""
    tok = build_tokenizer("llama3", ranks_file)
    _, (bos, _, _) = _export(ranks_file, tmp_path / "hf", inherited_prompt_prefix="bos")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert bos == tok.bos_id == hf.bos_token_id
    assert hf("the end")["input_ids"] == [tok.bos_id] + tok.encode("the end")


def test_exported_chat_template_gives_megallama_chat_ids(ranks_file, tmp_path):
    from megallama.data.sft_dataset import ChatTemplate
    from megallama.data.tokenizer_export import export_chat_template
    tok = build_tokenizer("llama3", ranks_file)
    saved, _ = _export(ranks_file, tmp_path / "hf", chat_template=True, chat_format="llama3")
    eot, said = export_chat_template(saved, str(tmp_path / "hf"))
    assert eot == tok.eot_id and said.startswith("chat_template: Llama 3's") and "warning" not in said, said
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = ChatTemplate(tok)
    for gen, messages in ((False, CHAT), (True, CHAT + [{"role": "user", "content": " And 3 plus 3?\n"}])):
        want = ours.encode_dialog(messages, add_generation_prompt=gen)[0]
        got = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert list(got) == want and want[0] == tok.bos_id


def test_missing_tokenizers_package_is_one_config_error(ranks_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ConfigError, match="needs the tokenizers package"):
        _export(ranks_file, tmp_path / "hf")


def test_megallama_to_hf_of_a_tiktoken_chat_run(ranks_file, tmp_path):
    """The whole path: fine-tune a tiny model on chats with --tokenizer-type llama3, megallama-to-hf, then HF's
    tokenizer and chat template on the exported folder give the run's ids."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint as conv
    import finetune_llama
    from megallama.arguments import parse_args
    from megallama.data.sft_dataset import ChatTemplate
    from megallama.training import pretrain
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": CHAT if i % 2 else CHAT[:1] + [{"role": "assistant", "content": "12"}]})
                    + "\n")
    run = str(tmp_path / "sft")
    pretrain(finetune_llama.prepare_finetune_args(parse_args(
        ["--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
         "--lr", "1e-3", "--device", "cpu", "--no-progress-bar", "--no-fused-kernels", "--split", "100,0,0",
         "--tokenizer-type", "llama3", "--tokenizer-model", ranks_file, "--data-path", str(tmp_path / "chat.jsonl"),
         "--save", run], world_size=1)))
    notes = []
    conv.megallama_to_hf(run, str(tmp_path / "hf"), notes=notes)
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json")
    assert any(n.startswith("tokenizer:") and "as a byte-level BPE tokenizer.json" in n for n in notes), notes
    assert any(n.startswith("chat_template: Llama 3's") for n in notes), notes
    tok = build_tokenizer("llama3", ranks_file)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf("7 plus 5")["input_ids"] == [tok.eod] + tok.encode("7 plus 5")
    want = ChatTemplate(tok).encode_dialog(CHAT[:1], add_generation_prompt=True)[0]
    assert list(hf.apply_chat_template(CHAT[:1], tokenize=True, add_generation_prompt=True, return_dict=False)) == want
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["bos_token_id"] == tok.eod and config["eos_token_id"] == [tok.eos_id, tok.eot_id]
