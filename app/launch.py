"""Starting the whole app: storage (migrated), engine, inference loop, services, background
worker, web server.

The port answers at once: a loading page (app/loading.py) shows the start-up's progress until the
model is loaded, then hands the port to the real server and reloads itself into the app.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, replace

import gradio as gr

from adapter_core import GenerativeAdapterModel
from adapter_core.engine import load_engine
from adapter_core.serving.lean_decoder import lean_decoder
from adapter_core.serving.scheduler import InferenceLoop
from storage import Storage, StorageSettings

from .loading import APP_STEPS, LoadingServer, StartupProgress
from .server import create_app
from .services import Services
from .settings import AppSettings, redact_url
from .ui import build_ui
from .webserver import WebServer
from .worker import CompressionWorker

log = logging.getLogger(__name__)

FAILURE_SHOWN_S = 5.0
"""How long the loading page shows that start-up failed before the process exits."""


@dataclass
class RunningApp:
    services: Services
    loop: InferenceLoop
    worker: CompressionWorker | None
    """None in a web replica (--role web): workers elsewhere compress."""
    ui: gr.Blocks
    server: WebServer

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        try:
            self.server.app.state.streams.end()  # the page's open streams end rather than being cut
            self.server.stop()
        finally:
            _stop(self.services, self.loop, self.worker)


@dataclass
class RunningWorker:
    """A compression worker alone (--role worker): no page, no port."""

    services: Services
    loop: InferenceLoop
    worker: CompressionWorker

    def close(self) -> None:
        _stop(self.services, self.loop, self.worker)


def _stop(services: Services, loop: InferenceLoop, worker: CompressionWorker | None) -> None:
    if worker is not None:
        worker.stop()
    loop.stop()  # after the worker: a compression it runs needs the loop to the end
    services.downloads.close()
    services.storage.close()


def start(settings: AppSettings, engine: GenerativeAdapterModel | None = None,
          storage_settings: StorageSettings | None = None, block: bool = True,
          loading: LoadingServer | None = None) -> RunningApp:
    """Everything up and serving; with block=False it returns once the server listens.

    loading: the loading page, already serving (app.py starts it before the heavy imports);
    None: one is started here."""
    if block and threading.current_thread() is threading.main_thread():
        # SIGTERM (containers, systemd, kill) stops the app as Ctrl+C does: replies in flight end
        # with the API's "server is stopping" error, work is saved, the port is freed
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    if loading is None:
        loading = LoadingServer(StartupProgress(APP_STEPS, settings.data_dir / "startup.json"), settings.host,
                                settings.port)
        loading.start()
        log.info("starting; %s shows the progress", loading.url)
    progress = loading.progress
    try:
        services, loop, worker, ui, app = _prepare(settings, engine, storage_settings, progress, block)
    except BaseException:
        # the page says so for a moment; why is for the server's log (it may name paths or hosts)
        progress.fail("memchat could not start; the server's log says why")
        if block:
            time.sleep(FAILURE_SHOWN_S)
        loading.stop()
        raise
    loading.stop()
    # Client addresses key the rate limits and download links: X-Forwarded-For is believed only
    # from the proxies named (uvicorn would otherwise believe any client on 127.0.0.1).
    server = WebServer(app, settings.host, settings.port, log_level="warning", lifespan="on",
                       proxy_headers=settings.forwarded_allow_ips is not None,
                       forwarded_allow_ips=settings.forwarded_allow_ips)
    server.start()
    progress.ready()
    log.info("ready: open %s in a browser", server.url)
    running = RunningApp(services, loop, worker, ui, server)
    if block:
        threading.Thread(target=lambda: (server.wait(), loop.stop()), name="server-watch", daemon=True).start()
        _run_until_stopped(loop, running)
    return running


def start_worker(settings: AppSettings, engine: GenerativeAdapterModel | None = None,
                 storage_settings: StorageSettings | None = None, block: bool = True) -> RunningWorker:
    """A compression worker (--role worker): claims compression jobs from the shared database and
    runs them until stopped (SIGTERM or Ctrl+C: the job it runs is given back, its run counted as a
    failed attempt and retried; a killed process's job is taken over by another worker once its
    lease runs out). With block=False it returns once it runs."""
    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    services, loop = _services(settings, engine, storage_settings, StartupProgress(APP_STEPS), block)
    worker = CompressionWorker(services.memory, settings.worker_poll_seconds, alone=False)
    worker.start()
    log.info("compression worker ready (compressor %s)", settings.compressor)
    running = RunningWorker(services, loop, worker)
    if block:
        _run_until_stopped(loop, running)
    return running


def _run_until_stopped(loop: InferenceLoop, running: RunningApp | RunningWorker) -> None:
    """The inference loop on this, the main, thread (see InferenceLoop.run), where Ctrl+C and
    SIGTERM land; then everything stops in order."""
    try:
        loop.run()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        running.close()


def _prepare(settings: AppSettings, engine: GenerativeAdapterModel | None,
             storage_settings: StorageSettings | None, progress: StartupProgress, block: bool):
    services, loop = _services(settings, engine, storage_settings, progress, block)
    progress.begin("web page")
    worker = None
    if settings.role == "all":  # a web replica leaves compressions to the workers
        worker = CompressionWorker(services.memory, settings.worker_poll_seconds)
        worker.start()
    services.downloads.start_sweeping()
    ui = build_ui(services)
    ui.queue(default_concurrency_limit=4)
    return services, loop, worker, ui, create_app(services, ui)


def _services(settings: AppSettings, engine: GenerativeAdapterModel | None,
              storage_settings: StorageSettings | None, progress: StartupProgress,
              block: bool) -> tuple[Services, InferenceLoop]:
    """Storage (migrated), the engine, the inference loop (started) and the services on them."""
    progress.begin("database")
    log.info("database at %s", redact_url(settings.database_url) or settings.data_dir / "memchat.db")
    storage_settings = replace(storage_settings or StorageSettings(), snapshot_store=settings.snapshot_store)
    if settings.role != "all" and settings.snapshot_store == "files":
        log.warning("--role %s with --snapshot-store files: replicas and workers on other machines (or with other "
                    "data folders) cannot read each other's adapters; use --snapshot-store database", settings.role)
    storage = Storage(settings.database_url, settings.data_dir, storage_settings)
    storage.migrate()
    progress.begin("language model and memory generator")
    if engine is None:
        log.info("loading the language model and its generator (the first start converts the default model, "
                 "about half a minute; later starts use the cache)")
        engine = load_engine(settings.model, settings.checkpoint, device=settings.device,
                             cache_dir=settings.data_dir / "model-cache",
                             int4_decode=None if settings.int4_decode else False)
    engine.eval()
    # the decode step's fused weights and, at a machine's first start, its C++ layers (~35 s on 2 cores)
    lean_decoder(engine)
    log.info("model %s, generator %s, compressor %s", engine.base_model_id, engine.generator_id, settings.compressor)
    loop = InferenceLoop(engine)
    services = Services.create(storage, engine, loop, settings)
    if settings.admin_username and settings.admin_password:
        services.accounts.ensure_admin(settings.admin_username, settings.admin_password)
        log.info("admin account: %s", settings.admin_username)
    elif not services.accounts.any_admin():
        log.warning("no admin account: set --admin-username and MEMCHAT_ADMIN_PASSWORD (or "
                    "--admin-password-file) to create one")
    log.info("background compression: every %d messages or after %.0f idle seconds",
             settings.compress_every, settings.compress_idle_seconds)
    loop.start(own_thread=not block)  # before the worker, whose compressions run on it
    return services, loop
