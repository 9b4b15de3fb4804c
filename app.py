"""Memory chat: `python app.py --help` lists the settings (each also a MEMCHAT_* variable).

The port answers with the loading page (app/loading.py) before the model code is even imported
(seconds on a small machine), and its clock counts from this process's start."""

import logging
import sys

from app.loading import APP_STEPS, LoadingServer, StartupProgress, process_started
from app.settings import AppSettings


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = AppSettings.from_args(argv)
    loading = None
    if settings.role != "worker":  # a worker has no page and no port
        progress = StartupProgress(APP_STEPS, settings.data_dir / "startup.json", started=process_started())
        loading = LoadingServer(progress, settings.host, settings.port)
        loading.start()
        logging.getLogger("app").info("starting; %s shows the progress", loading.url)

    from adapter_core import ModelLoadError  # the heavy imports, while the page answers
    from app.launch import start, start_worker

    try:
        if loading is None:
            start_worker(settings)
        else:
            start(settings, loading=loading)
    except ModelLoadError as e:
        print(f"memchat cannot start: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
