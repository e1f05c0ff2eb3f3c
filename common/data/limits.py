"""How much one file, series and case folder may cost the readers: checked before any of it is spent.

Files handed to a site's readers may be hostile (or simply broken): a NIfTI header claiming 10^13 voxels, a gzip
or Deflated-DICOM "bomb" of a few kilobytes that inflates to gigabytes, slice positions spread over a kilometre, a
SeriesDescription built to make a regular expression backtrack for seconds, or a case folder of 100 000 files.
Every such thing is refused by comparing what the header *claims* (or what a bounded read *finds*) with a
:class:`ReaderLimits` before memory or time is spent on it; the refusal becomes a
:class:`~common.data.problems.Problem` of kind ``limit-exceeded`` naming the file and the limit.

The limits belong to the site: a site may pass its own :class:`ReaderLimits` to
:class:`~common.data.dataset.CaseDataset`, :func:`~common.data.site.load_case` or
:func:`~common.data.inspect.inspect_data`. They are deliberately not run-config keys: the run config comes from
the server, and a server must not be able to loosen what a site's readers accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class ReaderLimits:
    """Upper bounds the readers enforce (defaults sized for clinical volumes, with head-room).

    Attributes:
        max_voxels: voxels of one image file or one stacked series. Default 512 × 512 × 2000 (~5.2e8): a
            whole-body CT at 0.5 mm slices or a 2000-frame enhanced MR fits; as float32 that is 2 GiB, about the
            most one volume can take on a site machine while the other modalities of the case are held too.
        max_file_bytes: bytes of one file on disk *and* after decompression (gzip NIfTI, Deflated DICOM). Default
            2 GiB, the float32 size of ``max_voxels``; real MR/CT files are tens to hundreds of MiB.
        max_files_per_case: directory entries (files and sub-folders, hidden ones included) scanned in one case
            folder. Default 5000: a case of six modalities with a few hundred slices each stays far below it; a
            folder of 100 000 tiny files is refused instead of opened one by one.
        max_description_chars: characters of a SeriesDescription (or ProtocolName) given to the series mapping's
            regular expressions. Default 1024: DICOM's LO value representation allows 64, so every conforming file
            fits 16 times over, while matching the default patterns stays in the milliseconds (24 000 characters
            take seconds).
    """

    max_voxels: int = 512 * 512 * 2000
    max_file_bytes: int = 2 * GIB
    max_files_per_case: int = 5000
    max_description_chars: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_voxels", "max_file_bytes", "max_files_per_case", "max_description_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReaderLimits.{name} must be a positive integer, got {value!r}")


#: The limits used when a caller gives none.
DEFAULT_LIMITS = ReaderLimits()


class LimitExceeded(ValueError):
    """A file, series or folder over a :class:`ReaderLimits` bound; the message names the thing and the limit."""


def check_file_size(size: int, where: str, limits: ReaderLimits) -> None:
    """Raise :class:`LimitExceeded` when a file of ``size`` bytes is over ``limits.max_file_bytes``."""
    if size > limits.max_file_bytes:
        raise LimitExceeded(
            f"{where}: {size} bytes, over the limit of {limits.max_file_bytes} bytes per file (ReaderLimits."
            "max_file_bytes); split or re-export the file, or raise the site's limit if it is genuine"
        )


def check_voxels(shape: Sequence[int], itemsize: int, where: str, limits: ReaderLimits) -> None:
    """Raise :class:`LimitExceeded` when an array of ``shape`` (as a header claims it) is over the voxel limit or,
    at ``itemsize`` bytes per voxel, over the byte limit. Python integers: no overflow for absurd claims."""
    voxels = 1
    for n in shape:
        voxels *= max(int(n), 0)
    if voxels > limits.max_voxels:
        raise LimitExceeded(
            f"{where}: {' x '.join(str(int(n)) for n in shape)} = {voxels} voxels, over the limit of "
            f"{limits.max_voxels} (ReaderLimits.max_voxels)"
        )
    if voxels * int(itemsize) > limits.max_file_bytes:
        raise LimitExceeded(
            f"{where}: {voxels} voxels x {int(itemsize)} bytes = {voxels * int(itemsize)} bytes, over the limit of "
            f"{limits.max_file_bytes} bytes (ReaderLimits.max_file_bytes)"
        )
