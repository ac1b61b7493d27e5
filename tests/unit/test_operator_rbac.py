"""The operator's RBAC rules file: least privilege, and enough for every call the operator makes."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "torpor_operator"

# Every Kubernetes API method the shell calls -> (group, resource, verb) it needs.
CALLS = {
    "get_namespaced_custom_object": ("torpor.dev", "trainingjobs", "get"),
    "patch_namespaced_custom_object_status": ("torpor.dev", "trainingjobs/status", "patch"),
    "delete_namespaced_custom_object": ("torpor.dev", "trainingjobs", "delete"),  # ttlSecondsAfterFinished
    "list_namespaced_pod": ("", "pods", "list"),
    "create_namespaced_pod": ("", "pods", "create"),
    "delete_namespaced_pod": ("", "pods", "delete"),
    "patch_namespaced_pod": ("", "pods", "patch"),
    "list_namespaced_service": ("", "services", "list"),
    "create_namespaced_service": ("", "services", "create"),
    "delete_namespaced_service": ("", "services", "delete"),
    "list_namespaced_config_map": ("", "configmaps", "list"),
    "create_namespaced_config_map": ("", "configmaps", "create"),
    "delete_namespaced_config_map": ("", "configmaps", "delete"),
    "patch_namespaced_config_map": ("", "configmaps", "patch"),
    "list_namespaced_pod_disruption_budget": ("policy", "poddisruptionbudgets", "list"),
    "create_namespaced_pod_disruption_budget": ("policy", "poddisruptionbudgets", "create"),
    "delete_namespaced_pod_disruption_budget": ("policy", "poddisruptionbudgets", "delete"),
    "create_namespaced_event": ("", "events", "create"),
    "read_namespaced_secret": ("", "secrets", "get"),  # a job's credentialsSecret, by name
}
# Calls made only with TORPOR_PEERING, granted by peeringRules.
PEERING_CALLS = {
    "create_cluster_custom_object": ("kopf.dev", "clusterkopfpeerings", "create"),
    "create_namespaced_custom_object": ("kopf.dev", "kopfpeerings", "create"),
    "get_cluster_custom_object": ("kopf.dev", "clusterkopfpeerings", "get"),
}
# KubeClient.read_peering also reads a KopfPeering with get_namespaced_custom_object (listed in
# CALLS for the TrainingJob): the one method serves both resources.
PEERING_ALSO = [("kopf.dev", "kopfpeerings", "get")]
# What kopf's peering does: watch the peering objects, patch its keep-alive into their status.
KOPF_PEERING = [(g, r, v) for g in ("kopf.dev",) for r in ("kopfpeerings", "clusterkopfpeerings")
                for v in ("list", "watch", "patch")]
# What kopf does on the operator's behalf (watches of the handlers' resources, its annotations).
KOPF = [
    ("torpor.dev", "trainingjobs", "list"), ("torpor.dev", "trainingjobs", "watch"),
    ("torpor.dev", "trainingjobs", "patch"), ("", "pods", "watch"), ("", "nodes", "list"), ("", "nodes", "watch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    # kopf lists and watches namespaces at start-up even for a fixed namespace list; without
    # them it logs a 403 and falls back to the given list.
    ("", "namespaces", "list"), ("", "namespaces", "watch"),
]


def rules() -> dict[str, list[dict[str, list[str]]]]:
    return yaml.safe_load((PACKAGE / "rbac.yaml").read_text())


def granted(sections: tuple[str, ...] = ("clusterRules", "namespacedRules")) -> set[tuple[str, str, str]]:
    out = set()
    for section in sections:
        for rule in rules()[section]:
            out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def test_no_wildcards_and_well_formed() -> None:
    doc = rules()
    assert set(doc) == {"clusterRules", "namespacedRules", "peeringRules"}
    for section, items in doc.items():
        for rule in items:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, section
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], f"{section}: {key} uses *"


def test_every_call_in_the_shell_is_granted() -> None:
    source = "\n".join(p.read_text() for p in PACKAGE.glob("*.py"))
    called = set(re.findall(r"\.((?:get|read|list|create|delete|patch)_namespaced_\w+)\(", source))
    called |= set(re.findall(r"self\.(?:core|policy|custom)\.((?:get|read|list|create|delete|patch)_\w+)", source))
    assert called <= set(CALLS) | set(PEERING_CALLS), \
        f"calls missing from this test's tables: {called - set(CALLS) - set(PEERING_CALLS)}"
    missing = {CALLS[c] for c in called if c in CALLS} - granted()
    assert not missing, f"rbac.yaml lacks {missing}"
    missing = {PEERING_CALLS[c] for c in called if c in PEERING_CALLS} - granted(("peeringRules",))
    assert not missing, f"rbac.yaml's peeringRules lack {missing}"


def test_peering_rules_are_what_peering_uses() -> None:
    needed = set(PEERING_CALLS.values()) | set(KOPF_PEERING) | set(PEERING_ALSO)
    assert needed <= granted(("peeringRules",))
    unused = granted(("peeringRules",)) - needed
    assert not unused, f"granted but never used: {unused}"


def test_what_kopf_needs_is_granted() -> None:
    assert set(KOPF) <= granted()


def test_nothing_beyond_what_is_used() -> None:
    needed = set(CALLS.values()) | set(KOPF) | {
        ("torpor.dev", "trainingjobs/finalizers", "update"),  # ownerReferences with blockOwnerDeletion
        ("torpor.dev", "trainingjobs/status", "get"),
        ("", "pods", "get"), ("", "nodes", "get"), ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("events.k8s.io", "events", "create"),
    }
    assert granted() <= needed, f"granted but never used: {granted() - needed}"
