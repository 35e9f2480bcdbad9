"""Shared fixtures: tiny random wav2vec2 / HuBERT / WavLM folders, no network.

Every model the tests load is a local folder written by
``speechbrain_spg.architectures.save_random_model``; nothing is downloaded.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from speechbrain_spg.architectures import (  # noqa: E402
    TINY_OVERRIDES,
    build_config,
    save_random_model,
)

MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory):
    """Model type -> local folder of a tiny randomly initialised model."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        model_type: save_random_model(
            build_config(model_type, **TINY_OVERRIDES), root / model_type
        )
        for model_type in MODEL_TYPES
    }


@pytest.fixture(scope="session")
def wav2vec2_source(tiny_sources):
    """Folder of the tiny wav2vec2 model."""
    return tiny_sources["wav2vec2"]


@pytest.fixture(scope="session")
def hubert_source(tiny_sources):
    """Folder of the tiny HuBERT model."""
    return tiny_sources["hubert"]


@pytest.fixture(scope="session")
def wavlm_source(tiny_sources):
    """Folder of the tiny WavLM model."""
    return tiny_sources["wavlm"]
