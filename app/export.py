"""Exports as zip files behind short-lived download links (app/downloads.py keeps the links).

One zip writer for both: a user's export of their own data (history as JSON, the adapter as its
state file, its snapshot's details and a PEFT LoRA folder) and an admin's export of a user's
adapter as a PEFT LoRA alone.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter_core import AdapterState, GenerativeAdapterModel, export_peft
from storage.models import User

from .access import Access
from .chat import HistoryMessage
from .downloads import Download, DownloadStore
from .errors import AppError
from .memory import Memory


@dataclass(frozen=True)
class DataExport:
    """A user's export of their own data."""

    download: Download
    adapter_version: int | None
    """The adapter version in it; None: no adapter in it (none yet, being rebuilt, or damaged)."""
    rebuilding: bool = False
    """No adapter in it because one is being rebuilt (after a forget or a reset)."""


class Exports:
    def __init__(self, access: Access, engine: GenerativeAdapterModel, memory: Memory,
                 downloads: DownloadStore) -> None:
        self.access, self.engine, self.memory, self.downloads = access, engine, memory, downloads
        self.storage = access.storage

    def my_data(self, user_id: object, address: str | None = None) -> DataExport:
        """A link to a zip of the user's history (JSON) and adapter (state file + PEFT LoRA folder;
        left out while it is rebuilt or damaged, and said so)."""
        user = self.access.user(user_id)
        self.access.costly(user.id)
        snapshot, state = self.memory.usable_state(user)
        history = [HistoryMessage.of(m) for m in self.storage.history(user.id)]
        files = {"history.json": json.dumps({"user": user.username, "messages": [m.as_json() for m in history]},
                                            indent=2, ensure_ascii=False)}
        if state is not None:
            files["adapter/state.safetensors"] = state.to_bytes()
            files["adapter/snapshot.json"] = json.dumps({
                "version": snapshot.version, "generator_id": snapshot.generator_id,
                "base_model_id": snapshot.base_model_id, "tokens_absorbed": snapshot.tokens_absorbed}, indent=2)
        download = self._link(user.id, user.id, f"memchat-{user.username}.zip", files, state, "adapter/peft/",
                              address)
        self.storage.record_audit(user.id, "export", user.id, {"address": address})
        return DataExport(download, snapshot.version if state is not None else None,
                          rebuilding=state is None and user.needs_rebuild)

    def peft_adapter(self, admin: User, user: User, address: str | None = None) -> Download:
        """A link for an admin (checked by the caller) to the user's adapter as a PEFT LoRA."""
        _, state = self.memory.usable_state(user)
        if state is None:
            raise AppError(f"{user.username} has no usable adapter yet")
        download = self._link(admin.id, user.id, f"adapter-{user.username}-peft.zip", {}, state, "", address)
        self.storage.record_audit(admin.id, "export_peft", user.id, {"tokens": state.tokens})
        return download

    def _link(self, owner_id: int, subject_id: int, filename: str, files: Mapping[str, str | bytes],
              state: AdapterState | None, peft_prefix: str, address: str | None) -> Download:
        """A zip of the files and, with a state, its PEFT LoRA folder under peft_prefix, behind a
        link for the owner holding the subject's data."""
        def write(archive: Path) -> None:
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
                for name, data in files.items():
                    z.writestr(name, data)
                if state is not None:
                    self._zip_peft(z, state, peft_prefix)

        return self.downloads.add(owner_id, filename, write, address, subject_id=subject_id)

    def _zip_peft(self, z: zipfile.ZipFile, state: AdapterState, prefix: str) -> None:
        """The state as a PEFT LoRA folder inside the zip (built in a private scratch folder)."""
        scratch = self.downloads.scratch()
        try:
            peft = export_peft(self.engine, state, scratch / "peft")
            for f in sorted(peft.iterdir()):
                z.write(f, f"{prefix}{f.name}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
