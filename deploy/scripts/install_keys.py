#!/usr/bin/env python3
"""Hand key files to the image's user: copy each SRC folder's files into DST, owned by UID:GID (keys 0600).

    python deploy/scripts/install_keys.py --owner 10001:10001 /src/superlink=/keys/superlink /src/supernodes/site-01=/keys/site-01

Run as root by the compose file's one-shot ``keys`` service (no network): ``fedfusion certs`` writes private keys
as 0600 files of the host user, which the containers' user (uid 10001) could not read through a bind mount. Each
DST is a named volume that only its service mounts. See :func:`fedfusion.deployment.install_keys`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedfusion.deployment import IMAGE_UID, install_keys  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", help="SRC=DST folder pairs")
    p.add_argument("--owner", default=f"{IMAGE_UID}:{IMAGE_UID}", help="UID:GID that owns the installed files")
    args = p.parse_args(argv)
    uid, _, gid = args.owner.partition(":")
    for pair in args.pairs:
        src, sep, dst = pair.partition("=")
        if not sep:
            p.error(f"{pair!r} is not SRC=DST")
        try:
            written = install_keys(src, dst, uid=int(uid), gid=int(gid or uid))
        except (FileNotFoundError, PermissionError) as exc:
            print(f"install_keys: {exc}", file=sys.stderr)
            return 2
        print(f"{dst}: {', '.join(f.name for f in written)} (owner {uid}:{gid or uid})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
