"""bucketsnap's testing kit: pytest fixtures for a fresh run on memory, disk, S3, GCS and Azure servers, and a
helper that kills a training process and checks that it resumes.

Install ``bucketsnap[testing]`` and pytest loads the fixtures itself (the ``pytest11`` entry point; this
package is never imported by ``import bucketsnap``): ``bucketsnap_memory_run``, ``bucketsnap_local_run``,
``bucketsnap_s3_run``, ``bucketsnap_gcs_run``, ``bucketsnap_azure_run`` and ``bucketsnap_run`` (each test once
per backend of ``--bucketsnap-backends``), each a :class:`Run`. Servers start once per session on free ports of
127.0.0.1 and stop when it ends; one that cannot start fails the tests that need it, with its log. See
docs/testing.md.
"""

from bucketsnap.testing._compare import assert_same_state
from bucketsnap.testing._preempt import AfterCommits, Attempt, DuringSave, Moment, Preempted, preempt, run_training
from bucketsnap.testing._run import Run

__all__ = [
    "AfterCommits",
    "Attempt",
    "DuringSave",
    "Moment",
    "Preempted",
    "Run",
    "assert_same_state",
    "preempt",
    "run_training",
]
