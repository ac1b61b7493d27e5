"""Set up one container's view of the machine, then exec its command.

The node agent runs this as::

    unshare --mount --uts --propagation private -- python nodeagent_launch.py SPEC.json

so it starts in a fresh mount namespace and UTS namespace of its own. Here it bind-mounts
every volume at its `mountPath` (creating empty mount points on the host file system when
they are missing), sets the pod's hostname, changes to the working directory, and replaces
itself with the container's command: the container's main process keeps this process's
PID, session and process group. The bind mounts are visible to that process and its
children only; they disappear with the namespace when its last process exits.

SPEC.json: `{"hostname": str, "cwd": str, "argv": [str], "env": {str: str},
"mounts": [{"source": str, "target": str, "readOnly": bool}]}`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import socket
import sys

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    if _libc.mount(src, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def bind(source: str, target: str, read_only: bool) -> None:
    """Bind-mount `source` at `target`, creating the mount point like a container runtime."""
    if not os.path.lexists(target):
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "a"):
                pass
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    try:
        socket.sethostname(spec["hostname"])
        # Parents before children, so that a volume inside another volume stays visible.
        for mount in sorted(spec["mounts"], key=lambda m: os.path.normpath(m["target"]).count("/")):
            bind(mount["source"], mount["target"], mount["readOnly"])
        os.makedirs(spec["cwd"], exist_ok=True)
        os.chdir(spec["cwd"])
    except OSError as exc:
        print(f"torpor node agent: cannot set up the container: {exc}", file=sys.stderr, flush=True)
        sys.exit(128)
    try:
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as exc:
        print(f"torpor node agent: cannot run {spec['argv'][0]!r}: {exc}", file=sys.stderr, flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main()
