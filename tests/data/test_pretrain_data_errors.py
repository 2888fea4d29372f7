"""Pretraining on a jsonl without a 'text' key: the error names pretraining's fixes (chat data belongs to
finetune_llama.py), not tools/preprocess_data.py's --json-keys, which pretrain_llama.py lacks."""
import json

import pytest

from megallama.data.gpt_dataset import build_pretraining_datasets
from megallama.data.preprocess import preprocess_jsonl
from megallama.errors import ConfigError


def _lines(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def test_pretraining_on_chat_data_points_to_finetuning(tmp_path, bundled_tokenizer):
    chat = _lines(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ConfigError, match="line 1: no 'text' key \\(keys: messages\\): this is chat data; fine-tune "
                                          "on it with finetune_llama.py") as e:
        build_pretraining_datasets(chat, bundled_tokenizer, 16, 1, cache_dir=str(tmp_path / "cache"))
    assert "--json-keys" not in str(e.value).split("tools/preprocess_data.py")[0]
    other = _lines(tmp_path / "body.jsonl", [{"body": "some words"}])
    with pytest.raises(ConfigError, match="no 'text' key \\(keys: body\\); pretraining reads a 'text' string") as e:
        build_pretraining_datasets(other, bundled_tokenizer, 16, 1, cache_dir=str(tmp_path / "cache"))
    assert "pass --json-keys" not in str(e.value)
    # the preprocess tool, which has --json-keys, still suggests it
    with pytest.raises(ConfigError, match="no 'text' key \\(keys: body\\); pass --json-keys"):
        preprocess_jsonl(other, str(tmp_path / "out"), bundled_tokenizer, progress=False)
