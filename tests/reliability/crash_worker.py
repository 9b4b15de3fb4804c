"""The app's compression side as a process of its own, for the crash tests to SIGKILL:
`python tests/reliability/crash_worker.py DATABASE_URL DATA_DIR`. Prints 'ready' once working."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adapter_core.serving.scheduler import InferenceLoop  # noqa: E402
from app.services import Services  # noqa: E402
from app.settings import AppSettings  # noqa: E402
from app.worker import CompressionWorker  # noqa: E402
from storage import Storage  # noqa: E402
from tests.conftest import byte_tokenizer, tiny_text_engine  # noqa: E402
from tests.reliability.test_crash import CRASH_SETTINGS  # noqa: E402


def main() -> None:
    url, data_dir = sys.argv[1], Path(sys.argv[2])
    storage = Storage(url, data_dir, CRASH_SETTINGS)
    engine = tiny_text_engine(byte_tokenizer(), live=True)
    loop = InferenceLoop(engine).start()
    services = Services.create(storage, engine, loop, AppSettings(
        data_dir=data_dir, compressor="generator", compress_idle_seconds=0))  # commits alike, the cheap pass
    CompressionWorker(services.memory, poll_seconds=0.01).start()  # requeues what a kill interrupted
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
