"""Fixtures the context-parallel test modules share."""
import pytest

import cp_harness as H


@pytest.fixture(scope="module")
def references():
    """The one-process oracle's loss and gradients, without and with packed documents."""
    return {docs: H.reference(docs) for docs in (False, True)}
