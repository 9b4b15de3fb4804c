"""One memchat process of a test cluster: `python tests/cluster/node.py <app.py's flags>`.

What app.py starts (the same settings, roles and start-up code), on the tiny byte-level model the
other tests use instead of the 135M one, so that a cluster of four starts in seconds. For the tests'
faults, environment variables: MEMCHAT_TEST_LEASE_S (compression jobs' and turns' leases),
MEMCHAT_TEST_COMPRESSION_S (each compression takes at least this long), MEMCHAT_TEST_STEP_S (each
decode step takes at least this long: a reply still streams when the test kills its replica). Replies
never end by themselves here: each runs to its max_tokens, as a long reply would."""

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import adapter_core.serving.decoding  # noqa: E402
from adapter_core.serving.scheduler import InferenceLoop  # noqa: E402
from app.launch import start, start_worker  # noqa: E402
from app.settings import AppSettings  # noqa: E402
from tests.conftest import byte_tokenizer, tiny_text_engine  # noqa: E402
from tests.storage.helpers import FAST  # noqa: E402


def slowed(method, seconds: float):
    def slow(self, *args, **kwargs):
        time.sleep(seconds)
        return method(self, *args, **kwargs)
    return slow


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = AppSettings.from_args(sys.argv[1:])
    lease = float(os.environ.get("MEMCHAT_TEST_LEASE_S", "0") or 0)
    storage_settings = replace(FAST, job_lease_s=lease, turn_lease_s=lease) if lease else FAST
    if os.environ.get("MEMCHAT_TEST_COMPRESSION_S"):
        InferenceLoop.absorb = slowed(InferenceLoop.absorb, float(os.environ["MEMCHAT_TEST_COMPRESSION_S"]))
    if os.environ.get("MEMCHAT_TEST_STEP_S"):
        InferenceLoop._step = slowed(InferenceLoop._step, float(os.environ["MEMCHAT_TEST_STEP_S"]))
    adapter_core.serving.decoding.end_of_turn_ids = lambda tokenizer: []
    engine = tiny_text_engine(byte_tokenizer(), live=True)
    if settings.role == "worker":
        start_worker(settings, engine, storage_settings)
    else:
        start(settings, engine, storage_settings)


if __name__ == "__main__":
    main()
