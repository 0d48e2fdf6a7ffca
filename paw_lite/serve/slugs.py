"""Slugs for the PAW API: a name a compile request gives its program (`"slug": "log-triage"`), with
versions (`log-triage@v2`), as the official client's `compile(slug=...)`, `function(slug)` and
`list_versions(slug)` use them. Kept in `data_dir/slugs.json`, written atomically.

A local server has no user accounts: a slug is one name (or `owner/name`, kept as given), and
each compile with a slug whose program differs from the slug's current one adds a version and
makes it the main one."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..errors import PawError

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
SLUG = re.compile(rf"^{_PART}(?:/{_PART})?$")
PINNED = re.compile(rf"^(?P<slug>{_PART}(?:/{_PART})?)@v(?P<version>[1-9][0-9]{{0,5}})$")


class SlugError(PawError, ValueError):
    """A slug that is not valid, or that names nothing."""


def check_slug(slug: object) -> str:
    if not isinstance(slug, str) or not SLUG.match(slug) or ".." in slug:
        raise SlugError(f"slug {str(slug)[:80]!r} is not valid: letters, digits, '.', '_', '-' (up to 64), "
                        f"optionally 'owner/name'")
    return slug


class SlugTable:
    """slug -> versions (program ids, oldest first) and the main version."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise PawError(f"{self.path}: cannot read the slug table: {exc}; fix or remove the file") from exc
        return data if isinstance(data, dict) else {}

    def bind(self, slug: str, program_id: str) -> tuple[int, str]:
        """Make `program_id` the slug's main version: (version, action) with action "created" (a
        new slug), "promoted" (a new version) or "no_change" (already the main version)."""
        check_slug(slug)
        with self._lock:
            table = self._read()
            entry = table.get(slug) or {"versions": [], "main": 0}
            versions: list[str] = entry["versions"]
            if entry["main"] and versions[entry["main"] - 1] == program_id:
                return entry["main"], "no_change"
            action = "promoted" if versions else "created"
            if program_id in versions:
                entry["main"] = versions.index(program_id) + 1
            else:
                versions.append(program_id)
                entry["main"] = len(versions)
            table[slug] = entry
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(table, indent=1, sort_keys=True), encoding="utf-8")
            return entry["main"], action

    def resolve(self, reference: str) -> str | None:
        """The program id of `slug` (its main version) or `slug@vN`; None when it names nothing."""
        pinned = PINNED.match(reference)
        slug, version = (pinned["slug"], int(pinned["version"])) if pinned else (reference, None)
        entry = self._entry(slug)
        if entry is None:
            return None
        version = version or entry["main"]
        return entry["versions"][version - 1] if 1 <= version <= len(entry["versions"]) else None

    def _entry(self, slug: str) -> dict[str, Any] | None:
        """The table's entry of a slug; None for an unknown or malformed one."""
        if not SLUG.match(slug):
            return None
        with self._lock:
            return self._read().get(slug)

    def versions(self, slug: str) -> dict[str, Any] | None:
        """{"slug", "main_version", "versions": [{"version", "program_id", "is_main"}]}, as the
        official client's `list_versions` documents it; None for an unknown slug."""
        entry = self._entry(slug)
        if entry is None:
            return None
        return {"slug": slug, "main_version": entry["main"],
                "versions": [{"version": i + 1, "program_id": pid, "is_main": i + 1 == entry["main"]}
                             for i, pid in enumerate(entry["versions"])]}

    def slugs_of(self, program_id: str) -> list[str]:
        with self._lock:
            table = self._read()
        return sorted(slug for slug, entry in table.items() if program_id in entry.get("versions", []))
