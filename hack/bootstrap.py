#!/usr/bin/env python3
"""Build the test toolchain from Go modules and cache it outside the repository.

No container engine and no release downloads are available on our machines, so the
control plane (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl), etcd,
MinIO and Helm are compiled from the Go module proxy. Each tool is cached under
``$TORPOR_CACHE/tools/<name>-<version>/bin`` (default ``~/.cache/torpor``), so only the
first run builds and a version bump builds afresh beside the old one.

Why Kubernetes 1.36: one minor behind the newest (1.37) and at a mature patch release;
its etcd client is 3.6, which matches the etcd 3.6 line we build; and ``kubectl`` of the
same minor is built from the same wrapper module. The exact pins live in ``VERSIONS``.

Usage::

    python hack/bootstrap.py            # build what is missing, print the bin dirs
    python hack/bootstrap.py --print-env  # shell exports for PATH and TORPOR_*_BIN

Stdlib only: it runs before any Python package is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
# MinIO publishes no semver tags; this pseudo-version is its last commit on the proxy.
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
HELM_VERSION = "v3.22.0"

VERSIONS = {
    "kubernetes": KUBERNETES_VERSION,
    "etcd": ETCD_VERSION,
    "minio": MINIO_VERSION,
    "helm": HELM_VERSION,
}

BINARIES = {
    "kubernetes": ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
    "etcd": ("etcd",),
    "minio": ("minio",),
    "helm": ("helm",),
}


class BootstrapError(RuntimeError):
    """A build step failed; the message names the step and the command."""


def cache_root() -> Path:
    """The cache directory, outside the repository so fresh clones reuse it."""
    env = os.environ.get("TORPOR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torpor"


def tool_dir(name: str) -> Path:
    return cache_root() / "tools" / f"{name}-{VERSIONS[name]}"


def bin_dir(name: str) -> Path:
    return tool_dir(name) / "bin"


def binary(name: str) -> Path:
    """Path of one binary, e.g. ``binary('kube-apiserver')``."""
    for tool, names in BINARIES.items():
        if name in names:
            return bin_dir(tool) / name
    raise KeyError(name)


def is_built(tool: str) -> bool:
    stamp = tool_dir(tool) / "complete.json"
    return stamp.exists() and all((bin_dir(tool) / b).exists() for b in BINARIES[tool])


def go_env() -> dict[str, str]:
    """Go's module and build caches live beside the binaries, so they are reused too."""
    root = cache_root() / "go"
    env = dict(os.environ)
    env.update(
        GOMODCACHE=str(root / "mod"),
        GOCACHE=str(root / "build"),
        GOFLAGS="-modcacherw",
        CGO_ENABLED="0",
        GOTOOLCHAIN="local",
        GOWORK="off",
    )
    return env


@dataclass
class Step:
    tool: str
    what: str


def log(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def run(step: Step, cmd: list[str], cwd: Path, *, capture: bool = False) -> str:
    """Run one command of a build step; a failure names the step and the command."""
    started = time.monotonic()
    log(f"{step.tool}: {step.what}: {' '.join(cmd)}")
    proc = subprocess.run(
        cmd, cwd=cwd, env=go_env(), text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )
    if proc.returncode != 0:
        detail = (proc.stderr or "")[-4000:] if capture else "(see output above)"
        raise BootstrapError(
            f"step '{step.tool}: {step.what}' failed with exit code {proc.returncode}\n"
            f"  command: {' '.join(cmd)}\n  in: {cwd}\n{detail}"
        )
    log(f"{step.tool}: {step.what}: done in {time.monotonic() - started:.1f}s")
    return proc.stdout or ""


def staging_modules(kubernetes_gomod: str) -> list[str]:
    """Names of the staging modules, read from upstream's own replace lines."""
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.\-/]+)\s+=>\s+\./staging/", kubernetes_gomod, re.M)))


def kubernetes_wrapper_gomod(version: str, upstream_gomod: str) -> str:
    """A throw-away module that builds k8s.io/kubernetes commands.

    Upstream requires its staging modules at v0.0.0 and replaces them with ./staging,
    which the module zip lacks; we replace each with its published v0.Y.Z instead.
    """
    staging_version = "v0" + version[2:]  # v1.36.3 -> v0.36.3
    godebug = re.search(r"^godebug\s+.*$", upstream_gomod, re.M)
    go_line = re.search(r"^go\s+\S+$", upstream_gomod, re.M)
    lines = [
        "module torpor.dev/hack/kubernetes-build",
        "",
        go_line.group(0) if go_line else "go 1.26.0",
    ]
    if godebug:
        lines += ["", godebug.group(0)]
    lines += ["", f"require k8s.io/kubernetes {version}", "", "replace ("]
    lines += [f"\t{m} => {m} {staging_version}" for m in staging_modules(upstream_gomod)]
    lines += [")", ""]
    return "\n".join(lines)


def version_ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return "-s -w " + " ".join(flags)


def build_kubernetes(work: Path) -> None:
    version = VERSIONS["kubernetes"]
    step = Step("kubernetes", "read upstream go.mod")
    info = json.loads(run(step, ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"], work, capture=True))
    upstream = Path(info["GoMod"]).read_text()
    (work / "go.mod").write_text(kubernetes_wrapper_gomod(version, upstream))
    (work / "tools.go").write_text("package tools\n")
    cmds = [f"k8s.io/kubernetes/cmd/{b}" for b in BINARIES["kubernetes"]]
    run(Step("kubernetes", "resolve modules"), ["go", "get", *[f"{c}@{version}" for c in cmds]], work)
    out = bin_dir("kubernetes")
    out.mkdir(parents=True, exist_ok=True)
    run(
        Step("kubernetes", "compile (the long one: ~6 min cold on 2 cores)"),
        ["go", "build", "-trimpath", "-ldflags", version_ldflags(version), "-o", str(out) + "/", *cmds],
        work,
    )


def build_etcd(work: Path) -> None:
    # etcd's main package is the root of go.etcd.io/etcd/server/v3; building it from a
    # wrapper avoids the replace directives that make `go install` refuse.
    version = VERSIONS["etcd"]
    (work / "go.mod").write_text("module torpor.dev/hack/etcd-build\n\ngo 1.26.0\n")
    run(Step("etcd", "resolve modules"), ["go", "get", f"go.etcd.io/etcd/server/v3@{version}"], work)
    out = bin_dir("etcd")
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "etcd"), "go.etcd.io/etcd/server/v3"]
    run(Step("etcd", "compile"), cmd, work)


def go_install(tool: str, package: str) -> None:
    out = bin_dir(tool)
    out.mkdir(parents=True, exist_ok=True)
    env_cmd = ["env", f"GOBIN={out}", "go", "install", "-trimpath", "-ldflags", "-s -w", f"{package}@{VERSIONS[tool]}"]
    run(Step(tool, "go install"), env_cmd, Path(tempfile.gettempdir()))


BUILDERS = {
    "kubernetes": build_kubernetes,
    "etcd": build_etcd,
    "minio": lambda work: go_install("minio", "github.com/minio/minio"),
    "helm": lambda work: go_install("helm", "helm.sh/helm/v3/cmd/helm"),
}


def ensure(tool: str) -> Path:
    """Build one tool unless its cached copy is complete; return its bin dir."""
    if is_built(tool):
        log(f"{tool} {VERSIONS[tool]}: cached in {bin_dir(tool)}")
        return bin_dir(tool)
    if shutil.which("go") is None:
        raise BootstrapError(f"step '{tool}: find go' failed: no `go` on PATH (Go >= 1.26 is needed)")
    log(f"{tool} {VERSIONS[tool]}: building into {bin_dir(tool)}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"torpor-build-{tool}-") as tmp:
        BUILDERS[tool](Path(tmp))
    missing = [b for b in BINARIES[tool] if not (bin_dir(tool) / b).exists()]
    if missing:
        raise BootstrapError(f"step '{tool}: check binaries' failed: missing {missing} in {bin_dir(tool)}")
    elapsed = time.monotonic() - started
    (tool_dir(tool) / "complete.json").write_text(
        json.dumps({"version": VERSIONS[tool], "seconds": round(elapsed, 1),
                    "built": time.strftime("%FT%TZ", time.gmtime())})
    )
    log(f"{tool} {VERSIONS[tool]}: built in {elapsed:.1f}s")
    return bin_dir(tool)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tools", nargs="*", default=list(VERSIONS),
                        help=f"tools to build (default: all of {', '.join(VERSIONS)})")
    parser.add_argument("--print-env", action="store_true", help="print shell exports for PATH")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tools if t not in VERSIONS]
    if unknown:
        parser.error(f"unknown tool(s) {unknown}; known: {list(VERSIONS)}")
    started = time.monotonic()
    try:
        dirs = [ensure(t) for t in args.tools]
    except BootstrapError as exc:
        print(f"[bootstrap] FAILED: {exc}", file=sys.stderr)
        return 1
    log(f"all tools ready in {time.monotonic() - started:.1f}s")
    if args.print_env:
        print("export PATH=" + ":".join(str(d) for d in dirs) + ":$PATH")
    return 0


if __name__ == "__main__":
    sys.exit(main())
