"""The app's services, built once around one storage, engine and inference loop, and grouped for
the UI, the web server and the start-up (app/launch.py).

    accounts  sign-up, log in and out, who is logged in          (app/accounts.py)
    api_keys  a user's keys for the OpenAI-compatible API         (app/api_keys.py)
    chat      history, a turn: message, streamed reply            (app/chat.py)
    memory    status, compress, forget, the adapter states        (app/memory.py; the worker's side)
    exports   zips of a user's data or adapter                     (app/export.py)
    admin     what the admin page shows and does                   (app/admin.py)

Each checks who acts through one Access (app/access.py) and reports a refusal as an AppError.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapter_core import GenerativeAdapterModel
from adapter_core.serving.scheduler import InferenceLoop
from storage import Storage

from .access import Access
from .accounts import Accounts
from .admin import Admin
from .api_keys import ApiKeys
from .chat import Chat
from .downloads import DownloadStore
from .export import Exports
from .limits import RateLimits
from .memory import Memory
from .settings import AppSettings


@dataclass(frozen=True)
class Services:
    storage: Storage
    engine: GenerativeAdapterModel
    settings: AppSettings
    downloads: DownloadStore
    accounts: Accounts
    api_keys: ApiKeys
    chat: Chat
    memory: Memory
    exports: Exports
    admin: Admin

    @classmethod
    def create(cls, storage: Storage, engine: GenerativeAdapterModel, loop: InferenceLoop, settings: AppSettings,
               limits: RateLimits | None = None, downloads: DownloadStore | None = None) -> Services:
        """Every service, sharing the rate limits (where the settings say) and the download links."""
        downloads = downloads or DownloadStore(storage, settings.data_dir / "download-builds")
        access = Access(storage, settings, limits or RateLimits(settings.rate_limit_storage))
        memory = Memory(access, engine, loop, downloads)
        accounts = Accounts(access, downloads, memory)
        api_keys = ApiKeys(access)
        chat = Chat(access, engine, loop, memory)
        exports = Exports(access, engine, memory, downloads)
        admin = Admin(access, engine, loop, accounts, chat, memory, exports, downloads)
        return cls(storage, engine, settings, downloads, accounts, api_keys, chat, memory, exports, admin)
