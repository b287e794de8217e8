"""The test servers, which live in :mod:`bucketsnap.testing` (one implementation for bucketsnap's suite, its
benchmarks and users' tests); re-exported here for the tests and benchmarks that ``import servers``.

Outside pytest (the benchmarks and campaigns), the LocalStack venv and Azurite are looked for in this
repository's root, as under pytest (whose rootdir it is). Environment variables: see
:mod:`bucketsnap.testing._s3`, ``_gcs`` and ``_azure`` (``BUCKETSNAP_TEST_S3_ENDPOINT``,
``BUCKETSNAP_TEST_GCS_ENDPOINT``, ``BUCKETSNAP_TEST_AZURE_CONNECTION_STRING``, ``BUCKETSNAP_LOCALSTACK_VENV``,
``BUCKETSNAP_AZURITE_DIR``).
"""

from __future__ import annotations

from pathlib import Path

from bucketsnap.testing._azure import (
    AZURE_CONNECTION_STRING_ENV,
    AZURITE_ACCOUNT,
    AZURITE_DIR_ENV,
    AZURITE_KEY,
    AzureServer,
    AzuriteServer,
    azure_server,
    azure_storage_options,
    azurite_blob_binary,
    azurite_dir,
)
from bucketsnap.testing._gcs import (  # sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false before gcsfs is imported
    GCS_ENDPOINT_ENV,
    FakeGcsServer,
    GcsServer,
    fake_gcs_binary,
    gcs_server,
    gcs_storage_options,
)
from bucketsnap.testing._process import (
    LOG_TAIL_LINES,
    STARTUP_TIMEOUT,
    free_port,
    set_project_root,
    unique_bucket_name,
)
from bucketsnap.testing._s3 import (
    CATALOG_CACHE_DIR,
    LOCALSTACK_VENV_ENV,
    S3_ENDPOINT_ENV,
    LocalStackServer,
    MotoServer,
    S3Server,
    localstack_venv,
    s3_server,
    s3_storage_options,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
set_project_root(REPO_ROOT)  # under pytest the plugin has set its rootdir already: this same folder

__all__ = [
    "AZURE_CONNECTION_STRING_ENV",
    "AZURITE_ACCOUNT",
    "AZURITE_DIR_ENV",
    "AZURITE_KEY",
    "CATALOG_CACHE_DIR",
    "GCS_ENDPOINT_ENV",
    "LOCALSTACK_VENV_ENV",
    "LOG_TAIL_LINES",
    "REPO_ROOT",
    "S3_ENDPOINT_ENV",
    "STARTUP_TIMEOUT",
    "AzureServer",
    "AzuriteServer",
    "FakeGcsServer",
    "GcsServer",
    "LocalStackServer",
    "MotoServer",
    "S3Server",
    "azure_server",
    "azure_storage_options",
    "azurite_blob_binary",
    "azurite_dir",
    "fake_gcs_binary",
    "free_port",
    "gcs_server",
    "gcs_storage_options",
    "localstack_venv",
    "s3_server",
    "s3_storage_options",
    "unique_bucket_name",
]
