"""Reading (possibly compressed) file contents without ever holding more than a byte budget.

Two tools, both for files whose headers cannot be trusted:

- :class:`BoundedReader` wraps a readable, seekable binary stream (a plain file or a ``gzip.GzipFile``) and refuses,
  with :class:`~common.data.limits.LimitExceeded`, any read or seek past ``limit`` bytes of *decompressed* data.
  A request for more than the budget is refused before a buffer of that size is made, so a header field claiming
  a 2 GiB extension costs nothing.
- :func:`raw_deflate_size` inflates a raw deflate stream in small pieces, discarding the output, and stops as soon
  as it exceeds the budget: it measures a Deflated-DICOM body before pydicom inflates it in one piece.
"""

from __future__ import annotations

import io
import zlib
from typing import BinaryIO

from .limits import LimitExceeded

_CHUNK = 1 << 20


class BoundedReader(io.RawIOBase):
    """A read-only view of ``stream`` that may not go past ``limit`` bytes (decompressed, for gzip streams).

    Args:
        stream: readable and seekable (forward seeks at least, as ``gzip.GzipFile``).
        limit: the most bytes that may be read; the stream may end earlier.
        where: name of the file for error messages.
    """

    def __init__(self, stream: BinaryIO, limit: int, where: str) -> None:
        super().__init__()
        self._stream = stream
        self._limit = int(limit)
        self.name = where

    def _over(self, position: int) -> LimitExceeded:
        return LimitExceeded(
            f"{self.name}: content reaches byte {position}, over the limit of {self._limit} bytes per file "
            "(ReaderLimits.max_file_bytes; for a compressed file this counts the decompressed bytes)"
        )

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._stream.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = int(offset)
        elif whence == io.SEEK_CUR:
            target = self.tell() + int(offset)
        else:
            raise io.UnsupportedOperation(f"{self.name}: seeking from the end is not supported")
        if target > self._limit:
            raise self._over(target)
        return self._stream.seek(target)

    def read(self, size: int | None = -1) -> bytes:
        position = self.tell()
        budget = self._limit - position
        # Ask the stream for one byte more than the budget: getting it proves the content is over the limit.
        want = budget + 1 if size is None or size < 0 or size > budget else int(size)
        data = self._stream.read(want)
        if position + len(data) > self._limit:
            raise self._over(position + len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()


def raw_deflate_size(stream: BinaryIO, limit: int, where: str) -> int:
    """Bytes that the raw deflate stream ``stream`` (from its current position) inflates to.

    Inflates piece by piece (at most about 1 MiB held at a time) and discards the output.

    Raises:
        LimitExceeded: as soon as more than ``limit`` bytes came out.
        zlib.error: when the stream is not valid deflate data.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while not inflater.eof:
        pending = stream.read(_CHUNK)
        if not pending:
            break
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, _CHUNK))
            if total > limit:
                raise LimitExceeded(
                    f"{where}: deflated data inflates to more than {limit} bytes (ReaderLimits.max_file_bytes)"
                )
            pending = inflater.unconsumed_tail
    return total
