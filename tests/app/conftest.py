"""A chat service on SQLite with a tiny engine (byte tokenizer), for service and UI tests."""

from __future__ import annotations

import pytest
import torch

from app.service import ChatService
from app.settings import AppSettings
from storage import Storage, upgrade
from tests.storage.helpers import FAST, PASSWORD


@pytest.fixture
def app_settings(tmp_path) -> AppSettings:
    return AppSettings(data_dir=tmp_path / "data", compress_every=2, compress_idle_seconds=0,
                       max_new_tokens=6, recent_token_budget=400)


@pytest.fixture
def live_text_engine(make_text_engine):
    """B random, so that adapters change answers (an untrained generator would hide mistakes)."""
    engine = make_text_engine()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in engine.adapted.values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.5)
    engine.generator_id = engine.compute_generator_id()
    return engine


@pytest.fixture
def storage(tmp_path, app_settings):
    url = f"sqlite:///{tmp_path / 'memchat.db'}"
    upgrade(url, settings=FAST)
    with Storage(url, app_settings.data_dir, FAST) as store:
        yield store


@pytest.fixture
def service(storage, live_text_engine, app_settings) -> ChatService:
    return ChatService(storage, live_text_engine, app_settings)


@pytest.fixture
def password() -> str:
    return PASSWORD
