"""Memory chat: `python app.py --help` lists the settings (each also a MEMCHAT_* variable)."""

import logging
import sys

from adapter_core import ModelLoadError
from app.launch import start
from app.settings import AppSettings


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = AppSettings.from_args(argv)
    try:
        start(settings)
    except ModelLoadError as e:
        print(f"memchat cannot start: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
