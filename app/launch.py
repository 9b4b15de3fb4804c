"""Starting the whole app: storage (migrated), engine, service, background worker, web UI."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gradio as gr

from adapter_core import GenerativeAdapterModel
from adapter_core.engine import load_engine
from storage import Storage, StorageSettings

from .service import ChatService
from .settings import AppSettings
from .ui import build_ui
from .worker import CompressionWorker

log = logging.getLogger(__name__)


@dataclass
class RunningApp:
    service: ChatService
    worker: CompressionWorker
    ui: gr.Blocks
    url: str

    def close(self) -> None:
        self.ui.close()
        self.worker.stop()
        self.service.storage.close()


def start(settings: AppSettings, engine: GenerativeAdapterModel | None = None,
          storage_settings: StorageSettings | None = None, block: bool = True) -> RunningApp:
    """Everything up and serving; with block=False it returns once the server listens."""
    steps = 4
    log.info("[1/%d] database at %s", steps, settings.database_url or settings.data_dir / "memchat.db")
    storage = Storage(settings.database_url, settings.data_dir, storage_settings)
    storage.migrate()
    if engine is None:
        log.info("[2/%d] loading the language model and its generator (the first start converts the "
                 "default model, about half a minute; later starts use the cache)", steps)
        engine = load_engine(settings.model, settings.checkpoint, device=settings.device,
                             cache_dir=settings.data_dir / "model-cache",
                             int4_decode=None if settings.int4_decode else False)
    engine.eval()
    log.info("[2/%d] model %s, generator %s", steps, engine.base_model_id, engine.generator_id)
    service = ChatService(storage, engine, settings)
    if settings.admin_username and settings.admin_password:
        service.ensure_admin(settings.admin_username, settings.admin_password)
        log.info("admin account: %s", settings.admin_username)
    elif not any(u.is_admin for u in storage.list_users()):
        log.warning("no admin account: pass --admin-username and --admin-password to create one")
    log.info("[3/%d] background compression: every %d messages or after %.0f idle seconds", steps,
             settings.compress_every, settings.compress_idle_seconds)
    worker = CompressionWorker(service, storage, settings.worker_poll_seconds)
    worker.start()
    ui = build_ui(service)
    ui.queue(default_concurrency_limit=4)
    _, url, _ = ui.launch(server_name=settings.host, server_port=settings.port, prevent_thread_lock=True,
                          quiet=True, show_error=True)
    log.info("[4/%d] open %s in a browser", steps, url)
    running = RunningApp(service, worker, ui, url)
    if block:
        try:
            ui.block_thread()
        finally:
            running.close()
    return running
