"""The ``bucketsnap`` command line: inspect, verify, restore, copy and clean up runs at any fsspec URL.

Exit codes (also in ``bucketsnap --help``):

====  ==========================================================================================
0     success
1     failure: verification found a problem, a storage error, an itr already committed at the
      destination, a value that cannot be written in the requested format
2     usage error: a bad option or argument
3     not found: no run at the URL, no such itr, no such key
130   interrupted (Ctrl-C)
====  ==========================================================================================

Errors are one line on stderr (``bucketsnap: error: ...``); ``--debug`` adds the traceback and the library's
debug log (other libraries' log records are never printed). Storage options come from the environment
(fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` variables, ``AWS_*`` for s3fs, ``GOOGLE_APPLICATION_CREDENTIALS`` for
gcsfs), ``--endpoint-url`` and repeatable ``--storage-option KEY=VALUE``; their values are never printed, and
secret-looking ones are scrubbed from error messages and tracebacks. ``--connect-timeout`` is how long a store
gets to answer the first request. Progress bars are drawn on stderr only when it is a terminal.

This is the only module that imports click. It imports the store and the export functions in the commands
that use them, and nothing it imports imports torch until a value is decoded, so ``--help`` and ``ls`` start
in a fraction of a second (``tests/test_cli_startup.py`` checks that torch stays unimported).
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import re
import sys
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from bucketsnap._cli_output import count, human_size, info_json, ls_table, runs_table, show_text
from bucketsnap._transport import Retry
from bucketsnap._version import __version__
from bucketsnap.errors import BucketsnapError, SnapshotExistsError, SnapshotNotFoundError, StorageError

if TYPE_CHECKING:
    from bucketsnap._manifest import Which
    from bucketsnap._store import SnapshotStore

#: The run's folders (as in bucketsnap._manifest, which imports fsspec: not needed for --help).
MANIFEST_DIR = "manifest"
SNAPSHOT_DIR = "snapshots"

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE", "cli", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])

_SECRET_KEY = re.compile(r"(?i)key|secret|token|pass|cred|session|auth|sig|connection_string")
_EPILOG = "Exit codes: 0 ok, 1 failure (e.g. verify found corruption), 2 usage error, 3 not found, 130 interrupted."
_logger = logging.getLogger("bucketsnap")


class _Failure(Exception):
    """An error the CLI reports as one line with its own exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class _Which(click.ParamType):  # type: ignore[type-arg]
    name = "last|first|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Which:
        from bucketsnap._manifest import parse_which

        try:
            return parse_which(value.strip() if isinstance(value, str) else value, digits=True)
        except ValueError:
            self.fail(f"{value!r} is not 'last', 'first' or a non-negative integer itr", param, ctx)


class _Group(click.Group):
    """Turns exceptions into one-line errors with conventional exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("bucketsnap: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            _report(ctx, exc)


def _report(ctx: click.Context, exc: BaseException) -> NoReturn:
    from bucketsnap._storage import BucketNotFoundError

    secrets: set[str] = ctx.meta.get("bucketsnap.secrets", set())
    if ctx.meta.get("bucketsnap.debug"):
        click.echo(_scrub("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), secrets), err=True)
    if isinstance(exc, _Failure):
        code, message = exc.code, str(exc)
    elif isinstance(exc, (SnapshotNotFoundError, FileNotFoundError, BucketNotFoundError)):
        code, message = EXIT_NOT_FOUND, str(exc)
    elif isinstance(exc, KeyError):  # an unknown key: its message is the first arg, without repr quotes
        code, message = EXIT_NOT_FOUND, str(exc.args[0] if exc.args else exc)
    elif isinstance(exc, (BucketsnapError, OSError, ValueError)):
        code, message = EXIT_FAILURE, str(exc)
    else:
        code, message = EXIT_FAILURE, f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"
    click.echo(f"bucketsnap: error: {_scrub(message, secrets)}", err=True)
    ctx.exit(code)


def _scrub(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# -- storage options ---------------------------------------------------------------------------------------


def parse_storage_options(pairs: tuple[str, ...], endpoint_url: str | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as fsspec storage options.

    A value that parses as JSON is used as such (``anon=true``, ``config_kwargs={"s3": {...}}``), anything else
    as a string; a dotted key nests (``client_kwargs.region_name=us-east-1``).

    >>> parse_storage_options(("anon=true", "client_kwargs.region_name=eu-west-1"), "http://127.0.0.1:9000")
    {'anon': True, 'client_kwargs': {'region_name': 'eu-west-1'}, 'endpoint_url': 'http://127.0.0.1:9000'}
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(
                f"expected KEY=VALUE, got {key.strip()!r} with no '='", param_hint="--storage-option"
            )
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = options
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise click.BadParameter(
                    f"{part!r} is set both as a value and as a group", param_hint="--storage-option"
                )
            node = child
        node[leaf] = value
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    return options


def _secret_values(options: Any, key: str = "") -> set[str]:
    """String values of options whose name looks secret (and of every option nested under such a name)."""
    if isinstance(options, dict):
        return set().union(*(_secret_values(v, f"{key}.{k}") for k, v in options.items()))
    if isinstance(options, str) and len(options) >= 3 and _SECRET_KEY.search(key.rsplit(".", 1)[-1] or key):
        return {options}
    return set()


def _storage_options(f: F) -> F:
    """Adds --endpoint-url, --storage-option, --connect-timeout and --debug to a command."""
    f = click.option("--debug", is_flag=True, help="Show the traceback and the library's debug log on errors.")(f)
    f = click.option(
        "--connect-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=Retry.connect_timeout,
        show_default=True,
        envvar="BUCKETSNAP_CONNECT_TIMEOUT",
        metavar="SECONDS",
        help="How long a store gets to answer the first request before it is called unreachable "
        "[env: BUCKETSNAP_CONNECT_TIMEOUT].",
    )(f)
    f = click.option(
        "--storage-option",
        "-s",
        "storage_option",
        multiple=True,
        metavar="KEY=VALUE",
        help="An fsspec storage option (repeatable); VALUE is JSON or a string, a dotted KEY nests.",
    )(f)
    f = click.option(
        "--endpoint-url",
        envvar="BUCKETSNAP_ENDPOINT_URL",
        metavar="URL",
        help="The S3/GCS endpoint, e.g. http://127.0.0.1:4566 [env: BUCKETSNAP_ENDPOINT_URL].",
    )(f)
    return f


def _setup(
    ctx: click.Context, storage_option: tuple[str, ...], endpoint_url: str | None, debug: bool, connect_timeout: float
) -> dict[str, Any]:
    """Parse the storage options, remember their secrets for scrubbing, and turn on debug logging."""
    options = parse_storage_options(storage_option, endpoint_url)
    secrets: set[str] = ctx.meta.setdefault("bucketsnap.secrets", set())
    secrets |= _secret_values(options)
    ctx.meta["bucketsnap.retry"] = Retry(connect_timeout=connect_timeout)
    if debug:
        ctx.meta["bucketsnap.debug"] = True
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        _logger.addHandler(handler)
        _logger.setLevel(logging.DEBUG)
        ctx.call_on_close(lambda: _logger.removeHandler(handler))
    return options


def _store(url: str, options: dict[str, Any]) -> SnapshotStore:
    from bucketsnap._store import SnapshotStore

    retry = click.get_current_context().meta.get("bucketsnap.retry")
    return SnapshotStore(url, storage_options=options, retry=retry)


def _is_run(store: SnapshotStore, need: tuple[str, ...] = (MANIFEST_DIR,)) -> bool:
    """Whether any of the ``need`` folders of ``store`` holds anything."""
    try:
        return any(store.storage.list(d) for d in need)
    except StorageError as exc:
        if isinstance(exc.__cause__, NotADirectoryError):  # a local file given as the run
            return False
        raise


def _open_run(
    url: str, options: dict[str, Any], *, need: tuple[str, ...] = (MANIFEST_DIR,), command: str = "ls"
) -> SnapshotStore:
    """A store at ``url``, refusing one where none of the ``need`` directories holds anything (a typo'd URL, a
    snapshot archive, the folder of several runs): the error says which, and the command to run instead."""
    store = _store(url, options)
    if not _is_run(store, need):
        raise _Failure(_not_a_run(store, options, need, command), EXIT_NOT_FOUND)
    return store


#: Names of a run's own objects: an archive (its itr), a manifest generation, a replay-buffer chunk.
_RUN_OBJECTS = (
    (re.compile(rf"^{SNAPSHOT_DIR}/(\d{{12}})-[0-9a-f]+(-rank\d+)?\.zip$"), "the snapshot archive of itr {itr}"),
    (re.compile(rf"^{MANIFEST_DIR}/(\d{{12}})\.json$"), "manifest generation {itr}"),
    (re.compile(r"^chunks/[^/]+$"), "a replay-buffer chunk"),
)
#: The folders of a run.
_RUN_FOLDERS = (MANIFEST_DIR, SNAPSHOT_DIR, "chunks")


def _not_a_run(store: SnapshotStore, options: dict[str, Any], need: tuple[str, ...], command: str) -> str:
    url = store.url
    if store.storage.is_file():
        parent = posixpath.dirname(posixpath.dirname(url))
        tail = url[len(parent) + 1 :]
        for pattern, what in _RUN_OBJECTS:
            match = pattern.match(tail)
            if match and parent and _is_run(_store(parent, options)):
                itr = int(match.group(1)) if match.groups() else None
                described = what.format(itr=itr)
                again = f"bucketsnap {command} {parent}"
                if "archive" in described and command in ("show", "verify", "restore"):
                    again += f" --itr {itr}"
                return f"{url} is {described} of the run at {parent}, not a run: {again}"
        return f"{url} is a file, not a bucketsnap run (a run is a folder holding {MANIFEST_DIR}/ and {SNAPSHOT_DIR}/)"
    parent, folder = posixpath.split(url)
    if folder in _RUN_FOLDERS and parent and _is_run(_store(parent, options)):
        return f"{url} is the {folder}/ folder of the run at {parent}, not a run: bucketsnap {command} {parent}"
    runs = _runs_in(store, options, limit=3)
    if runs:
        names = ", ".join(r["url"] for r in runs[:3])
        return f"{url} is not a run but holds runs ({names}{', ...' if len(runs) > 2 else ''}): bucketsnap ls {url}"
    return (
        f"no bucketsnap run at {url}: nothing under {' or '.join(d + '/' for d in need)}. "
        "Check the URL and the storage options."
    )


def _runs_in(store: SnapshotStore, options: dict[str, Any], *, limit: int | None = None) -> list[dict[str, Any]]:
    """The runs directly under ``store``'s folder: URL, snapshot count, last itr, last write."""
    from bucketsnap._manifest import ManifestLog, generation_name

    storage = store.storage
    files = set(storage.list_sizes(""))
    runs: list[dict[str, Any]] = []
    for name in storage.list(""):
        if name in files or name.startswith("."):
            continue
        child = _store(f"{store.url}/{name}", options)
        log = ManifestLog(child.storage)
        generations = log.generations()
        if not generations:
            continue
        newest = log.lookup(lambda manifest: (manifest.tree.count, manifest.tree.last()))  # no page of entries
        written = child.storage.modified(generation_name(generations[-1]))
        if written is None and newest[1] is not None:
            written = newest[1].created.timestamp()
        runs.append(
            {
                "url": child.url,
                "snapshots": newest[0],
                "last_itr": None if newest[1] is None else newest[1].itr,
                "last_write": None if written is None else datetime.fromtimestamp(written, timezone.utc),
            }
        )
        if limit is not None and len(runs) >= limit:
            break
    return runs


def _progress_option(f: F) -> F:
    return click.option(
        "--progress/--no-progress", default=None, help="Draw a progress bar [default: when stderr is a terminal]."
    )(f)


def _command(f: F) -> F:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        kwargs["options"] = _setup(
            ctx,
            kwargs.pop("storage_option"),
            kwargs.pop("endpoint_url"),
            kwargs.pop("debug"),
            kwargs.pop("connect_timeout"),
        )
        return f(*args, **kwargs)

    return _storage_options(wrapper)  # type: ignore[arg-type,return-value]


# -- commands ----------------------------------------------------------------------------------------------

_WHICH = _Which()


@click.group(cls=_Group, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="bucketsnap")
def cli() -> None:
    """Inspect, verify, restore, copy and clean up bucketsnap runs at any fsspec URL.

    URL is a local path or an fsspec URL such as s3://bucket/runs/ppo-7 or gs://bucket/run.
    """


@cli.command("ls", epilog=_EPILOG)
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of manifest entries.")
@_command
def ls_command(url: str, as_json: bool, options: dict[str, Any]) -> None:
    """List the committed snapshots of the run at URL: itr, time, size, members, metrics.

    URL may also be a folder holding runs: then each run is listed, with its snapshot count, last itr and last
    write.
    """
    store = _store(url, options)
    if not _is_run(store):
        runs = [] if store.storage.is_file() else _runs_in(store, options)
        if not runs:
            raise _Failure(_not_a_run(store, options, (MANIFEST_DIR,), "ls"), EXIT_NOT_FOUND)
        if as_json:
            click.echo(json.dumps([{**r, "last_write": _iso(r["last_write"])} for r in runs], indent=2))
        else:
            click.echo(
                f"{store.url} holds {count(len(runs), 'run')}; bucketsnap ls RUN lists one's snapshots", err=True
            )
            click.echo(runs_table(runs))
        return
    infos = store.infos()
    if as_json:
        click.echo(json.dumps([info_json(i) for i in infos], indent=2))
    elif infos:
        click.echo(ls_table(infos))
    else:
        click.echo(f"no committed snapshots at {store.url}", err=True)


@cli.command("show", epilog=_EPILOG)
@click.argument("url")
@click.option("--itr", "which", type=_WHICH, default="last", show_default=True, help="Which snapshot.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest entry as JSON.")
@_command
def show_command(url: str, which: Which, as_json: bool, options: dict[str, Any]) -> None:
    """Show one snapshot: its meta, and each member's raw and stored sizes and compression ratio."""
    info = _open_run(url, options, command="show").info(which)
    click.echo(json.dumps(info_json(info), indent=2) if as_json else show_text(info))


@cli.command("verify", epilog=_EPILOG)
@click.argument("url")
@click.option("--itr", "which", type=_WHICH, default=None, help="Which snapshot [default: last].")
@click.option("--all", "every", is_flag=True, help="Verify every committed snapshot.")
@_progress_option
@_command
def verify_command(url: str, which: Which | None, every: bool, progress: bool | None, options: dict[str, Any]) -> None:
    """Re-read every member and check its checksums and sizes; exit 1 naming each problem found."""
    from bucketsnap._progress import progress_bar
    from bucketsnap._snapshot import Snapshot

    if every and which is not None:
        raise click.UsageError("pass --itr or --all, not both")
    store = _open_run(url, options, command="verify")
    infos = store.infos() if every else [store.info("last" if which is None else which)]
    failed = []
    for info in infos:
        try:
            with progress_bar(f"verify itr {info.itr}", enabled=progress) as callback:
                Snapshot(store.storage, info).verify(progress=callback)
        except (BucketsnapError, OSError) as exc:
            failed.append(info.itr)
            click.echo(f"FAILED itr {info.itr}: {exc}")
            continue
        click.echo(f"ok     itr {info.itr}: {count(len(info.members), 'member')}, {human_size(info.size)}")
    if failed:
        raise _Failure(
            f"{len(failed)} of {count(len(infos), 'snapshot')} failed verification: itr {', '.join(map(str, failed))}"
        )
    if not infos:
        click.echo(f"no committed snapshots at {store.url}", err=True)


@cli.command("restore", epilog=_EPILOG)
@click.argument("url")
@click.option("--itr", "which", type=_WHICH, default="last", show_default=True, help="Which snapshot.")
@click.option(
    "--key",
    "-k",
    help="The member to restore, such as policy, or one value of it, such as policy/actor.0.weight "
    "[default: every member, as a dict].",
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="The file to write: .pt/.pth/.bin (torch.save) or .safetensors.",
)
@click.option("--format", "fmt", type=click.Choice(["pt", "safetensors"]), help="Override the format the suffix names.")
@click.option("--allow-pickle", is_flag=True, help="Allow values that need unpickling (runs code from the snapshot).")
@_progress_option
@_command
def restore_command(
    url: str,
    which: Which,
    key: str | None,
    output: str,
    fmt: str | None,
    allow_pickle: bool,
    progress: bool | None,
    options: dict[str, Any],
) -> None:
    """Write one member (or the whole snapshot) to a local file torch or safetensors reads without bucketsnap.

    Tensors are restored to the CPU, numpy arrays become tensors in a .pt file (so that torch.load(path,
    weights_only=True) reads it). Only the member's bytes are downloaded.
    """
    from bucketsnap._export import check_destination, format_of, write_safetensors, write_torch
    from bucketsnap._progress import progress_bar

    try:
        fmt = fmt or format_of(output)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--output") from None
    check_destination(output)  # before a byte is downloaded
    snapshot = _open_run(url, options, command="restore").open(which, map_location="cpu", allow_pickle=allow_pickle)
    member, _, path = (key or "").partition("/")
    if path:  # one value of a member, such as policy/actor.0.weight: read from the frames that hold it
        value = snapshot.tensor(member, path)
    else:
        keys = list(snapshot.info.members) if key is None else [key]
        with progress_bar(f"restore itr {snapshot.info.itr}", enabled=progress) as callback:
            state = snapshot.load(keys, progress=callback)
        value = state if key is None else state[key]
    name = f"member {key!r} of itr {snapshot.info.itr}" if key else f"itr {snapshot.info.itr}"
    if fmt == "safetensors":
        metadata = {"bucketsnap.itr": str(snapshot.info.itr), "bucketsnap.key": key or ""}
        tensors = write_safetensors(value, output, name=name, key=key or "tensor", metadata=metadata)
        click.echo(f"wrote {name} to {output}: {count(len(tensors), 'tensor')} (safetensors)")
        return
    written = write_torch(value, output)
    arrays = written.converted
    converted = {0: "", 1: " (1 from a numpy array)"}.get(arrays, f" ({arrays} from numpy arrays)")
    click.echo(f"wrote {name} to {output}: {count(written.tensors, 'tensor')}{converted} (torch.save)")
    if written.refused:
        click.echo(
            f"note: torch.load({output!r}, weights_only=True) refuses it ({written.refused}); load it with "
            "weights_only=False, only if you trust the snapshot",
            err=True,
        )


@cli.command("cp", epilog=_EPILOG)
@click.argument("src_url")
@click.argument("dst_url")
@click.option("--itr", "which", type=_WHICH, default=None, help="Which snapshot [default: last].")
@click.option("--all", "every", is_flag=True, help="Copy every committed snapshot.")
@click.option("--overwrite", is_flag=True, help="Replace itrs already committed at DST_URL.")
@click.option("--skip-existing", is_flag=True, help="Leave itrs already committed at DST_URL alone.")
@click.option("--dst-endpoint-url", metavar="URL", help="The destination's endpoint [default: as the source's].")
@click.option("--dst-storage-option", multiple=True, metavar="KEY=VALUE", help="A destination storage option.")
@_progress_option
@_command
def cp_command(
    src_url: str,
    dst_url: str,
    which: Which | None,
    every: bool,
    overwrite: bool,
    skip_existing: bool,
    dst_endpoint_url: str | None,
    dst_storage_option: tuple[str, ...],
    progress: bool | None,
    options: dict[str, Any],
) -> None:
    """Copy snapshots from SRC_URL to DST_URL (any two backends), committing each at the destination.

    The destination uses --dst-* options when given, else the source's options if both URLs use the same
    protocol, else none (the environment still applies).
    """
    if every and which is not None:
        raise click.UsageError("pass --itr or --all, not both")
    from bucketsnap._progress import progress_bar

    if overwrite and skip_existing:
        raise click.UsageError("pass --overwrite or --skip-existing, not both")
    source = _open_run(src_url, options, command="cp")
    if dst_storage_option or dst_endpoint_url:
        dst_options = parse_storage_options(dst_storage_option, dst_endpoint_url)
        click.get_current_context().meta["bucketsnap.secrets"] |= _secret_values(dst_options)
    else:
        dst_options = options if _protocol(src_url) == _protocol(dst_url) else {}
    dest = _store(dst_url, dst_options)
    infos = source.infos() if every else [source.info("last" if which is None else which)]
    existing = set(dest.itrs())
    clash = [i.itr for i in infos if i.itr in existing]
    if clash and not (overwrite or skip_existing):
        raise SnapshotExistsError(
            f"itr {', '.join(map(str, clash))} already committed at {dest.url}; pass --overwrite to replace, "
            "or --skip-existing to leave them"
        )
    for info in infos:
        if skip_existing and info.itr in existing:
            click.echo(f"skipped itr {info.itr}: already committed at {dest.url}")
            continue
        with progress_bar(f"copy itr {info.itr}", enabled=progress) as callback:
            copied = dest.copy_from(source, info.itr, overwrite=overwrite, progress=callback)
        click.echo(f"copied itr {info.itr} ({human_size(copied.size)}) to {copied.url}")


@cli.command("gc", epilog=_EPILOG)
@click.argument("url")
@click.option("--dry-run", "-n", is_flag=True, help="Print what would be removed; remove nothing.")
@click.option(
    "--min-age",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    metavar="SECONDS",
    help="Delete only objects an earlier gc condemned this long ago (readers and saves in flight get that long); "
    "0 condemns and deletes at once.",
)
@_command
def gc_command(url: str, dry_run: bool, min_age: float, options: dict[str, Any]) -> None:
    """Condemn objects no committed snapshot needs (crash orphans, pruned snapshots) and remove those condemned
    --min-age ago, and old manifest generations."""
    store = _open_run(url, options, command="gc")
    removed = store.gc(min_age=min_age, dry_run=dry_run)
    for rel in removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {rel}")
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} {count(len(removed), 'object')}; {count(len(store.itrs()), 'committed snapshot')} kept", err=True
    )
    if min_age > 0:
        kept = sorted(set(store.gc(min_age=0, dry_run=True)) - set(removed))
        if kept:
            click.echo(_kept_by_min_age(store, kept, min_age, dry_run), err=True)


@cli.command("repair", epilog=_EPILOG)
@click.argument("url")
@click.option(
    "--from-archives",
    is_flag=True,
    help="A run with archives but no manifest generation (its manifest lost): rebuild it from them.",
)
@_command
def repair_command(url: str, from_archives: bool, options: dict[str, Any]) -> None:
    """Commit a manifest generation rebuilt from the intact archives, after a corrupt or lost manifest.

    On a healthy run (its newest generation reads) it commits nothing and changes nothing: archives the manifest
    does not list there were dropped by retention, deleted, or never committed. A run with archives but no
    generation at all is rebuilt from them only with --from-archives (its first save may be in flight).
    """
    from bucketsnap._maintenance import is_archive
    from bucketsnap._manifest import ManifestLog

    store = _open_run(url, options, need=(MANIFEST_DIR, SNAPSHOT_DIR), command="repair")
    before = ManifestLog(store.storage).generations()
    manifest = store.repair(from_archives=from_archives)
    itrs = manifest.itrs()
    shown = ", ".join(map(str, itrs)) if len(itrs) <= 20 else f"{itrs[0]} to {itrs[-1]}"
    listed = f"{count(len(itrs), 'snapshot')}: {shown or '-'}"
    if manifest.generation > max(before, default=0):
        click.echo(f"committed manifest generation {manifest.generation} with {listed}")
    elif manifest.generation:
        click.echo(f"nothing to repair: manifest generation {manifest.generation} reads, with {listed}")
    elif archives := [name for name in store.storage.list(SNAPSHOT_DIR) if is_archive(name)]:
        click.echo(
            f"nothing committed: the run has {count(len(archives), 'archive')} but no manifest generation (a first "
            "save in flight or killed, or a lost manifest); if its manifest was lost, run again with --from-archives"
        )
    else:
        click.echo("nothing to repair: the run has no manifest generation (nothing was ever committed)")


def _kept_by_min_age(store: SnapshotStore, kept: list[str], min_age: float, dry_run: bool) -> str:
    """Why gc left ``kept`` (objects no snapshot needs) alone: --min-age, and when a gc removes them."""
    import time

    from bucketsnap._manifest import ManifestLog

    condemned = ManifestLog(store.storage).read().condemned
    times = sorted(condemned[rel] for rel in kept if rel in condemned)
    it = "it" if len(kept) == 1 else "them"
    why = f"a save may still be writing {it}, or a reader of a dropped snapshot reading {it}"
    if times:
        ages = [_duration(time.time() - t) for t in (times[-1], times[0])]
        age = ages[0] if ages[0] == ages[1] else f"{ages[0]} to {ages[1]}"
        when = f"condemned {age} ago, less than --min-age {min_age:g} s ({why}); gc removes "
        when += f"{it if len(times) == len(kept) else 'the first'} from {_when(times[0] + min_age)} on"
    else:
        when = f"not condemned yet{' (a dry run condemns nothing)' if dry_run else ''}: gc removes {it} "
        when += f"--min-age {min_age:g} s after a gc condemns {it} ({why})"
    return f"kept {count(len(kept), 'object')} no snapshot needs: {when}, or now with --min-age 0 if no save is running"


def _duration(seconds: float) -> str:
    """``seconds`` in the largest whole unit: "0 s", "59 s", "12 min", "3 h"."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def main(argv: list[str] | None = None) -> None:
    """The console script's entry point."""
    # Records of the libraries underneath (gcsfs logs each retry with its traceback, azure-identity each
    # credential it tried) would reach stderr through logging's last-resort handler: an error is one line.
    logging.getLogger().addHandler(logging.NullHandler())
    cli.main(args=argv, prog_name="bucketsnap")
