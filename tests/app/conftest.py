"""The app's services on SQLite around a tiny engine (byte tokenizer) and its inference loop,
for service and UI tests."""

from __future__ import annotations

import pytest

from adapter_core.serving.scheduler import InferenceLoop
from app.launch import start
from app.services import Services
from app.settings import AppSettings
from storage import Storage, upgrade
from tests.app.helpers import free_port
from tests.conftest import tiny_text_engine
from tests.storage.helpers import FAST, PASSWORD


@pytest.fixture
def app_settings(tmp_path) -> AppSettings:
    # rate limits out of the way: the tests that check them set their own; the generator compresses
    # (its single pass is the cheaper one), except in the tests of the fine-tuning compressor
    return AppSettings(data_dir=tmp_path / "data", compressor="generator", compress_every=2, compress_idle_seconds=0,
                       max_new_tokens=6, recent_token_budget=400, messages_per_user="1000/minute",
                       actions_per_user="1000/minute", signups_per_address="1000/hour")


@pytest.fixture
def live_text_engine(tiny_tokenizer):
    return tiny_text_engine(tiny_tokenizer, live=True)


@pytest.fixture
def storage(tmp_path, app_settings):
    url = f"sqlite:///{tmp_path / 'memchat.db'}"
    upgrade(url, settings=FAST)
    with Storage(url, app_settings.data_dir, FAST) as store:
        yield store


@pytest.fixture
def inference_loop(live_text_engine):
    with InferenceLoop(live_text_engine) as loop:
        yield loop


@pytest.fixture
def services(storage, live_text_engine, inference_loop, app_settings) -> Services:
    services = Services.create(storage, live_text_engine, inference_loop, app_settings)
    yield services
    services.downloads.close()


@pytest.fixture
def password() -> str:
    return PASSWORD


@pytest.fixture
def running(app_settings, live_text_engine, password):
    """The whole app on a free loopback port, with an admin 'root' and a fast worker."""
    app_settings.port = free_port()
    app_settings.admin_username, app_settings.admin_password = "root", password
    app_settings.worker_poll_seconds = 0.1
    running = start(app_settings, live_text_engine, FAST, block=False)
    yield running
    running.close()
