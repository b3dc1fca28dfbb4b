"""Banks a server may serve: names resolved safely under one root, loaded once, reloaded on change."""

from __future__ import annotations

import logging
import threading
from pathlib import Path, PurePosixPath
from typing import Any

from .bank import MANIFEST_NAME, AtomBank
from .errors import BankError
from .fingerprint import BaseModelFingerprint

logger = logging.getLogger(__name__)


class BankStore:
    def __init__(self, root: Path, served_model: BaseModelFingerprint | None = None) -> None:
        self.root = root
        self.served_model = served_model
        self._cache: dict[Path, tuple[tuple[int, int, int], AtomBank]] = {}
        self._lock = threading.Lock()

    def resolve(self, name: Any) -> Path:
        """The bank folder a request names, refusing anything that is not a plain path inside the root."""
        if not isinstance(name, str) or not name.strip():
            raise BankError("`atom_bank` must be a non-empty string naming a bank under the server's bank root",
                            kind="bad_request")
        relative = PurePosixPath(name)
        if relative.is_absolute() or "\\" in name or any(part in ("..", "") for part in name.split("/")):
            raise BankError(f"atom_bank {name!r} must be a relative path inside the bank root, without '..'",
                            kind="bad_request")
        root = self.root.resolve()
        path = (root / relative).resolve()  # follows symlinks, so a link pointing out is caught below
        if not path.is_relative_to(root):
            raise BankError(f"atom_bank {name!r} points outside the bank root", kind="bad_request")
        if not path.is_dir():
            raise BankError(f"unknown atom bank {name!r}", kind="not_found")
        return path

    def get(self, name: Any) -> AtomBank:
        """Load (or reuse) a bank; a changed manifest on disk triggers a reload."""
        path = self.resolve(name)
        try:
            stat = (path / MANIFEST_NAME).stat()
            version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            version = (0, 0, 0)  # AtomBank.load reports the missing manifest
        with self._lock:
            cached = self._cache.get(path)
            if cached and cached[0] == version:
                return cached[1]
            bank = AtomBank.load(path, expect_base=self.served_model)
            self._cache[path] = (version, bank)
            logger.info("doc2atom: loaded bank %s (%d atoms)", name, len(bank))
            return bank

    def list(self) -> list[dict[str, Any]]:
        """Every bank under the root (folders holding a manifest), with its size and status."""
        banks = []
        if not self.root.is_dir():
            return banks
        for manifest in sorted(self.root.rglob(MANIFEST_NAME)):
            name = manifest.parent.relative_to(self.root).as_posix()
            if any(part.startswith(".") for part in name.split("/")):
                continue  # temp and old dirs of atomic writes
            entry: dict[str, Any] = {"id": name, "object": "atom_bank"}
            try:
                bank = self.get(name)
                entry.update(atoms=len(bank), documents=len(bank.document_ids),
                             base_model=bank.spec.base_model.name, key_encoder=bank.spec.key_encoder, ok=True)
            except BankError as exc:
                entry.update(ok=False, error=str(exc))
            banks.append(entry)
        return banks
