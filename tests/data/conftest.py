"""Fixtures of the data tests."""
import pytest

from megallama.data.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def bundled_tokenizer():
    return build_tokenizer("bundled")
