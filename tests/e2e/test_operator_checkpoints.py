"""The operator's own work on a job's checkpoints (issue 12, items 12, 15 and 17; issue 11's sharded
checkpoints), against MinIO.

Retention and the abort of stale multipart uploads are the operator's: the ranks here keep
every checkpoint (``TORPOR_KEEP_MAX=0`` in their own environment, over the operator's value),
so whatever is pruned, the operator pruned. ``deleteOnJobDeletion`` stops the ranks before it
deletes the prefix. A job on a store of its own (a second MinIO, other credentials) is listed
and pruned there, with the job's Secret; a job whose Secret is missing says so in ``Ready``.

Real control plane, node agent, MinIO servers and ``examples/train.py`` ranks.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from s3server import MinioServer
from torpor.checkpoints import FileKind, file_key, scan
from torpor.retention import RetentionPolicy, candidates, to_delete
from torpor.storage import open_storage

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster

#: Multipart uploads of a doomed incomplete checkpoint older than 5 s are stale here (the default
#: is an hour), so a test can make one without waiting long for it to age; longer than a retention
#: pass (2 s), so the first pass after a simulated kill always meets a young upload.
OPERATOR_ENV = {"TORPOR_STALE_UPLOAD_SECONDS": "5"}


def keep_everything(body: dict[str, Any]) -> dict[str, Any]:
    """The job with ranks that prune nothing: ``TORPOR_KEEP_MAX=0`` set in the ranks' own process
    over the operator's value (``env`` runs the trainer), so only the operator deletes."""
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["env", "TORPOR_KEEP_MAX=0", sys.executable, "examples/train.py"]
    return body


@pytest.fixture(scope="module")
def other_minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """A second store: another port, other credentials than the operator's own."""
    with MinioServer(tmp_path_factory.mktemp("minio-other")) as server:
        yield server


def other_client(server: MinioServer) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                        aws_secret_access_key=server.secret_key, region_name="us-east-1")


def create_secret(e2e: Env, name: str, server: MinioServer) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
              "stringData": {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}}
    e2e.kubectl("create", "-f", "-", input=json.dumps(secret))


def settled(e2e: Env, count: int) -> list[str] | None:
    names = sorted(c.name for c in e2e.checkpoints())
    return names if len(names) == count else None


def test_retention_is_the_operators_when_the_ranks_keep_everything(e2e: Env) -> None:
    e2e.create(keep_everything(e2e.example("--max-steps", "60", "--step-delay", "0", "--losses", str(e2e.losses()),
                                           checkpoint={"saveSteps": 4, "keepMax": 3})))
    e2e.wait_phase("Succeeded", timeout=180)
    assert len([s for s in e2e.steps() if s["rank"] == 0]) == 60  # 15 saves, at steps 4, 8, ... 60

    names = e2e.wait("the operator's retention", lambda: settled(e2e, 3), timeout=60)
    scanned = e2e.checkpoints()
    assert all(c.complete for c in scanned)
    assert sorted(c.step for c in scanned) == [52, 56, 60], names
    # the runtime's own policy, applied to this listing, deletes nothing more
    assert to_delete(candidates(scanned), RetentionPolicy(keep_max=3)) == []
    # and nothing else is left under the prefix: 3 checkpoints x 2 ranks x (shard + manifest)
    assert {k.split("/")[0] for k in e2e.object_keys()} == {"rank_0", "rank_1"}
    assert all(k.rsplit("/", 1)[1].split(".")[0] in names for k in e2e.object_keys()), e2e.object_keys()


def test_a_sharded_jobs_checkpoints_are_pruned_whole_by_the_operator(e2e: Env) -> None:
    # examples/fsdp2.py on 2 ranks: each checkpoint is both ranks' .distcp shards beside their
    # .ckpt and manifest; the operator keeps the newest two and leaves no shard of the others.
    body = keep_everything(e2e.example(checkpoint={"saveSteps": 3, "keepMax": 2}))
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["env", "TORPOR_KEEP_MAX=0", sys.executable, "examples/fsdp2.py"]
    container["args"] = ["--epochs", "1", "--max-steps", "12"]
    e2e.create(body)
    e2e.wait_phase("Succeeded", timeout=180)

    names = e2e.wait("the operator's retention", lambda: settled(e2e, 2), timeout=60)
    scanned = e2e.checkpoints()
    assert sorted(c.step for c in scanned) == [9, 12] and all(c.complete and c.world_size == 2 for c in scanned)
    keys = e2e.object_keys()
    assert {f"rank_{r}/{n}.distcp" for r in (0, 1) for n in names} <= set(keys), keys
    assert all(k.rsplit("/", 1)[1].split(".")[0] in names for k in keys), keys


def test_a_stale_multipart_upload_of_a_killed_save_is_aborted(e2e: Env) -> None:
    e2e.create(keep_everything(e2e.example("--max-steps", "20", "--step-delay", "0",
                                           checkpoint={"saveSteps": 4, "keepMax": 3})))
    e2e.wait_phase("Succeeded", timeout=180)
    names = e2e.wait("the operator's retention", lambda: settled(e2e, 3), timeout=60)  # steps 12, 16, 20

    # the oldest kept save, as if rank 1 was killed while uploading its shard: its shard is an
    # incomplete multipart upload (one part stored), it never wrote its manifest. The upload
    # first, as a save makes it; a pass may come at any moment after the delete, while the upload
    # is younger than the bound: the checkpoint must then wait for a later pass, not go without it.
    s3 = boto3.client("s3")
    prefix = f"runs/{e2e.ns}/mlp"
    killed = names[0]
    shard = f"{prefix}/{file_key(killed, 1, FileKind.SHARD)}"
    upload = s3.create_multipart_upload(Bucket=e2e.bucket, Key=shard)["UploadId"]
    s3.upload_part(Bucket=e2e.bucket, Key=shard, UploadId=upload, PartNumber=1, Body=b"x" * (5 << 20))
    s3.delete_objects(Bucket=e2e.bucket, Delete={"Objects": [
        {"Key": shard}, {"Key": f"{prefix}/{file_key(killed, 1, FileKind.MANIFEST)}"}]})

    def uploads() -> list[str]:
        return [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=e2e.bucket, Prefix=shard).get("Uploads", [])]

    assert uploads() == [upload]
    # a finished job is passed once more only after an edit of its spec (a new keepMax): the
    # fault above came after its final pass
    e2e.patch({"checkpoint": {"keepMax": 4}})
    e2e.wait("the stale upload aborted", lambda: not uploads(), timeout=60)
    remaining = sorted(c.name for c in e2e.checkpoints())
    assert remaining == names[1:]  # the incomplete checkpoint went with it


@pytest.mark.parametrize("delete_on_job_deletion", [False, True], ids=["checkpoints-stay", "deleteOnJobDeletion"])
def test_a_finished_job_is_deleted_ttl_seconds_after_it_finished_and_its_checkpoints_stay_unless_asked(
        e2e: Env, delete_on_job_deletion: bool) -> None:
    e2e.create(e2e.example("--max-steps", "8", "--step-delay", "0",
                           checkpoint={"saveSteps": 4, "deleteOnJobDeletion": delete_on_job_deletion},
                           ttlSecondsAfterFinished=2))
    e2e.wait("the job deleted after it finished", lambda: e2e.get("tj")["items"] == [], timeout=180)
    reasons = e2e.reasons()
    assert "Succeeded" in reasons and "Expired" in reasons, reasons
    e2e.wait("its pods gone with it (owner references)", lambda: e2e.pods() == [], timeout=120)
    if delete_on_job_deletion:  # the expiry is a deletion like kubectl's: the finalizer removes the prefix
        assert e2e.object_keys() == []
    else:
        assert [c.step for c in e2e.checkpoints() if c.complete][-1] == 8, "the checkpoints stay"


def test_deleting_a_job_stops_its_ranks_before_deleting_its_checkpoints(e2e: Env) -> None:
    e2e.create(e2e.example("--step-delay", "0.05", checkpoint={"deleteOnJobDeletion": True}))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)
    assert e2e.object_keys()

    # the ranks save on the SIGTERM of their pods' deletion: that save must not outlive the job
    e2e.kubectl("delete", "tj", "mlp", "--timeout=240s")
    assert e2e.get("tj")["items"] == []
    e2e.wait("no pod of the job", lambda: e2e.pods() == [], timeout=120)  # no late writer left
    assert e2e.object_keys() == []


def test_a_job_on_a_store_of_its_own_gets_its_last_checkpoint_and_retention(e2e: Env,
                                                                            other_minio: MinioServer) -> None:
    bucket = f"other-{e2e.bucket}"[:63]
    other_client(other_minio).create_bucket(Bucket=bucket)
    create_secret(e2e, "other-s3", other_minio)
    body = keep_everything(e2e.example("--max-steps", "40", "--step-delay", "0",
                                       checkpoint={"saveSteps": 4, "keepMax": 2, "endpoint": other_minio.endpoint,
                                                   "credentialsSecret": "other-s3", "uri": f"s3://{bucket}/runs"}))
    e2e.create(body)
    e2e.wait_phase("Succeeded", timeout=180)

    store = open_storage(f"s3://{bucket}/runs/{e2e.ns}/mlp", client=other_client(other_minio))

    def pruned() -> list[int] | None:
        steps = sorted(c.step for c in scan(store))
        return steps if steps == [36, 40] else None

    e2e.wait("the operator's retention in the job's own store", pruned, timeout=60)
    last = e2e.wait("lastCheckpoint from the job's own store", lambda: e2e.status().get("lastCheckpoint"),
                    timeout=30)
    assert last["step"] == 40
    assert last["name"] == max(scan(store), key=lambda c: c.step).name
    ready = next(c for c in e2e.status()["conditions"] if c["type"] == "Ready")
    assert "Credentials" not in ready["reason"], ready


def test_a_job_whose_credentials_secret_is_missing_says_so_in_ready(e2e: Env, minio: MinioServer) -> None:
    e2e.create(e2e.example("--max-steps", "8", "--step-delay", "0",
                           checkpoint={"credentialsSecret": "absent-s3", "saveSteps": 4}))

    def shown() -> dict[str, Any] | None:
        ready = next((c for c in e2e.status().get("conditions", []) if c["type"] == "Ready"), None)
        return ready if ready and ready["reason"] == "CredentialsSecretMissing" else None

    ready = e2e.wait("Ready naming the missing Secret", shown, timeout=60)
    assert ready["status"] == "False" and '"absent-s3"' in ready["message"], ready
    assert e2e.ns in ready["message"], ready
    assert e2e.reasons().count("CredentialsSecretMissing") == 1  # one Warning Event, not one per pass

    # the Secret appears: the ranks start, the job runs to the end, Ready follows the phase again
    create_secret(e2e, "absent-s3", minio)
    e2e.wait_phase("Succeeded", timeout=180)
    e2e.wait("lastCheckpoint of the last save", lambda: (e2e.status().get("lastCheckpoint") or {}).get("step") == 8,
             timeout=30)
    ready = next(c for c in e2e.status()["conditions"] if c["type"] == "Ready")
    assert ready["reason"] != "CredentialsSecretMissing", ready
