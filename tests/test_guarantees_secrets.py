"""docs/security.md: "URLs are redacted (s3://***@bucket/run?...) in every message, repr and SnapshotInfo.url".

AWS secret keys may hold "/": s3fs then takes the user info up to that "/" for a bucket name and repeats it in
its own error, where nothing marks it as user info any more. It must be redacted there too.
"""

from __future__ import annotations

import traceback

from bucketsnap import SnapshotStore
from conftest import Backend

KEY, SECRET_HEAD, SECRET_TAIL = "AKIAEXAMPLE", "Sup3rS3cret", "Value9f4a7"


def test_user_info_whose_secret_holds_a_slash_never_leaks_in_a_clients_error(s3_backend: Backend) -> None:
    bucket = s3_backend.base.removeprefix("s3://")
    store = SnapshotStore(f"s3://{KEY}:{SECRET_HEAD}/{SECRET_TAIL}@{bucket}/run", storage_options=s3_backend.options)
    texts = [repr(store), store.url]
    for failing in (store.itrs, lambda: store.save(1, {"x": 1}), lambda: store.load(1)):
        try:
            failing()
        except Exception as exc:  # whatever the client makes of the URL, the secret is not in its message
            texts.append("".join(traceback.format_exception_only(type(exc), exc)))
    assert len(texts) > 2, "the URL was expected to fail"
    leaks = [t for t in texts if SECRET_HEAD in t or SECRET_TAIL in t]
    assert not leaks, leaks
