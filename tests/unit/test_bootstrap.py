"""The tool bootstrap's pure parts: reading upstream's go.mod and writing the wrapper."""

from __future__ import annotations

from pathlib import Path

import bootstrap

UPSTREAM = """module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

require (
\tk8s.io/api v0.0.0
\tgithub.com/foo/bar v1.2.3
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/streaming => ./staging/src/k8s.io/streaming
)
"""


def test_staging_modules_are_read_from_upstream_replaces() -> None:
    assert bootstrap.staging_modules(UPSTREAM) == ["k8s.io/api", "k8s.io/client-go", "k8s.io/streaming"]


def test_wrapper_pins_every_staging_module_to_the_matching_v0_release() -> None:
    gomod = bootstrap.kubernetes_wrapper_gomod("v1.36.3", UPSTREAM)
    assert "require k8s.io/kubernetes v1.36.3" in gomod
    assert "\tk8s.io/api => k8s.io/api v0.36.3" in gomod
    assert "\tk8s.io/streaming => k8s.io/streaming v0.36.3" in gomod
    assert "godebug default=go1.26" in gomod
    assert "./staging" not in gomod


def test_version_stamps_name_the_real_tag() -> None:
    flags = bootstrap.version_ldflags("v1.36.3")
    assert "-X k8s.io/component-base/version.gitVersion=v1.36.3" in flags
    assert "-X k8s.io/client-go/pkg/version.gitMinor=36" in flags


def test_cache_is_outside_the_repository_and_keyed_by_version(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORPOR_CACHE", str(tmp_path))
    assert bootstrap.bin_dir("etcd") == tmp_path / "tools" / f"etcd-{bootstrap.ETCD_VERSION}" / "bin"
    kube_dir = tmp_path / "tools" / f"kubernetes-{bootstrap.KUBERNETES_VERSION}" / "bin"
    assert bootstrap.binary("kubectl").parent == kube_dir
    assert not bootstrap.is_built("etcd")


def test_unknown_tool_is_refused_by_name(capsys) -> None:
    try:
        bootstrap.main(["kind"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "unknown tool(s) ['kind']" in capsys.readouterr().err
