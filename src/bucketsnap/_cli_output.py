"""Text and JSON renderings of snapshot infos for the ``bucketsnap`` command line (no click here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bucketsnap._info import Metric, SnapshotInfo

__all__ = ["count", "human_size", "info_json", "ls_table", "runs_table", "show_text", "table"]


def human_size(n: int) -> str:
    """``n`` bytes in binary units.

    >>> human_size(512), human_size(1536), human_size(3 * 2**30)
    ('512 B', '1.5 KiB', '3.0 GiB')
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()) -> str:
    """Rows as aligned columns under ``header``; the columns in ``right`` are right-aligned.

    >>> print(table(["A", "BB"], [["x", "1"], ["yyy", "22"]], right=[1]))
    A    BB
    x     1
    yyy  22
    """
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _metrics(metrics: dict[str, Metric]) -> str:
    return " ".join(f"{k}={_metric(v)}" for k, v in metrics.items())


def _metric(v: Metric) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _time(info: SnapshotInfo) -> str:
    return info.created.strftime("%Y-%m-%d %H:%M:%S")


def ls_table(infos: Sequence[SnapshotInfo]) -> str:
    """The ``ls`` table: itr, creation time (UTC), size, members, metrics."""
    rows = [[str(i.itr), _time(i), human_size(i.size), ",".join(i.members), _metrics(i.metrics)] for i in infos]
    return table(["ITR", "CREATED (UTC)", "SIZE", "MEMBERS", "METRICS"], rows, right=[0, 2])


def info_json(info: SnapshotInfo) -> dict[str, Any]:
    """A snapshot's manifest entry plus its URL and each member's compression ratio, for ``--json``."""
    doc = {"url": info.url, **info.to_json()}
    for key, member in info.members.items():
        doc["members"][key]["ratio"] = round(member.ratio, 3)
    return doc


def show_text(info: SnapshotInfo) -> str:
    """The ``show`` view: the snapshot's meta, then a table of its members."""
    lines = [
        f"itr       {info.itr}",
        f"url       {info.url}",
        f"created   {info.created.isoformat()}",
        f"size      {human_size(info.size)} ({info.size} bytes)",
        f"format    {info.format_version}",
        f"metrics   {_metrics(info.metrics) or '-'}",
    ]
    if info.refs:
        more = ", ..." if len(info.refs) > 3 else ""
        lines.append(f"refs      {count(len(info.refs), 'object')}: {', '.join(info.refs[:3])}{more}")
    rows = []
    for key, m in info.members.items():
        row = [key, human_size(m.raw_size), human_size(m.stored_size), f"{m.ratio:.2f}", m.crc32]
        rows.append([*row, "yes" if m.pickled else "no", m.path or "-"])
    header = ["KEY", "RAW", "STORED", "RATIO", "CRC32", "PICKLED", "OBJECT"]
    raw = sum(m.raw_size for m in info.members.values())
    stored = sum(m.stored_size for m in info.members.values())
    total = ["(total)", human_size(raw), human_size(stored), f"{raw / stored if stored else 1.0:.2f}", "", "", ""]
    return "\n".join(lines) + "\n\n" + table(header, [*rows, total], right=[1, 2, 3])


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1.

    >>> count(1, "tensor"), count(3, "tensor"), count(0, "object")
    ('1 tensor', '3 tensors', '0 objects')
    """
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def runs_table(runs: Sequence[dict[str, Any]]) -> str:
    """The ``ls`` table of a folder of runs: URL, snapshot count, last itr, last write (UTC)."""
    rows = [
        [
            r["url"],
            str(r["snapshots"]),
            "-" if r["last_itr"] is None else str(r["last_itr"]),
            "-" if r["last_write"] is None else r["last_write"].strftime("%Y-%m-%d %H:%M:%S"),
        ]
        for r in runs
    ]
    return table(["RUN", "SNAPSHOTS", "LAST ITR", "LAST WRITE (UTC)"], rows, right=[1, 2])
