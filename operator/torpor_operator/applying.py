"""The imperative shell's hands: read a job's objects from the API and apply a Decision.

Synchronous (the Kubernetes client is); the kopf handlers run these calls in a worker thread.
Every write is idempotent: a create that meets 409 Conflict found the object already there
(creation is keyed by deterministic names), a delete that meets 404 found it gone.

A pod the API *refuses* to create (4xx: a ResourceQuota, Pod Security admission, an invalid
template) never leaves a half-made incarnation holding capacity: the ranks this decision
created are deleted at once (grace 0: they never trained), and when the decision was the
launch itself every pod of that incarnation is, then :class:`CreateRefused` tells the shell,
which shows the API's message and retries with backoff. A create that fails because the API
was away (5xx, no connection) is left as it is: the retry's decision creates the missing ranks.

A decision's pods are created, deleted and annotated in parallel, at most ``workers`` calls at
once (``TORPOR_API_WORKERS``), and every one of them is made whatever the others meet: a
1024-rank launch or stop is not 1024 round trips in a row, and one refusal is answered only
once the rest have been made (the refused launch is then torn down whole).
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client import rest
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from torpor_operator.builders import graceful_exit_data
from torpor_operator.contract import (
    ANNOTATION_SIDECARS_STOPPED,
    API_VERSION,
    GROUP,
    KIND,
    LABEL_INCARNATION,
    LABEL_JOB,
    PLURAL,
    VERSION,
)
from torpor_operator.owning import controlled_by
from torpor_operator.reconciling import Decision, ObjectRef

__all__ = ["PEERING_GROUP", "PEERING_VERSION", "CreateRefused", "KubeClient", "api_message", "refused"]

#: kopf's peering resources (crds/kopfpeerings.yaml).
PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"

log = logging.getLogger("torpor.applying")


def _ignore(status: int, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ApiException as exc:
        if exc.status == status:
            return None
        raise


def refused(exc: BaseException) -> bool:
    """An answer of the API that a retry alone will not change (400..499 but 409 Conflict and
    429 Too Many Requests): admission, quota, validation, authorisation."""
    return isinstance(exc, ApiException) and bool(exc.status) and 400 <= exc.status < 500 \
        and exc.status not in (409, 429)


def api_message(exc: BaseException) -> str:
    """What the API said: the Status object's ``message``, else the HTTP reason, else the exception."""
    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "").get("message")
        except (ValueError, AttributeError):
            message = None
        return str(message or f"{exc.status} {exc.reason}".strip())
    return f"{type(exc).__name__}: {exc}"


class CreateRefused(Exception):
    """The API refused to create one of a decision's objects; what was torn down because of it."""

    def __init__(self, kind: str, name: str, cause: ApiException, torn_down: list[str]) -> None:
        super().__init__(api_message(cause))
        self.kind, self.name, self.cause, self.torn_down = kind, name, cause, torn_down


def _missing_namespace(exc: ApiException) -> bool:
    """A 404 that names a namespace (not a resource type the API server does not serve)."""
    try:
        details = json.loads(exc.body or "").get("details") or {}
    except ValueError:  # "404 page not found": the resource type itself is unknown
        return False
    return exc.status == 404 and details.get("kind") == "namespaces"


def _items(response: Any) -> list[dict[str, Any]]:
    """The items of a raw list response, as the API sent them.

    Lists are read unparsed (``_preload_content=False``): building the client's model objects
    only to serialise them back to dictionaries cost CPU for nothing (about 15 % of the
    operator's CPU in ``bench/bench_operator_scale.py``, a noisy figure).
    """
    return list(json.loads(response.data).get("items") or [])


def _drained(response: Any) -> None:
    """Read and drop a response left unparsed (``_preload_content=False``): its connection goes
    back to the pool. For writes whose answer nothing reads (a pod's annotations, a delete):
    parsing the pod into the client's models held the GIL that the other patches of a stop
    wait for (``bench/bench_annotate.py``)."""
    response.read()
    response.release_conn()


class KubeClient:
    """The few API calls the operator makes, each named for what it does."""

    def __init__(self, api: client.ApiClient, workers: int = 16) -> None:
        """``workers``: most pod patches of one decision in flight at once (``TORPOR_API_WORKERS``)."""
        self.api = api
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="torpor-api")
        # urllib3 keeps cpu_count * 5 connections by default: more parallel patches than that
        # would open and discard a connection each time instead of reusing one
        if (api.configuration.connection_pool_maxsize or 0) < workers:
            api.configuration.connection_pool_maxsize = workers
            api.rest_client = rest.RESTClientObject(api.configuration)  # the pool is sized when built
        self.core = client.CoreV1Api(api)
        self.policy = client.PolicyV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    # --- reading ---

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The TrainingJob, or ``None`` once it is gone."""
        return _ignore(404, lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    def read_peering(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        """The records (``status``) of kopf's peering object ``name`` — the ClusterKopfPeering when
        ``namespace`` is ``None``, else the KopfPeering there — or ``None`` if it does not exist."""
        if namespace is None:
            body = _ignore(404, lambda: self.custom.get_cluster_custom_object(
                PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", name))
        else:
            body = _ignore(404, lambda: self.custom.get_namespaced_custom_object(
                PEERING_GROUP, PEERING_VERSION, namespace, "kopfpeerings", name))
        return None if body is None else dict(body.get("status") or {})

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret as the API sends it (``data`` base64-encoded), or ``None`` if it does not exist.
        Read raw: the client's model would be serialised back to a dict for nothing."""
        response = _ignore(404, lambda: self.core.read_namespaced_secret(name, namespace, _preload_content=False))
        return None if response is None else dict(json.loads(response.data))

    def list_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """Every pod labelled with the job's name, all incarnations (also those an earlier job of
        the name left: :func:`torpor_operator.owning.controlled_by` tells them apart)."""
        return _items(self.core.list_namespaced_pod(namespace, label_selector=f"{LABEL_JOB}={job}",
                                                    _preload_content=False))

    def list_pods_at(self, namespace: str, job: str) -> tuple[list[dict[str, Any]], str | None]:
        """:meth:`list_pods` and the list's resourceVersion (for :meth:`PodIndex.seed`)."""
        response = self.core.list_namespaced_pod(namespace, label_selector=f"{LABEL_JOB}={job}",
                                                 _preload_content=False)
        body = json.loads(response.data)
        return list(body.get("items") or []), (body.get("metadata") or {}).get("resourceVersion")

    def list_children(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """The Services, ConfigMaps and PodDisruptionBudgets labelled with the job's name, with kind and
        apiVersion set (as for pods, not all need be the job's own)."""
        selector = f"{LABEL_JOB}={job}"
        kinds = (("Service", "v1", self.core.list_namespaced_service),
                 ("ConfigMap", "v1", self.core.list_namespaced_config_map),
                 ("PodDisruptionBudget", "policy/v1", self.policy.list_namespaced_pod_disruption_budget))

        def listed(kind: str, api_version: str, listing: Callable[..., Any]) -> list[dict[str, Any]]:
            objs = _items(listing(namespace, label_selector=selector, _preload_content=False))
            for obj in objs:
                obj.update(kind=kind, apiVersion=api_version)
            return objs

        # at once: the three round trips overlap
        return [obj for objs in self._pool.map(lambda k: listed(*k), kinds) for obj in objs]

    # --- writing ---

    def ensure_peering(self, name: str, namespace: str | None) -> bool:
        """Create kopf's peering object ``name`` unless it exists: a ClusterKopfPeering when
        ``namespace`` is ``None``, else a KopfPeering in ``namespace``.

        kopf never creates it, and without it a replica with peering waits, paused, forever.

        Returns:
            ``False`` when ``namespace`` does not exist, ``True`` when the object exists now.

        Raises:
            ApiException: 404 when the kopf.dev peering CRDs are not installed; any other
                refusal.
        """
        kind = "ClusterKopfPeering" if namespace is None else "KopfPeering"
        body = {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": kind, "metadata": {"name": name}}
        try:
            if namespace is None:
                self.custom.create_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", body)
            else:
                self.custom.create_namespaced_custom_object(PEERING_GROUP, PEERING_VERSION, namespace,
                                                            "kopfpeerings", body)
        except ApiException as exc:
            if exc.status == 409:
                return True
            if _missing_namespace(exc):
                return False
            raise
        log.info("created %s %s%s", kind, name, f" in {namespace}" if namespace else "")
        return True

    def apply(self, namespace: str, job: str, decision: Decision) -> dict[str, Any] | None:
        """Apply a decision in its documented order, Events last.

        Returns:
            The job as the status patch left it (so the shell knows its watch event for its own
            write), or ``None`` when the decision patched no status or the job is gone.

        Raises:
            CreateRefused: the API refused a create (after the teardown described above).
        """
        # the other children first, in order (the pods mount the ConfigMap, the PDB guards them)
        others = [o for o in decision.create if o["kind"] != "Pod"]
        pods = [o for o in decision.create if o["kind"] == "Pod"]
        for obj in others:
            try:
                self._create(namespace, obj)
            except ApiException as exc:
                if not refused(exc):
                    raise
                raise CreateRefused(obj["kind"], obj["metadata"]["name"], exc,
                                    self._tear_down(namespace, job, decision, obj, [])) from exc
        failures = self._each(lambda obj: self._create(namespace, obj), pods)
        if any(f is not None for f in failures):
            created = [o["metadata"]["name"] for o, f in zip(pods, failures, strict=True) if f is None]
            refusal = next(((o, f) for o, f in zip(pods, failures, strict=True)
                            if isinstance(f, ApiException) and refused(f)), None)
            if refusal is not None:
                obj, exc = refusal
                raise CreateRefused(obj["kind"], obj["metadata"]["name"], exc,
                                    self._tear_down(namespace, job, decision, obj, created)) from exc
            raise next(f for f in failures if f is not None)
        # pods in parallel; the other kinds (a Service, ConfigMaps, a PDB) one by one
        pod_refs = [r for r in decision.delete if r.kind == "Pod"]
        for ref in decision.delete:
            if ref.kind != "Pod":
                self._delete(namespace, ref)
        failures = self._each(lambda ref: self._delete(namespace, ref), pod_refs)
        failed = next((f for f in failures if f is not None), None)
        if failed is not None:
            raise failed
        if decision.graceful_exit is not None:
            name, value = decision.graceful_exit
            _ignore(404, lambda: _drained(self.core.patch_namespaced_config_map(
                name, namespace, {"data": graceful_exit_data(value)}, _preload_content=False)))
        self._annotate(namespace, job, decision.annotate)
        for pod in decision.stop_sidecars:
            # one patch: the mark that says the deadline is the operator's comes with the deadline
            stop = {"metadata": {"annotations": {ANNOTATION_SIDECARS_STOPPED: datetime.now(UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ")}}, "spec": {"activeDeadlineSeconds": 1}}
            _ignore(404, lambda pod=pod, stop=stop: _drained(
                self.core.patch_namespaced_pod(pod, namespace, stop, _preload_content=False)))
        if decision.status:
            # 404: the job was deleted since it was read; its children go with it
            return self.patch_status(namespace, job, decision.status)
        return None

    def _each(self, call: Callable[[Any], Any], items: Sequence[Any]) -> list[BaseException | None]:
        """``call`` on every item, up to ``workers`` at once; per item the exception it raised or
        ``None``. Every call is made whatever the others do: one refused pod never keeps the
        rest of a launch or a stop from being made."""

        def one(item: Any) -> BaseException | None:
            try:
                call(item)
            except Exception as exc:
                return exc
            return None

        if len(items) <= 1:
            return [one(item) for item in items]
        return list(self._pool.map(one, items))

    def _annotate(self, namespace: str, job: str, annotate: tuple[tuple[str, dict[str, str]], ...]) -> None:
        """Patch the pods' annotations in parallel, at most ``workers`` at once.

        Every patch is attempted whatever the others do: a pod gone meanwhile (404) is not an
        error, and any other failure is raised only once all patches have ended, so one refused
        pod never keeps the rest of a stop from being told. The raise makes the shell retry the
        reconcile, which annotates only the pods that still lack the mark.

        Raises:
            ApiException, HTTPError: the first patch that failed (each failure is logged).
        """
        if not annotate:
            return
        started = time.monotonic()

        def patch(pod: str, marks: dict[str, str]) -> None:
            _ignore(404, lambda: _drained(self.core.patch_namespaced_pod(
                pod, namespace, {"metadata": {"annotations": marks}}, _preload_content=False)))

        failures = self._each(lambda item: patch(*item), annotate)
        failed = [(pod, exc) for (pod, _), exc in zip(annotate, failures, strict=True) if exc is not None]
        for pod, exc in failed:
            log.warning("%s/%s: annotating pod %s failed, retried with the reconcile: %s", namespace, job, pod,
                        api_message(exc))
        # the parallelism is observable here; bench/ measures GracefulExit -> every pod annotated
        log.info("%s/%s: annotated %d of %d pods with up to %d in parallel in %.3f s", namespace, job,
                 len(annotate) - len(failed), len(annotate), min(self.workers, len(annotate)),
                 time.monotonic() - started)
        if failed:
            raise failed[0][1]

    def _tear_down(self, namespace: str, job: str, decision: Decision, refused_obj: dict[str, Any],
                   created: list[str]) -> list[str]:
        """Delete the pods of a refused incarnation (see the module's docstring); their names."""
        doomed = set(created)
        meta = refused_obj.get("metadata") or {}
        incarnation = (meta.get("labels") or {}).get(LABEL_INCARNATION)
        uid = next((r.get("uid") for r in meta.get("ownerReferences") or [] if r.get("controller")), "")
        if incarnation is not None and str((decision.status or {}).get("incarnation")) == incarnation:
            # the launch itself was refused: no rank of the incarnation may wait for the others
            # (only the job's own: an earlier job of the name may have left pods under these labels)
            doomed |= {p["metadata"]["name"] for p in self.list_pods(namespace, job)
                       if (p["metadata"].get("labels") or {}).get(LABEL_INCARNATION) == incarnation
                       and controlled_by(p, uid)}
        refs = [ObjectRef("v1", "Pod", name, grace_period_seconds=0) for name in sorted(doomed)]
        failures = self._each(lambda ref: self._delete(namespace, ref), refs)
        failed = next((f for f in failures if f is not None), None)
        if failed is not None:
            raise failed
        if doomed:
            log.warning("%s/%s: creating %s %s was refused; deleted %s so that no half incarnation holds capacity",
                        namespace, job, refused_obj["kind"], refused_obj["metadata"]["name"], ", ".join(sorted(doomed)))
        return sorted(doomed)

    def delete_job(self, namespace: str, job: str) -> None:
        """Delete the TrainingJob (a 404 is not an error); its children go by owner references."""
        _ignore(404, lambda: self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, job, propagation_policy="Background"))

    def patch_status(self, namespace: str, job: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the job's ``.status``; the job as patched, ``None`` if it is gone (not an error)."""
        return _ignore(404, lambda: self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, job, {"status": patch}))

    def post_events(self, body: dict[str, Any], decision: Decision) -> None:
        """Post the decision's Events; a failed post is logged, never fatal."""
        for event in decision.events:
            try:
                self.post_event(body, event.type, event.reason, event.message)
            except (ApiException, HTTPError) as exc:  # the API away: the decision is applied, only its Event lost
                log.warning("event %s on %s/%s not posted: %s", event.reason, body["metadata"].get("namespace"),
                            body["metadata"].get("name"), api_message(exc))

    def post_event(self, job: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event on the job (kopf's own poster works only inside its handler tasks)."""
        meta = job["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": job.get("apiVersion", API_VERSION), "kind": job.get("kind", KIND),
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "torpor-operator"},
            "reportingComponent": "torpor.dev/operator",
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.core.create_namespaced_event(meta["namespace"], event)

    def _create(self, namespace: str, obj: dict[str, Any]) -> None:
        create = {
            "Pod": self.core.create_namespaced_pod,
            "Service": self.core.create_namespaced_service,
            "ConfigMap": self.core.create_namespaced_config_map,
            "PodDisruptionBudget": self.policy.create_namespaced_pod_disruption_budget,
        }[obj["kind"]]
        if _ignore(409, lambda: create(namespace, obj)) is None:
            log.info("%s %s/%s exists already", obj["kind"], namespace, obj["metadata"]["name"])

    def delete_object(self, namespace: str, ref: ObjectRef) -> None:
        """Delete one child (a 404 is not an error)."""
        self._delete(namespace, ref)

    def _delete(self, namespace: str, ref: ObjectRef) -> None:
        delete = {
            "Pod": self.core.delete_namespaced_pod,
            "Service": self.core.delete_namespaced_service,
            "ConfigMap": self.core.delete_namespaced_config_map,
            "PodDisruptionBudget": self.policy.delete_namespaced_pod_disruption_budget,
        }[ref.kind]
        options: dict[str, Any] = {"propagation_policy": "Background"}
        if ref.grace_period_seconds is not None:  # 0: a force deletion (a pod of a lost node)
            options["grace_period_seconds"] = ref.grace_period_seconds
        _ignore(404, lambda: _drained(delete(ref.name, namespace, _preload_content=False, **options)))

