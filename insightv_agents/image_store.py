"""Images held once per run: the state keeps a content hash, LangGraph's store the image.

:func:`~insightv_agents.nodes.prepare_input` validates a run's images. In a graph compiled
with a store (``builder.compile(checkpointer=..., store=...)``; LangGraph Server always gives
one), each image is kept once in that store, under :data:`NAMESPACE` and the SHA-256 of its
data URL, and the state's ``images`` holds ``"sha256:<hex>"`` references: a checkpoint then
holds a few bytes per image however many steps the run takes, and a run resumed from a
checkpoint reads the same images from the store. Without a store, ``images`` holds the data
URLs themselves (every checkpoint carries them).

Nodes read ``images`` through :func:`resolve_images` / :func:`aresolve_images`, which accept
nothing else than those two forms.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from langgraph.store.base import BaseStore

from insightv_agents.errors import InvalidInputError

NAMESPACE = ("insightv", "images")
"""The store namespace holding the images, keyed by the SHA-256 (hex) of their data URL."""

REF_PREFIX = "sha256:"

_REF_RE = re.compile(r"sha256:[0-9a-f]{64}")
_IMAGE_URL_RE = re.compile(r"data:image/[\w.+-]+;base64,[A-Za-z0-9+/]+={0,2}", re.I)


def hold_images(urls: Sequence[str], store: BaseStore | None) -> list[str]:
    """Keep ``urls`` (validated data URLs) once in ``store``; their references, in order.

    Without a store, the data URLs themselves."""
    if store is None:
        return list(urls)
    refs = []
    for url in urls:
        key = hashlib.sha256(url.encode("ascii")).hexdigest()
        if store.get(NAMESPACE, key) is None:  # content-addressed: stored once
            store.put(NAMESPACE, key, {"url": url}, index=False)
        refs.append(REF_PREFIX + key)
    return refs


def resolve_images(images: Any, store: BaseStore | None) -> list[str]:
    """The data URLs behind a state's ``images`` (references read from ``store``).

    Raises:
        InvalidInputError: for ``images`` that is not a list of data URLs and references
            made by :func:`hold_images`, or a reference the store does not hold.
    """
    refs = _check(images)
    found = {}
    for key in {ref[len(REF_PREFIX):] for ref in refs.values()}:
        found[key] = store.get(NAMESPACE, key) if store is not None else None
    return _assemble(images, refs, found, store)


async def aresolve_images(images: Any, store: BaseStore | None) -> list[str]:
    """:func:`resolve_images` for async graph runs (the store's async API)."""
    refs = _check(images)
    found = {}
    for key in {ref[len(REF_PREFIX):] for ref in refs.values()}:
        found[key] = await store.aget(NAMESPACE, key) if store is not None else None
    return _assemble(images, refs, found, store)


def _check(images: Any) -> dict[int, str]:
    """Check the form of every entry; the references, by position."""
    if images is None:
        return {}
    if not isinstance(images, list | tuple):
        raise InvalidInputError(f"`images` must be a list, not {type(images).__name__}: "
                                "put prepare_input before this node, and `images` in the "
                                "graph's state.", field="images")
    refs = {}
    for index, entry in enumerate(images):
        if isinstance(entry, str) and _REF_RE.fullmatch(entry):
            refs[index] = entry
        elif not (isinstance(entry, str) and _IMAGE_URL_RE.fullmatch(entry)):
            shown = type(entry).__name__ if not isinstance(entry, str) else f"{entry[:40]!r}"
            raise InvalidInputError(
                f"`images[{index}]` ({shown}) is not an image prepared by prepare_input "
                "(a base64 image data URL, or a reference to one in the graph's store).",
                field="images")
    return refs


def _assemble(images: Any, refs: dict[int, str], found: dict[str, Any],
              store: BaseStore | None) -> list[str]:
    urls = []
    for index, entry in enumerate(images or []):
        if index not in refs:
            urls.append(entry)
            continue
        item = found.get(entry[len(REF_PREFIX):])
        url = item.value.get("url") if item is not None else None
        if isinstance(url, str) and not _IMAGE_URL_RE.fullmatch(url):
            raise InvalidInputError(f"`images[{index}]` refers to a stored entry that is not a "
                                    "base64 image data URL.", field="images")
        if not isinstance(url, str):
            where = "the graph has no store" if store is None else "the store does not hold it"
            raise InvalidInputError(
                f"`images[{index}]` refers to a stored image, but {where}: compile the graph "
                "with the store the run was started with.", field="images")
        urls.append(url)
    return urls
