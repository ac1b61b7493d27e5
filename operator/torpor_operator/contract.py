"""The names the operator and the in-pod runtime agree on: environment, files, labels.

This is the one place the operator spells them. The ``TORPOR_*`` variable names are imported
from the runtime's torch-free :mod:`torpor.env` (exit codes and the termination message from
:mod:`torpor.termination`, used in :mod:`torpor_operator.outcomes`), so a rename on the
runtime side reaches the operator; docs/operator.md lists the whole contract.
"""

from __future__ import annotations

from torpor import env as runtime_env

__all__ = [
    "ANNOTATION_AVOIDED_NODES",
    "ANNOTATION_EXIT_REQUESTED",
    "ANNOTATION_POD_SHAPE",
    "ANNOTATION_RESUME_FROM",
    "ANNOTATION_SIDECARS_STOPPED",
    "API_VERSION",
    "DEFAULT_TERMINATION_LOG",
    "ENV",
    "EXIT_DIR",
    "EXIT_FILE",
    "EXIT_FILE_KEY",
    "GROUP",
    "KEY_DIR",
    "KEY_FILE",
    "KIND",
    "LABEL_INCARNATION",
    "LABEL_JOB",
    "LABEL_MANAGED_BY",
    "LABEL_RANK",
    "MANAGED_BY",
    "PLURAL",
    "VERSION",
]

GROUP = "torpor.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingJob"
PLURAL = "trainingjobs"

# Labels on every child; the operator lists pods by LABEL_JOB and tells incarnations apart by
# LABEL_INCARNATION.
LABEL_JOB = "torpor.dev/job"
LABEL_INCARNATION = "torpor.dev/incarnation"
LABEL_RANK = "torpor.dev/rank"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "torpor"

#: Set on every pod when GracefulExit is written: changing the pod object makes kubelet
#: refresh its ConfigMap volumes at once rather than within its sync period.
ANNOTATION_EXIT_REQUESTED = "torpor.dev/exit-requested-at"
#: The checkpoint every rank of the incarnation resumes from (also in TORPOR_RESUME_FROM);
#: read back so that a re-run of a half-applied restart keeps the same choice.
ANNOTATION_RESUME_FROM = "torpor.dev/resume-from"
#: Set (to the time) on a pod whose training container has ended while its other containers
#: still ran, together with ``spec.activeDeadlineSeconds: 1``: the kubelet then stops those
#: sidecars and ends the pod ``Failed``/``DeadlineExceeded``, which this mark says is not the
#: rank's end (its training container's status is).
ANNOTATION_SIDECARS_STOPPED = "torpor.dev/sidecars-stopped-at"
#: What the pod was made from: ``part=digest`` of each part of the spec that shapes a rank's
#: pod (:mod:`torpor_operator.shaping`); a live pod whose digests differ from the spec's is
#: replaced through a graceful restart.
ANNOTATION_POD_SHAPE = "torpor.dev/pod-shape"
#: The nodes (comma-separated) the pod's required node affinity keeps it off because they were
#: going away when it was made (:mod:`torpor_operator.placing`); an unscheduled pod is made
#: again when one of them is back.
ANNOTATION_AVOIDED_NODES = "torpor.dev/avoided-nodes"

#: Key of the GracefulExit JSON file in the ConfigMap, and where the ConfigMap is mounted (as a
#: directory: subPath mounts never see updates).
EXIT_FILE_KEY = "graceful-exit.json"
EXIT_DIR = "/etc/torpor/exit"
EXIT_FILE = f"{EXIT_DIR}/{EXIT_FILE_KEY}"
#: Where the encryption key Secret is mounted, and the file holding the key.
KEY_DIR = "/etc/torpor/key"
KEY_FILE = f"{KEY_DIR}/key"
DEFAULT_TERMINATION_LOG = runtime_env.DEFAULT_TERMINATION_LOG


class ENV:
    """Environment variables set in the training container of every rank.

    The ``TORPOR_*`` names come from the runtime's :mod:`torpor.env`, the one definition both
    sides read; the rest are torch.distributed's and boto3's own.
    """

    # torch.distributed's env:// rendezvous. RANK and LOCAL_RANK are the pod's first process's;
    # a launcher (python -m torpor.run, torchrun) sets each of its processes' own.
    RANK = "RANK"
    WORLD_SIZE = "WORLD_SIZE"
    MASTER_ADDR = "MASTER_ADDR"
    MASTER_PORT = "MASTER_PORT"
    LOCAL_RANK = "LOCAL_RANK"
    LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
    # Several processes per pod (spec.procsPerPod): the pods and this pod's place among them,
    # read by torpor.run, and torchrun's own defaults for its flags (PET_<FLAG>).
    NNODES = "NNODES"
    NODE_RANK = "NODE_RANK"
    PET_NNODES = "PET_NNODES"
    PET_NPROC_PER_NODE = "PET_NPROC_PER_NODE"
    PET_NODE_RANK = "PET_NODE_RANK"
    PET_MASTER_ADDR = "PET_MASTER_ADDR"
    PET_MASTER_PORT = "PET_MASTER_PORT"
    # S3: boto3 reads these itself.
    AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
    AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
    AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
    # torpor's own contract, read by the runtime's RuntimeEnv.from_environ().
    JOB = runtime_env.JOB
    INCARNATION = runtime_env.INCARNATION
    CHECKPOINT_URI = runtime_env.CHECKPOINT_URI
    RESUME_FROM = runtime_env.RESUME_FROM
    EXIT_FILE = runtime_env.EXIT_FILE
    EXIT_SIGNAL = runtime_env.EXIT_SIGNAL
    TERMINATION_LOG = runtime_env.TERMINATION_LOG
    SAVE_STEPS = runtime_env.SAVE_STEPS
    SAVE_SECONDS = runtime_env.SAVE_SECONDS
    KEEP_MAX = runtime_env.KEEP_MAX
    KEEP_PER_N_MINUTES = runtime_env.KEEP_PER_N_MINUTES
    # Reserved by the runtime for its next release (see torpor.env); set already so that a
    # job keeps its settings across the upgrade.
    ASYNC_SAVE = "TORPOR_ASYNC_SAVE"
    ENC_MODE = "TORPOR_ENC_MODE"
    ENC_KEY_FILE = "TORPOR_ENC_KEY_FILE"


