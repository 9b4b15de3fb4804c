"""The reliability suite reuses the app's fixtures (a tiny model, SQLite, a live app on loopback)."""

from tests.app.conftest import app_settings, live_text_engine, password, running, service, storage  # noqa: F401
