"""An HF tokenizer folder read as transformers reads it (a saved truncation or padding is not applied; a broken
tokenizer_config.json is one error; its eos is part of the data's identity), and ``--dataloader-type cyclic`` over a
blend in an order that does not depend on the run's length."""
import json
import types

import pytest

from megallama.data.blended_dataset import build_blended_datasets
from megallama.data.cyclic import apply_dataloader_type
from megallama.data.gpt_dataset import build_pretraining_datasets
from megallama.data.preprocess import preprocess_jsonl
from megallama.data.tokenizer import build_tokenizer
from megallama.errors import ConfigError

WORDS = "the cat sat on a mat and then ran far away into woods with dogs".split()


def _hf_folder(tmp_path, truncate=False):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors, trainers
    t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if truncate:  # left in many Hub files
        t.enable_truncation(max_length=8)
        t.enable_padding(length=8, pad_id=3, pad_token="<pad>")
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    t.save(str(folder / "tokenizer.json"))
    return folder


def _jsonl(path, n=30, seed=0):
    import random
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rnd.choices(WORDS, k=rnd.randint(5, 40)))}) + "\n")
    return str(path)


def test_a_saved_truncation_and_padding_are_not_applied(tmp_path):
    tok = build_tokenizer("hf", str(_hf_folder(tmp_path, truncate=True)))
    long = " ".join(WORDS * 3)
    ids = tok.encode(long)
    assert len(ids) > 8 and 3 not in ids
    short = tok.encode_batch(["the cat"], add_special_tokens=True)[0]
    assert short[0] == 1 and 3 not in short and len(short) < 8


@pytest.mark.parametrize("text,says", [('{"eos_token": "</s>",', "is not JSON"), ("[1, 2]", "is not a JSON object")])
def test_a_broken_tokenizer_config_is_one_error(tmp_path, text, says):
    folder = _hf_folder(tmp_path)
    (folder / "tokenizer_config.json").write_text(text)
    with pytest.raises(ConfigError, match=f"tokenizer_config.json {says}.*fix or remove it"):
        build_tokenizer("hf", str(folder))


def test_a_changed_eos_is_other_data(tmp_path):
    """Llama 3 base and Instruct share a tokenizer.json, not an eos: the jsonl cache tokenizes again, and
    preprocessed data ending its documents with the other eos is refused."""
    folder, data = _hf_folder(tmp_path), _jsonl(tmp_path / "d.jsonl")
    ends, prefixes = [], []
    for eos in ("</s>", "<pad>"):
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
        tok = build_tokenizer("hf", str(folder))
        train, _ = build_pretraining_datasets(data, tok, 16, 1, "100,0,0", str(tmp_path / "cache"), progress=False)
        ends.append(int(train.indexed[0][-1]))
        prefixes.append(train.indexed.prefix)
    assert ends == [2, 3] and prefixes[0] != prefixes[1]
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    prefix = preprocess_jsonl(data, str(tmp_path / "pre"), build_tokenizer("hf", str(folder)), progress=False)["text"]
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    with pytest.raises(ConfigError, match="ends its documents with token 2 but this run's tokenizer ends text with 3"):
        build_pretraining_datasets(prefix, build_tokenizer("hf", str(folder)), 16, 1, "100,0,0", None,
                                   progress=False)


def test_cyclic_order_of_a_blend_does_not_depend_on_the_run_length(tmp_path):
    tok = build_tokenizer("bundled")
    blend = [(0.5, _jsonl(tmp_path / "a.jsonl", 60, 1)), (0.5, _jsonl(tmp_path / "b.jsonl", 60, 2))]

    def run(train_iters, gbs=4):
        args = types.SimpleNamespace(dataloader_type="cyclic", seed=1234, train_iters=train_iters,
                                     global_batch_size=gbs)
        train, _ = build_blended_datasets(blend, tok, 16, 1234, "100,0,0", str(tmp_path / "cache"),
                                          train_iters * gbs)
        return apply_dataloader_type(args, train)

    short, long = run(10), run(20)
    ids = [tuple(long[i]["input_ids"].tolist()) for i in range(80)]
    assert [tuple(short[i]["input_ids"].tolist()) for i in range(40)] == ids[:40]
    assert len(set(ids)) == 80  # a resume at 20 with --train-iters 20 reads 80 samples, none twice
