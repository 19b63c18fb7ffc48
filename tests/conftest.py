import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest


@pytest.fixture(scope="session")
def builtin_model():
    from schedsearch.runtime.models import load_model

    return load_model("builtin:mnist-dit")
