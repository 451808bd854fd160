"""Shared fixtures: real speech clips, the tiny random model, a private model cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from osum.audio import load_audio

ASSETS = Path(__file__).resolve().parent.parent / "osum" / "assets"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Models made by the tests go to a fresh cache, never the user's."""
    os.environ["OSUM_HOME"] = str(tmp_path_factory.mktemp("osum_home"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def male_clip() -> np.ndarray:
    """CMU ARCTIC a0007, real male speech, 4.0 s: 'And you always want to see it in the superlative degree.'"""
    return load_audio(ASSETS / "arctic_a0007.wav")


@pytest.fixture(scope="session")
def female_clip() -> np.ndarray:
    """CMU ARCTIC a0009, real female speech, 3.1 s: 'He turned sharply, and faced Gregson across the table.'"""
    return load_audio(ASSETS / "arctic_a0009.wav")


@pytest.fixture(scope="session")
def tiny_model():  # type: ignore[no-untyped-def]
    from osum.loading import load_model

    return load_model("tiny")
