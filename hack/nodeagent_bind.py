"""Keep pod processes' wildcard binds on their own pod IP (an LD_PRELOAD shim).

Pods here share the host's network stack; each has its own loopback address (127.x.y.z).
A server that binds its pod IP is private to it, but many bind the wildcard: PyTorch's
TCPStore listens on `[::]:MASTER_PORT`, for instance. That would put two jobs' rank-0
processes on the same port (the second fails with EADDRINUSE) and make the store reachable
from other machines. Inside a real pod the wildcard means "this pod's interfaces", so the
agent gives each pod process a tiny `bind()` wrapper (compiled once per agent with the
host's C compiler) that rewrites:

* `0.0.0.0` to the pod IP;
* `::` to `::ffff:<pod IP>` on a dual-stack socket, or to `::1` on an IPv6-only one.

Everything else passes through. It is active for processes that use the C library's
`bind` (CPython, PyTorch/libuv, gloo); statically linked programs (Go) are not covered.
The pod IP reaches it as `TORPOR_POD_IP`; without a C compiler the agent logs a warning
and pods bind as they like.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger("torpor.node_agent")

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *ip = getenv("TORPOR_POD_IP");
    if (ip && addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in copy = *(const struct sockaddr_in *)addr;
        if (copy.sin_addr.s_addr == htonl(INADDR_ANY) && inet_pton(AF_INET, ip, &copy.sin_addr) == 1)
            return real_bind(fd, (const struct sockaddr *)&copy, sizeof copy);
    }
    if (ip && addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 copy = *(const struct sockaddr_in6 *)addr;
        if (IN6_IS_ADDR_UNSPECIFIED(&copy.sin6_addr)) {
            char mapped[64];
            int v6only = 0;
            socklen_t optlen = sizeof v6only;
            getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen);
            snprintf(mapped, sizeof mapped, "::ffff:%s", ip);
            if (v6only || inet_pton(AF_INET6, mapped, &copy.sin6_addr) != 1)
                copy.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *)&copy, sizeof copy);
        }
    }
    return real_bind(fd, addr, len);
}
"""


def build_bind_shim(directory: Path) -> Path | None:
    """Compile the shim into `directory` (once per source version); None without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        log.warning("node agent: no C compiler; pod processes' wildcard binds are not kept on their pod IP")
        return None
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    library = directory / f"torpor-bind-{digest}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / f"torpor-bind-{digest}.c"
    source.write_text(SOURCE)
    tmp = library.with_suffix(".so.tmp")
    proc = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(source), "-ldl"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        log.warning("node agent: cannot build the bind shim (%s): %s", " ".join(proc.args), proc.stderr.strip())
        return None
    tmp.rename(library)
    return library
