#!/usr/bin/env python3
"""Resume time (download + load) from MinIO: torpor vs boto3 ``download_fileobj`` + ``torch.load``.

Baseline: ``boto3.client("s3").download_fileobj`` (default ``TransferConfig``) into a
``BytesIO``, then ``torch.load(weights_only=True)`` — no integrity check at all.
torpor (``torpor._loading.load_shard``, what ``load_checkpoint`` uses): parallel ranged GETs
straight into a private anonymous mapping, sha256 checked against the manifest as parts
arrive, then ``torch.load(weights_only=True)`` reading each record once out of it while the
pages behind the copy are given back (the shard is held about once; ``bench_memory.py``).
Same object, same server, same run.
"""

from __future__ import annotations

import io

from _common import MIB, best_of, interleaved, load_note, make_state, minio, parser, state_bytes


def main() -> None:
    opts = parser(__doc__.splitlines()[0], repeat=3).parse_args()

    import boto3
    import torch

    from torpor._loading import load_shard
    from torpor._saving import write_file
    from torpor.crypto import Encryption
    from torpor.storage import S3Storage

    state = make_state(opts.size_mib)
    nbytes = state_bytes(state)
    state["torpor_format"] = 1  # what makes it a torpor shard for the loader
    print(f"[resume] state {nbytes / MIB:.0f} MiB in {len(state) - 1} tensors; {load_note()}", flush=True)
    with minio(on_disk=opts.minio_on_disk) as bucket:
        store = S3Storage(bucket, "torpor")
        plain = write_file(store, "rank_0/plain.ckpt", state, None)
        gcm = Encryption(b"k" * 32, "AES-GCM")
        sealed = write_file(store, "rank_0/sealed.ckpt", state, gcm)
        del state
        client = boto3.session.Session().client("s3")

        def baseline() -> None:
            buf = io.BytesIO()
            client.download_fileobj(bucket, "torpor/rank_0/plain.ckpt", buf)
            buf.seek(0)
            torch.load(buf, weights_only=True)

        def ours() -> None:
            load_shard(store, plain, None, None)

        def ours_encrypted() -> None:
            load_shard(store, sealed, gcm.key, None)

        ours()  # warm the connection pool, as the baseline's first run does for its client
        results = interleaved(opts.repeat, {"baseline download_fileobj+torch.load": baseline,
                                            "torpor verified parallel read+load": ours})
        results["torpor + AES-GCM decrypt"] = best_of(1, ours_encrypted)
    for name, seconds in results.items():
        print(f"[resume] {name:40s} {seconds:7.2f} s  {nbytes / MIB / seconds:7.0f} MiB/s", flush=True)
    base = results["baseline download_fileobj+torch.load"]
    print(f"RATIO resume speed torpor/baseline = {base / results['torpor verified parallel read+load']:.2f}x "
          f"(target >= 1.5x); torpor+AES-GCM/baseline = {base / results['torpor + AES-GCM decrypt']:.2f}x")


if __name__ == "__main__":
    main()
