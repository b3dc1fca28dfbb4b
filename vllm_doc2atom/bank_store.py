"""Banks a server may serve: names resolved safely under one root, loaded once, reloaded on change.

Request names are hostile input: they are checked before they touch the filesystem, and no error
message reveals where the banks live on disk (banks are named as requested, files relative to them).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
import unicodedata
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

from .bank import MANIFEST_NAME, AtomBank
from .bank_union import BankUnion
from .errors import BankError, BankErrorKind
from .fingerprint import BaseModelFingerprint

logger = logging.getLogger(__name__)

MAX_NAME_CHARS = 1024
MAX_COMPONENT_BYTES = 255  # NAME_MAX of common filesystems
MAX_UNION_BANKS = 16
UNION_CACHE_SIZE = 16
LOAD_ATTEMPTS = 3  # a bank being rewritten while it loads is loaded again
SWAP_WAIT_SECONDS = 1.0  # how long a bank being swapped for a new one may be missing


class BankStore:
    def __init__(self, root: Path, served_model: BaseModelFingerprint | None = None,
                 recheck_seconds: float = 1.0) -> None:
        self.root = root
        self.served_model = served_model
        # get() stats every shard of a cached v1 bank at most this often (the manifest: always); factors()
        # checks the shards it reads on every read regardless, and list() always checks them (a v2 bank: its
        # segments and the shards read so far). A v2 bank's files are never statted per request: shards are
        # immutable and hash-checked on every read, segments re-hashed when a read finds their stat changed.
        self.recheck_seconds = recheck_seconds
        self._cache: dict[Path, AtomBank] = {}
        self._checked: dict[Path, float] = {}  # path -> time.monotonic() of the last full shard check
        self._unions: OrderedDict[tuple[str, ...], BankUnion] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, name: Any) -> Path:
        """The bank folder a request names, refusing anything that is not a plain path inside the root."""
        if not isinstance(name, str) or not name.strip():
            raise BankError("`atom_bank` must be a non-empty string naming a bank under the server's bank root",
                            kind=BankErrorKind.BAD_REQUEST)
        shown = _shown(name)
        if len(name) > MAX_NAME_CHARS:  # first: the checks below walk every character
            raise BankError(f"atom_bank {shown} is longer than {MAX_NAME_CHARS} characters",
                            kind=BankErrorKind.BAD_REQUEST)
        if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name):  # NUL, newlines, bidi, surrogates
            raise BankError(f"atom_bank {shown} contains control or invisible characters",
                            kind=BankErrorKind.BAD_REQUEST)
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(part in ("..", "") for part in parts):
            raise BankError(f"atom_bank {shown} must be a relative path inside the bank root, without '..'",
                            kind=BankErrorKind.BAD_REQUEST)
        if any(part.startswith(".") for part in parts):  # e.g. the temp and old folders of atomic writes
            raise BankError(f"atom_bank {shown} names a hidden folder", kind=BankErrorKind.BAD_REQUEST)
        if any(len(part.encode()) > MAX_COMPONENT_BYTES for part in parts):
            raise BankError(f"atom_bank {shown} has a path component longer than {MAX_COMPONENT_BYTES} bytes",
                            kind=BankErrorKind.BAD_REQUEST)
        try:
            root = self.root.resolve()
            path = (root / PurePosixPath(name)).resolve()  # follows symlinks: a link pointing out is caught
            inside = path.is_relative_to(root)
            is_dir = inside and path.is_dir()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a path too long for the OS
            logger.info("doc2atom: atom_bank %s does not resolve: %s", shown, exc)  # paths: log only
            if isinstance(exc, OSError) and exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
                raise BankError(f"unknown atom bank {shown}",
                                kind=BankErrorKind.NOT_FOUND) from exc  # e.g. no permission
            # (Python < 3.13 reports a symlink loop as RuntimeError)
            raise BankError(f"atom_bank {shown} cannot be resolved (a symlink loop, or too long)",
                            kind=BankErrorKind.BAD_REQUEST) from exc
        if not inside:
            raise BankError(f"atom_bank {shown} points outside the bank root", kind=BankErrorKind.BAD_REQUEST)
        if not is_dir:
            raise BankError(f"unknown atom bank {shown}", kind=BankErrorKind.NOT_FOUND)
        return path

    def get(self, name: Any, check_shards: bool | None = None) -> AtomBank:
        """Load (or reuse) a bank. A changed manifest on disk triggers a reload; a changed shard is
        re-hashed, and a missing or corrupt one raises BankError kind "invalid" (for this bank only).
        `check_shards`: check the bank's files now (True: see AtomBank.check_files), never (False), or (None)
        at most every `recheck_seconds` for a v1 bank and never for a v2 bank, whose load reads no shard."""
        path = self._resolve_through_swaps(name)
        with self._lock:
            bank = self._cache.get(path)
            if bank is not None:
                now = time.monotonic()
                if check_shards is None:
                    due = now - self._checked.get(path, float("-inf")) >= self.recheck_seconds
                    check_shards = due and bank.format_version == 1
                try:
                    bank.check_files(shards=check_shards)
                    if check_shards:
                        self._checked[path] = now
                    return bank
                except BankError as exc:
                    if exc.kind != BankErrorKind.STALE:
                        raise
            for attempt in range(LOAD_ATTEMPTS):
                try:
                    bank = AtomBank.load(path, expect_base=self.served_model, name=name)
                    break
                except BankError as exc:  # "stale": a writer swapped the manifest while we read it
                    if exc.kind != BankErrorKind.STALE or attempt == LOAD_ATTEMPTS - 1:
                        raise
            self._cache[path] = bank
            self._checked[path] = time.monotonic()
            logger.info("doc2atom: loaded bank %s (%d atoms)", name, len(bank))
            return bank

    def _resolve_through_swaps(self, name: Any) -> Path:
        """resolve(), waiting out a bank being replaced: AtomBank.create(overwrite=True) renames the old
        folder aside (".<name>.old-*") and then the new one in, so for an instant the name is missing."""
        deadline = time.monotonic() + SWAP_WAIT_SECONDS
        while True:
            try:
                return self.resolve(name)
            except BankError as exc:
                if exc.kind != BankErrorKind.NOT_FOUND or time.monotonic() > deadline:
                    raise
                target = self.root / name
                aside = f".{target.name}.old-"
                if not target.parent.is_dir() or not any(p.name.startswith(aside) for p in target.parent.iterdir()):
                    raise
                time.sleep(0.01)

    def get_many(self, names: Any) -> BankUnion:
        """Several banks (1 to MAX_UNION_BANKS names, each resolved like get()) routed as one."""
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_UNION_BANKS:
            raise BankError(f"name a list of 1 to {MAX_UNION_BANKS} atom banks",
                            kind=BankErrorKind.BAD_REQUEST)
        seen: dict[Path, str] = {}
        for name in names:
            path = self._resolve_through_swaps(name)
            if path in seen:
                twice = f"{_shown(name)} is named twice" if seen[path] == name else \
                    f"{_shown(seen[path])} and {_shown(name)} are the same bank"
                raise BankError(f"atom banks: {twice}", kind=BankErrorKind.BAD_REQUEST)
            seen[path] = name
        banks = [self.get(name) for name in names]
        key = tuple(names)
        with self._lock:  # a union concatenates its members' keys: build it once per set of loaded banks
            union = self._unions.get(key)
            if union is not None and all(a is b for a, b in zip(union.banks, banks)):
                self._unions.move_to_end(key)
                return union
        union = BankUnion(banks, names)
        with self._lock:
            self._unions[key] = union
            while len(self._unions) > UNION_CACHE_SIZE:
                self._unions.popitem(last=False)
        return union

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
                bank = self.get(name, check_shards=True)
                entry.update(atoms=len(bank), documents=len(bank.document_ids),
                             base_model=bank.spec.base_model.name, key_encoder=bank.spec.key_encoder, ok=True)
            except BankError as exc:
                entry.update(ok=False, error=str(exc))
            banks.append(entry)
        return banks


def _shown(name: str) -> str:
    """A requested name for a message: repr (control characters escaped), cut to at most 80 characters."""
    text = repr(name)
    return text if len(text) <= 80 else text[:76] + "...'"
