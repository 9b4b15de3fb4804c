"""The reliability suite reuses the app's fixtures (a tiny model, SQLite, a live app on loopback)."""

from tests.app.conftest import (  # noqa: F401
    app_settings, inference_loop, live_text_engine, password, running, services, storage,
)
