"""Batches for the analyses with passes of their own: a bounded prefix of a loader, and the check
that a loader has labels."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from ..errors import VitlabError

__all__ = ["Limited", "images_of", "require_labels"]


def images_of(batch: Any) -> Any:
    """The images of a batch that is ``(images, labels, ...)`` or images alone."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class Limited:
    """The first batches of ``loader`` holding about ``num_images`` images (at least one batch).

    Iterable again and again without keeping the batches, so memory does not grow with the
    number of images (a list of them would hold a copy of the data).
    """

    def __init__(self, loader: Iterable, num_images: int) -> None:
        self.loader, self.num_images = loader, num_images

    def __iter__(self) -> Iterator:
        seen = 0
        for batch in self.loader:
            yield batch
            seen += images_of(batch).shape[0]
            if seen >= self.num_images:
                return


def require_labels(loader: Iterable, analysis: str) -> None:
    """Refuse a loader whose batches carry no labels, in one line."""
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise VitlabError(f"{analysis} needs labelled batches (images, labels)")
        return
