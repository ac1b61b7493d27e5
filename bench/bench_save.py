#!/usr/bin/env python3
"""Save throughput to MinIO: torpor's streaming writer vs ``torch.save`` to a buffer + boto3.

Baseline (what a script does without torpor): ``torch.save(state, BytesIO)`` then
``boto3.client("s3").upload_fileobj`` with boto3's default ``TransferConfig``.
torpor: ``torch.save`` streams each tensor's bytes into reused part buffers that upload while
serialisation goes on, sha256 computed on the way (the manifest's), no CRC32 per part.
Both write the same bytes of the same state to the same server in the same run.

Side by side, for reference: torpor with AES-GCM encryption, ``torch.distributed.checkpoint``
(DCP) to a local directory (it has no S3 writer of its own), and s3torchconnector's DCP
writer when it is importable.

Also ``--sweep`` tries part sizes and concurrencies for the torpor writer (how the defaults
in ``torpor.storage.S3Settings`` were chosen).
"""

from __future__ import annotations

import io
import shutil
import tempfile
import uuid

from _common import MIB, best_of, empty_bucket, interleaved, load_note, make_state, minio, parser, state_bytes


def main() -> None:
    p = parser(__doc__.splitlines()[0], repeat=3)
    p.add_argument("--sweep", action="store_true", help="also try part sizes x concurrencies")
    opts = p.parse_args()

    import boto3
    import torch

    from torpor._saving import write_file
    from torpor.crypto import Encryption
    from torpor.storage import S3Settings, S3Storage

    state = make_state(opts.size_mib)
    nbytes = state_bytes(state)
    print(f"[save] state {nbytes / MIB:.0f} MiB in {len(state)} tensors; {load_note()}", flush=True)
    with minio(on_disk=opts.minio_on_disk) as bucket:
        client = boto3.session.Session().client("s3")

        def baseline() -> None:
            buf = io.BytesIO()
            torch.save(state, buf)
            buf.seek(0)
            client.upload_fileobj(buf, bucket, f"baseline/{uuid.uuid4().hex}.ckpt")

        store = S3Storage(bucket, "torpor")

        def ours(storage: S3Storage = store, enc: Encryption | None = None) -> None:
            write_file(storage, f"rank_0/{uuid.uuid4().hex}.ckpt", state, enc)

        results: dict[str, float] = {}
        ours()  # warm-up: the part buffers are allocated once and reused by every later save
        results.update(interleaved(opts.repeat, {"baseline torch.save+upload_fileobj": baseline,
                                                 "torpor streaming writer": ours},
                                   after=lambda: empty_bucket(bucket)))
        gcm = Encryption(b"k" * 32, "AES-GCM")
        results["torpor + AES-GCM"] = best_of(1, lambda: ours(enc=gcm))
        empty_bucket(bucket)

        if opts.sweep:
            for part in (8, 16, 32, 64):
                for conc in (2, 4, 8):
                    s = S3Storage(bucket, f"sweep-{part}-{conc}",
                                  S3Settings(multipart_chunksize=part * MIB, multipart_threshold=part * MIB,
                                             max_concurrency=conc))
                    ours(s)
                    t = best_of(opts.repeat, lambda s=s: ours(s))
                    empty_bucket(bucket)
                    print(f"[save] sweep part={part}MiB concurrency={conc}: {nbytes / MIB / t:.0f} MiB/s", flush=True)

        tmp = tempfile.mkdtemp(prefix="torpor-dcp-")
        try:
            import torch.distributed.checkpoint as dcp

            def dcp_save() -> None:
                shutil.rmtree(tmp, ignore_errors=True)
                dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, thread_count=2))

            results["DCP FileSystemWriter (local disk)"] = best_of(1, dcp_save)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            from s3torchconnector import S3ClientConfig  # type: ignore[import-not-found]
            from s3torchconnector._s3client import S3Client  # type: ignore[import-not-found]
            from s3torchconnector.dcp import S3StorageWriter  # type: ignore[import-not-found]
        except ImportError as exc:
            print(f"[save] s3torchconnector: not importable here ({exc}); skipped", flush=True)
        else:
            import os

            import torch.distributed.checkpoint as dcp

            def s3tc_save() -> None:
                writer = S3StorageWriter(region="us-east-1", path=f"s3://{bucket}/s3tc/{uuid.uuid4().hex}",
                                         thread_count=2)
                # Its DCP writer takes no endpoint; MinIO needs one (and path-style addressing).
                writer.fs._client = S3Client("us-east-1", endpoint=os.environ["AWS_ENDPOINT_URL"],
                                             s3client_config=S3ClientConfig(force_path_style=True))
                dcp.save(state, storage_writer=writer)

            try:
                results["s3torchconnector DCP S3StorageWriter"] = best_of(1, s3tc_save)
            except Exception as exc:  # report, do not hide the other figures
                print(f"[save] s3torchconnector DCP writer failed against MinIO: {type(exc).__name__}: {exc}",
                      flush=True)

    for name, seconds in results.items():
        print(f"[save] {name:40s} {seconds:7.2f} s  {nbytes / MIB / seconds:7.0f} MiB/s", flush=True)
    base = results["baseline torch.save+upload_fileobj"]
    print(f"RATIO save throughput torpor/baseline = {base / results['torpor streaming writer']:.2f}x "
          f"(target >= 1.5x); torpor+AES-GCM/baseline = {base / results['torpor + AES-GCM']:.2f}x")


if __name__ == "__main__":
    main()
