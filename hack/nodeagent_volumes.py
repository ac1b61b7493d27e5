"""Volume contents and environment variables, the way kubelet computes them.

Everything here is a pure function of the pod (a JSON dictionary) and of a `fetch`
callable that reads ConfigMaps and Secrets; nothing here starts processes or talks to the
API server directly. `nodeagent_pods` decides when to call it.

ConfigMap, Secret, downwardAPI and projected volumes are written with kubelet's
"atomic writer" layout, so that a reader never sees half an update::

    <volume dir>/..2025_01_02_03_04_05.123456_ab12/   the files of one version
    <volume dir>/..data -> ..2025_01_02_03_04_05.123456_ab12
    <volume dir>/<key>  -> ..data/<key>                one symlink per top-level entry

An update writes a new timestamped directory, points a temporary `..data_tmp` symlink at it
and renames that over `..data` (one atomic `rename(2)`), then fixes the top-level symlinks
and removes the old directory.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

JsonDict = dict[str, Any]
# (kind, namespace, name) -> the object, or None if it does not exist.
Fetch = Callable[[str, str, str], JsonDict | None]
# relative path -> (content, file mode)
Payload = dict[str, tuple[bytes, int]]

DATA_LINK = "..data"


class ConfigError(Exception):
    """The pod refers to something that does not exist (yet); kubelet retries these.

    The message is what kubelet would put in the container's waiting state.
    """


# ---------------------------------------------------------------------------------------
# The atomic writer


def write_atomic(target: Path, payload: Payload) -> bool:
    """Make `target` hold exactly `payload`, swapping versions atomically.

    Returns:
        True when the contents changed (or were written for the first time).
    """
    target.mkdir(parents=True, exist_ok=True)
    data_link = target / DATA_LINK
    old_version = os.readlink(data_link) if data_link.is_symlink() else None
    if old_version is not None and _read_payload(target / old_version) == payload:
        return False

    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}"
    version = f"..{stamp}_{secrets.token_hex(2)}"
    version_dir = target / version
    version_dir.mkdir(mode=0o755)
    for rel, (content, mode) in payload.items():
        path = version_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    tmp_link = target / f"{DATA_LINK}_tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(version)
    os.rename(tmp_link, data_link)

    wanted = {rel.split("/", 1)[0] for rel in payload}
    for name in wanted:
        link = target / name
        if not link.is_symlink():
            link.symlink_to(f"{DATA_LINK}/{name}")
    for entry in target.iterdir():
        if not entry.name.startswith("..") and entry.is_symlink() and entry.name not in wanted:
            entry.unlink()
    if old_version is not None:
        shutil.rmtree(target / old_version, ignore_errors=True)
    return True


def _read_payload(version_dir: Path) -> Payload:
    payload: Payload = {}
    for root, _dirs, files in os.walk(version_dir):
        for name in files:
            path = Path(root, name)
            payload[str(path.relative_to(version_dir))] = (path.read_bytes(), path.stat().st_mode & 0o7777)
    return payload


# ---------------------------------------------------------------------------------------
# Volume payloads


def volume_payload(pod: JsonDict, volume: JsonDict, fetch: Fetch, token: Callable[[JsonDict], bytes]) -> Payload:
    """The files of a ConfigMap, Secret, downwardAPI or projected volume.

    Args:
        pod: the pod.
        volume: one entry of `spec.volumes`.
        fetch: reads ConfigMaps and Secrets.
        token: returns a service-account token for a `serviceAccountToken` projection.

    Raises:
        ConfigError: a referenced object or key is missing and not optional.
    """
    ns = pod["metadata"]["namespace"]
    if "configMap" in volume:
        src = volume["configMap"]
        return _object_payload("ConfigMap", ns, src, fetch, src.get("defaultMode", 0o644))
    if "secret" in volume:
        src = dict(volume["secret"], name=volume["secret"].get("secretName"))
        return _object_payload("Secret", ns, src, fetch, src.get("defaultMode", 0o644))
    if "downwardAPI" in volume:
        src = volume["downwardAPI"]
        return _downward_payload(pod, src.get("items", []), src.get("defaultMode", 0o644))
    if "projected" in volume:
        src = volume["projected"]
        mode = src.get("defaultMode", 0o644)
        payload: Payload = {}
        for source in src.get("sources", []):
            if "configMap" in source:
                payload.update(_object_payload("ConfigMap", ns, source["configMap"], fetch, mode))
            elif "secret" in source:
                payload.update(_object_payload("Secret", ns, source["secret"], fetch, mode))
            elif "downwardAPI" in source:
                payload.update(_downward_payload(pod, source["downwardAPI"].get("items", []), mode))
            elif "serviceAccountToken" in source:
                sat = source["serviceAccountToken"]
                payload[sat["path"]] = (token(sat), mode)
        return payload
    raise ValueError(f"not a refreshed volume type: {sorted(volume)}")


def is_refreshed(volume: JsonDict) -> bool:
    """Whether kubelet keeps this volume's files in sync with the API."""
    return any(kind in volume for kind in ("configMap", "secret", "downwardAPI", "projected"))


def _object_payload(kind: str, ns: str, src: JsonDict, fetch: Fetch, default_mode: int) -> Payload:
    name = src.get("name", "")
    optional = bool(src.get("optional"))
    obj = fetch(kind, ns, name)
    if obj is None:
        if optional:
            return {}
        raise ConfigError(f'{kind.lower()} "{name}" not found')
    data = _object_data(kind, obj)
    items = src.get("items")
    if not items:
        return {key: (value, default_mode) for key, value in data.items()}
    payload: Payload = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise ConfigError(f"couldn't find key {item['key']} in {kind} {ns}/{name}")
        payload[item["path"]] = (data[item["key"]], item.get("mode", default_mode))
    return payload


def _object_data(kind: str, obj: JsonDict, binary: bool = True) -> dict[str, bytes]:
    """A ConfigMap's or Secret's keys, decoded; `binary=False` leaves out `binaryData` (env)."""
    if kind == "Secret":
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    if binary:
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def _downward_payload(pod: JsonDict, items: list[JsonDict], default_mode: int) -> Payload:
    payload: Payload = {}
    for item in items:
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"]["fieldPath"])
        else:
            container = _container(pod, item["resourceFieldRef"].get("containerName"))
            value = resource_value(container, item["resourceFieldRef"])
        payload[item["path"]] = (value.encode(), item.get("mode", default_mode))
    return payload


# ---------------------------------------------------------------------------------------
# Downward API values

_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: JsonDict, field_path: str) -> str:
    """The value of a downward-API `fieldRef.fieldPath` for this pod."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    match = _SUBSCRIPT.match(field_path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.podIP": status.get("podIP", ""),
        "status.hostIPs": ",".join(ip["ip"] for ip in status.get("hostIPs") or []),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs") or []),
    }
    if field_path in simple:
        return simple[field_path]
    if field_path in ("metadata.labels", "metadata.annotations"):
        mapping = meta.get(field_path.split(".")[1]) or {}
        return "\n".join(f"{k}={json.dumps(mapping[k])}" for k in sorted(mapping))
    raise ConfigError(f"unsupported fieldPath {field_path!r}")


_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def parse_quantity(text: str | int | float) -> Decimal:
    """A Kubernetes quantity ("500m", "16Gi", "2") as a number."""
    match = re.fullmatch(r"([0-9.eE+-]+?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|)", str(text).strip())
    if not match:
        raise ValueError(f"not a quantity: {text!r}")
    return Decimal(match.group(1)) * Decimal(_SUFFIXES[match.group(2)])


# What a container without a limit gets (the node's allocatable, as kubelet reports it).
NODE_ALLOCATABLE = {"cpu": "8", "memory": "16Gi", "ephemeral-storage": "100Gi", "pods": "110"}


def resource_value(container: JsonDict, ref: JsonDict) -> str:
    """The value of a `resourceFieldRef` (limits.cpu, requests.memory, ...), rounded up."""
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(resource)
    if raw is None:
        raw = NODE_ALLOCATABLE.get(resource, "0") if kind == "limits" else "0"
    divisor = parse_quantity(ref.get("divisor") or "1") or Decimal(1)  # the API defaults it to "0"
    return str(math.ceil(parse_quantity(raw) / divisor))


def _container(pod: JsonDict, name: str | None) -> JsonDict:
    containers = pod["spec"]["containers"] + (pod["spec"].get("initContainers") or [])
    for container in containers:
        if name is None or container["name"] == name:
            return container
    raise ConfigError(f"no container named {name!r}")


# ---------------------------------------------------------------------------------------
# Environment


def container_env(pod: JsonDict, container: JsonDict, fetch: Fetch) -> dict[str, str]:
    """The variables a container declares (`envFrom`, then `env`, with `$(VAR)` expanded).

    Raises:
        ConfigError: a referenced ConfigMap, Secret or key is missing and not optional.
    """
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind, ref = (
            ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        )
        obj = fetch(kind, ns, ref["name"])
        if obj is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
        for key, value in _object_data(kind, obj, binary=False).items():
            env[source.get("prefix", "") + key] = value.decode(errors="replace")
    for var in container.get("env") or []:
        if "valueFrom" not in var:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[var["name"]] = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            env[var["name"]] = resource_value(_container(pod, ref.get("containerName") or container["name"]), ref)
        else:
            kind, ref = (
                ("ConfigMap", source["configMapKeyRef"])
                if "configMapKeyRef" in source
                else ("Secret", source["secretKeyRef"])
            )
            obj = fetch(kind, ns, ref["name"])
            data = _object_data(kind, obj, binary=False) if obj is not None else {}
            if ref["key"] in data:
                env[var["name"]] = data[ref["key"]].decode(errors="replace")
            elif not ref.get("optional"):
                what = f'{kind.lower()} "{ref["name"]}"'
                raise ConfigError(f"couldn't find key {ref['key']} in {what}" if obj else f"{what} not found")
    return env


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known variables are replaced, `$$` escapes `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(replace, text)
