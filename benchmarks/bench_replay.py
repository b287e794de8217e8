"""Replay-buffer persistence: bucketsnap's chunked buffers versus SB3's pickled ``save_replay_buffer``.

The buffer is what SB3's DQN keeps for Atari: a ``ReplayBuffer`` of 100k transitions whose observations are
4 stacked 84x84 grayscale frames, stored as ``(buffer_size, n_envs, 4, 84, 84)`` uint8 for both
``observations`` and ``next_observations`` (DQN's default ``optimize_memory_usage=False``): 5.6 GB of arrays.
Frames are real Pong frames from ale-py (random actions, frameskip 4), grayscale, resized to 84x84 by index
sampling (OpenCV is not installed here; SB3's AtariWrapper uses INTER_AREA). As in SB3, ``next_observations[t]``
is ``observations[t + 1]`` except after an episode's end (108 of 100k), where the next row's stack restarts
from zeros.

Every measurement runs in its own subprocess, so peak RSS is that operation's own: sampled with psutil every
5 ms during the operation (and cross-checked with ``resource.getrusage``), reported as the peak minus the RSS
before the operation began; for restores the buffer being filled counts as part of the peak, so its size is
subtracted too. Both sides write to local disk: SB3 through ``fsspec.open(file://...)``, bucketsnap to a run
directory; then to the S3 test server (LocalStack, or moto's server, from :mod:`bucketsnap.testing`, started by
the script as its own process; ``--skip-s3`` leaves it out): SB3 through ``fsspec.open(s3://...)``, bucketsnap to
an ``s3://`` run, counting the bytes each moves (SB3: its object, written and read whole; bucketsnap: the objects
a save writes, and what a restore reads through the storage layer).

bucketsnap's second save follows 1,000 more transitions added with SB3's ``add`` and hashes every chunk
(``buffer_state(buffer)``, the default ``changes="hash"``); the third, 1,000 transitions later again, trusts the
ring position (``changes="ring"``) and hashes only the chunks it wrote. Run::

    python benchmarks/bench_replay.py [--transitions 100000] [--dir /tmp/bench-replay] [--skip-s3] [--cold]

With ``--cold`` (root, Linux) the page cache is dropped before each load, as on a VM resumed after preemption:
SB3 then reads its pickle from the disk, bucketsnap its chunks.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

STACK = 4
#: The load average when the measurements began (printed with the table).
LOAD_BEFORE: list[float] = []
#: Whether the page cache is dropped before each load (``--cold``).
COLD: list[bool] = []


def generate_frames(n: int, out: Path) -> None:
    """Play Pong with random actions; save frames, actions, rewards, dones as .npy files."""
    import ale_py
    import gymnasium

    gymnasium.register_envs(ale_py)
    env = gymnasium.make("ALE/Pong-v5", obs_type="grayscale", frameskip=4, repeat_action_probability=0.0)
    obs, _ = env.reset(seed=0)
    rows = (np.arange(84) * 210 // 84)[:, None]
    cols = (np.arange(84) * 160 // 84)[None, :]
    total = n + STACK
    frames = np.lib.format.open_memmap(out / "frames.npy", mode="w+", dtype=np.uint8, shape=(total, 84, 84))
    actions = np.zeros(total, np.int64)
    rewards = np.zeros(total, np.float32)
    dones = np.zeros(total, bool)
    rng = np.random.default_rng(0)
    for i in range(total):
        actions[i] = rng.integers(6)
        obs, reward, terminated, truncated, _ = env.step(int(actions[i]))
        frames[i] = obs[rows, cols]
        rewards[i], dones[i] = reward, terminated or truncated
        if dones[i]:
            obs, _ = env.reset()
    frames.flush()
    del frames
    np.save(out / "actions.npy", actions)
    np.save(out / "rewards.npy", rewards)
    np.save(out / "dones.npy", dones)


def make_buffer(size: int) -> Any:
    import gymnasium
    from stable_baselines3.common.buffers import ReplayBuffer

    space = gymnasium.spaces.Box(0, 255, (STACK, 84, 84), np.uint8)
    return ReplayBuffer(size, space, gymnasium.spaces.Discrete(6), device="cpu")


def filled_buffer(data: Path, n: int, size: int) -> Any:
    """A buffer holding transitions 0..n-1 exactly as ``ReplayBuffer.add`` lays them out (written in bulk)."""
    buffer = make_buffer(size)
    frames = np.load(data / "frames.npy", mmap_mode="r")
    windows = np.lib.stride_tricks.sliding_window_view(frames, STACK, axis=0).transpose(0, 3, 1, 2)
    block = 5000
    for start in range(0, n, block):
        end = min(n, start + block)
        rows = np.arange(start, end) % size
        buffer.observations[rows, 0] = windows[start:end]
        buffer.next_observations[rows, 0] = windows[start + 1 : end + 1]
    buffer.actions[np.arange(n) % size, 0, 0] = np.load(data / "actions.npy")[:n]
    buffer.rewards[np.arange(n) % size, 0] = np.load(data / "rewards.npy")[:n]
    dones = np.load(data / "dones.npy")[:n]
    buffer.dones[np.arange(n) % size, 0] = dones
    # After an episode's end, VecFrameStack starts the stack again from zeros: that row's observation is not the
    # terminal next_observation of the row before (which SB3 takes from infos["terminal_observation"]).
    for t in np.flatnonzero(dones[: n - 1]):
        buffer.observations[(t + 1) % size, 0, :-1] = 0
    buffer.pos = n % size
    buffer.full = n >= size
    del frames, windows
    return buffer


def add_transitions(buffer: Any, data: Path, start: int, count: int) -> None:
    """``count`` more transitions through SB3's own ``add``."""
    frames = np.load(data / "frames.npy", mmap_mode="r")
    for i in range(start, start + count):
        j = i % (len(frames) - STACK - 1)
        buffer.add(
            frames[j : j + STACK][None],
            frames[j + 1 : j + 1 + STACK][None],
            np.array([[i % 6]]),
            np.array([0.0]),
            np.array([False]),
            [{}],
        )


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Sample this process's RSS every 5 ms; yields a dict filled with ``before`` and ``peak`` on exit."""
    proc = psutil.Process()
    result = {"before": float(proc.memory_info().rss), "peak": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], float(proc.memory_info().rss))
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], float(proc.memory_info().rss))
        result["ru_maxrss"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def cpu_seconds() -> tuple[float, float]:
    """User and system CPU time of this process, all threads: unlike wall time, not stretched by other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def timed(fn: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
    with peak_rss() as rss:
        t, cpu = time.perf_counter(), cpu_seconds()
        out = fn()
        seconds = time.perf_counter() - t
        user, system = cpu_seconds()
        rss["cpu_user"], rss["cpu_sys"] = user - cpu[0], system - cpu[1]
        rss["cpu"] = rss["cpu_user"] + rss["cpu_sys"]
    return out, seconds, rss


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def dqn_model(buffer_size: int) -> Any:
    import gymnasium
    from stable_baselines3 import DQN

    class FrameEnv(gymnasium.Env[np.ndarray, int]):
        observation_space = gymnasium.spaces.Box(0, 255, (STACK, 84, 84), np.uint8)
        action_space = gymnasium.spaces.Discrete(6)

    return DQN("CnnPolicy", FrameEnv(), buffer_size=buffer_size, learning_starts=10**9, device="cpu")


# -- the phases, each in its own process ----------------------------------------------------------------------


def target(work: Path, remote: dict[str, Any] | None, name: str) -> tuple[str, dict[str, Any]]:
    """The URL and storage options of ``name``: under ``work`` on local disk, or in the S3 test bucket."""
    if remote is None:
        return f"file://{work}/{name}", {}
    return f"{remote['url']}/{name}", remote["options"]


@contextmanager
def counted_reads() -> Iterator[dict[str, int]]:
    """Tally the bytes bucketsnap reads through its storage layer (every read of an object goes there)."""
    from bucketsnap._storage import Storage

    real = Storage.read
    tally = {"bytes": 0, "requests": 0}

    def read(self: Storage, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        data = real(self, rel, start, end)
        tally["bytes"] += len(data)
        tally["requests"] += 1
        return data

    Storage.read = read  # type: ignore[method-assign]
    try:
        yield tally
    finally:
        Storage.read = real  # type: ignore[method-assign]


def phase_sb3_save(data: Path, work: Path, n: int, remote: dict[str, Any] | None) -> dict[str, Any]:
    import fsspec

    model = dqn_model(1)
    model.replay_buffer = filled_buffer(data, n, n)
    url, options = target(work, remote, "sb3_buffer.pkl")

    def save() -> None:
        # SB3 accepts only io's own file types: wrap fsspec's file (as one must for s3:// or gs://)
        with fsspec.open(url, "wb", **options) as f, io.BufferedWriter(f, buffer_size=2**20) as buffered:
            model.save_replay_buffer(buffered)

    _, seconds, rss = timed(save)
    fs, path = fsspec.core.url_to_fs(url, **options)
    return {"seconds": seconds, "bytes": int(fs.size(path)), **rss}


def phase_sb3_load(data: Path, work: Path, n: int, remote: dict[str, Any] | None) -> dict[str, Any]:
    import fsspec

    model = dqn_model(1)
    url, options = target(work, remote, "sb3_buffer.pkl")

    def load() -> None:
        with fsspec.open(url, "rb", **options) as f, io.BufferedReader(f, 2**20) as buffered:
            model.load_replay_buffer(buffered)

    _, seconds, rss = timed(load)
    buffer = model.replay_buffer
    return {"seconds": seconds, "buffer_bytes": buffer.observations.nbytes * 2, "pos": buffer.pos, **rss}


def phase_bs_save(data: Path, work: Path, n: int, remote: dict[str, Any] | None) -> dict[str, Any]:
    from bucketsnap import SnapshotStore
    from bucketsnap.buffers import buffer_state

    url, options = target(work, remote, "run")
    store = SnapshotStore(url, storage_options=options)
    buffer = filled_buffer(data, n, n)
    store.save(0, {"step": 0})  # the store's first contact with the server, apart from the timings
    info, seconds, rss = timed(lambda: store.save(1, {"replay_buffer": buffer_state(buffer)}))
    stored = sum(store.storage.list_sizes("chunks").values()) + info.size
    out: dict[str, Any] = {
        "seconds": seconds,
        "bytes": stored,
        "chunks": len(info.refs),
        "raw_bytes": buffer.observations.nbytes * 2,
        **rss,
    }
    for itr, changes in ((2, "hash"), (3, "ring")):
        before = store.storage.list_sizes("chunks")
        add_transitions(buffer, data, n + 1000 * (itr - 2), 1000)
        made: list[Any] = []

        def save(itr: int = itr, changes: str = changes, made: list[Any] = made) -> Any:
            made.append(buffer_state(buffer, changes=changes))  # type: ignore[arg-type]  # timed too
            return store.save(itr, {"replay_buffer": made[0]})

        later, seconds_later, rss_later = timed(save)
        value = made[0]
        new = {k: v for k, v in store.storage.list_sizes("chunks").items() if k not in before}
        out[f"save{itr}"] = {
            "seconds": seconds_later,
            "written": sum(new.values()) + later.size,
            "new_chunks": len(new),
            "hashed": value.hashed,
            "rehashed": value.rehashed,
            "cpu": rss_later["cpu"],
            "peak": rss_later["peak"] - rss_later["before"],
        }
    out["read_once"] = min(read_once(buffer) for _ in range(3))
    return out


def read_once(buffer: Any) -> float:
    """Seconds to read every byte of the buffer's arrays once, on as many threads as a save hashes on (numpy's
    sums release the GIL): the floor of any save that looks at every byte, as ``changes="hash"`` does."""
    from bucketsnap._chunks import HASH_THREADS

    arrays = [
        a.reshape(-1).view(np.uint64) for a in vars(buffer).values() if isinstance(a, np.ndarray) and a.nbytes % 8 == 0
    ]
    step = 2**20
    pieces = [(a, i) for a in arrays for i in range(0, a.size, step)]
    began = time.perf_counter()
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        list(pool.map(lambda piece: int(piece[0][piece[1] : piece[1] + step].sum()), pieces))
    return time.perf_counter() - began


def phase_bs_load(data: Path, work: Path, n: int, remote: dict[str, Any] | None) -> dict[str, Any]:
    from bucketsnap import SnapshotStore
    from bucketsnap.buffers import restore_buffer

    url, options = target(work, remote, "run")
    store = SnapshotStore(url, storage_options=options)
    store.open(1)  # the first contact, apart from the timings
    buffer = make_buffer(n)
    with counted_reads() as reads:
        _, seconds, rss = timed(lambda: restore_buffer(store, buffer, which=1))
    return {
        "seconds": seconds,
        "buffer_bytes": buffer.observations.nbytes * 2,
        "pos": buffer.pos,
        "read": reads["bytes"],
        "requests": reads["requests"],
        **rss,
    }


PHASES = {f.__name__.removeprefix("phase_"): f for f in (phase_sb3_save, phase_sb3_load, phase_bs_save, phase_bs_load)}


def run_phase(name: str, data: Path, work: Path, n: int, remote: dict[str, Any] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", name, "--dir", str(work), "--data", str(data), "--transitions", str(n)]
    if remote is not None:
        cmd += ["--remote", json.dumps(remote)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"phase {name} failed (exit status {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transitions", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--phase", choices=sorted(PHASES))
    parser.add_argument("--data", type=Path)
    parser.add_argument("--remote", type=json.loads, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-s3", action="store_true", help="leave out the S3 column")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of the local phases; each figure is their median (times also show min-max)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each load (needs root): a VM resumed after preemption reads SB3's "
        "pickle from its disk, not from memory",
    )
    parser.add_argument(
        "--s3-transitions",
        type=int,
        default=None,
        help="transitions of the S3 column (default: --transitions); SB3's save through s3fs holds its pickled "
        "arrays in s3fs's write buffer, about twice the buffer's size more memory",
    )
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args.data, args.dir, args.transitions, args.remote)))
        return
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-replay-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "frames"
    data.mkdir(exist_ok=True)
    n = args.transitions
    frames = data / "frames.npy"
    if not frames.exists() or np.load(frames, mmap_mode="r").shape[0] != n + STACK:
        t = time.perf_counter()
        generate_frames(n, data)
        print(f"generated {n} Pong frames in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    runs: list[dict[str, dict[str, Any]]] = []
    LOAD_BEFORE.extend(os.getloadavg())
    try:
        COLD.extend([True] if args.cold else [])
        for _ in range(max(1, args.repeats)):
            run: dict[str, dict[str, Any]] = {}
            for name in PHASES:
                if args.cold and name.endswith("_load"):
                    drop_page_cache()
                run[name] = run_phase(name, data, work, n)
            runs.append(run)
            for path in (work / "run", work / "sb3_buffer.pkl"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    finally:  # keep the frames for the next run when --dir was given
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(median_of(runs), n, spread_of(runs), len(runs))
    if not args.skip_s3:
        print(flush=True)
        n_s3 = min(n, args.s3_transitions or n)
        print_s3_table(run_s3(data, work, n_s3), n_s3)


def drop_page_cache() -> None:
    """Write the dirty pages out, then drop the clean ones (Linux, as root), as a rebooted or resumed VM has."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs to write /proc/sys/vm/drop_caches (root, Linux): {exc}") from exc


def run_s3(data: Path, work: Path, n: int) -> dict[str, dict[str, Any]]:
    """Every phase again against the S3 test server, started here as its own process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import servers

    server = servers.s3_server()
    try:
        remote = {"url": f"s3://{server.create_bucket()}", "options": servers.s3_storage_options(server)}
        print(f"S3: {type(server).__name__} at {server.endpoint_url}", file=sys.stderr)
        return {name: run_phase(name, data, work, n, remote) for name in PHASES}
    finally:
        server.stop()


def median_of(runs: list[Any]) -> Any:
    """The median of each number across ``runs`` (dicts of the same shape, nested)."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: median_of([run[key] for run in runs]) for key in first}
    if isinstance(first, int) and not isinstance(first, bool):
        return round(float(np.median(runs)))
    if isinstance(first, float):
        return float(np.median(runs))
    return first


def spread_of(runs: list[dict[str, dict[str, Any]]]) -> dict[str, str]:
    """``phase`` -> the min-max of its wall times across ``runs`` (empty for a single run); ``save`` and ``load``
    -> SB3's time over bucketsnap's in each run, in run order: the two ran one after the other, so a ratio is not
    skewed by how busy the machine or its kernel (zeroing and compacting pages) was in another run."""
    if len(runs) < 2:
        return {}
    out = {}
    for phase in runs[0]:
        seconds = [run[phase]["seconds"] for run in runs]
        out[phase] = f" [{min(seconds):.2f}-{max(seconds):.2f}]"
    for what in ("save", "load"):
        ratios = [run[f"sb3_{what}"]["seconds"] / run[f"bs_{what}"]["seconds"] for run in runs]
        out[what] = ", ".join(f"{r:.1f}x" for r in ratios)
    return out


def print_table(r: dict[str, dict[str, Any]], n: int, spread: dict[str, str] | None = None, repeats: int = 1) -> None:
    mb = 1e6
    spread = spread or {}
    raw = r["bs_save"]["raw_bytes"]
    sb3s, sb3l, bss, bsl = r["sb3_save"], r["sb3_load"], r["bs_save"], r["bs_load"]
    hashed, ring = bss["save2"], bss["save3"]
    print(f"SB3 DQN ReplayBuffer, {n:,} transitions of 4x84x84 uint8 frames (obs + next_obs: {raw / 1e9:.2f} GB)")
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, local disk")
    runs = f", median of {repeats} runs [min-max]" if repeats > 1 else ""
    cold = "; the page cache dropped before each load (--cold)" if COLD else ""
    print(f"load average before the run: {' '.join(f'{x:.1f}' for x in LOAD_BEFORE or os.getloadavg())}{runs}{cold}\n")
    rows = [
        ("size on storage", f"{sb3s['bytes'] / mb:,.0f} MB", f"{bss['bytes'] / mb:,.1f} MB ({bss['chunks']} chunks)"),
        (
            "save time",
            f"{sb3s['seconds']:.2f} s{spread.get('sb3_save', '')}",
            f"{bss['seconds']:.2f} s{spread.get('bs_save', '')} ({sb3s['seconds'] / bss['seconds']:.1f}x)",
        ),
        (
            "load time",
            f"{sb3l['seconds']:.2f} s{spread.get('sb3_load', '')}",
            f"{bsl['seconds']:.2f} s{spread.get('bs_load', '')} ({sb3l['seconds'] / bsl['seconds']:.1f}x)",
        ),
        *(
            [("SB3's time over bucketsnap's, run by run", f"save: {spread['save']}", f"load: {spread['load']}")]
            if spread
            else []
        ),
        ("save CPU, all threads (user + system)", cpu_split(sb3s), f"{cpu_split(bss)} {ratio(sb3s, bss, 'cpu')}"),
        ("load CPU, all threads (user + system)", cpu_split(sb3l), f"{cpu_split(bsl)} {ratio(sb3l, bsl, 'cpu')}"),
        (
            "2nd save, +1,000 transitions, changes='hash'",
            f"{sb3s['bytes'] / mb:,.0f} MB written (all again)",
            f"{hashed['seconds']:.2f} s ({hashed['cpu']:.2f} s CPU), {hashed['written'] / mb:,.2f} MB written "
            f"({hashed['new_chunks']} new chunks; {hashed['hashed']} read, {hashed['rehashed']} of them hashed "
            "with BLAKE3); reading the buffer once takes "
            f"{bss['read_once']:.2f} s",
        ),
        (
            "3rd save, +1,000 more, changes='ring'",
            "same as save",
            f"{ring['seconds']:.2f} s ({ring['cpu']:.2f} s CPU), {ring['written'] / mb:,.2f} MB written "
            f"({ring['new_chunks']} new chunks, {ring['hashed']} read, {ring['rehashed']} hashed with BLAKE3)",
        ),
        (
            "peak RSS during save, above the buffer",
            f"{(sb3s['peak'] - sb3s['before']) / mb:,.0f} MB",
            f"{(bss['peak'] - bss['before']) / mb:,.0f} MB",
        ),
        (
            "peak RSS during load, above the buffer",
            f"{(sb3l['peak'] - sb3l['before'] - sb3l['buffer_bytes']) / mb:,.0f} MB",
            f"{(bsl['peak'] - bsl['before'] - bsl['buffer_bytes']) / mb:,.0f} MB",
        ),
        ("peak RSS of the load process", f"{sb3l['peak'] / mb:,.0f} MB", f"{bsl['peak'] / mb:,.0f} MB"),
    ]
    print_rows(rows, "SB3 save_replay_buffer (pickle)", "bucketsnap chunks")


def print_s3_table(r: dict[str, dict[str, Any]], n: int) -> None:
    mb = 1e6
    sb3s, sb3l, bss, bsl = r["sb3_save"], r["sb3_load"], r["bs_save"], r["bs_load"]
    ring = bss["save3"]
    print(f"The same {n:,} transitions to and from the S3 test server (127.0.0.1)\n")
    rows = [
        (
            "save: time, bytes uploaded",
            f"{sb3s['seconds']:.1f} s, {sb3s['bytes'] / mb:,.0f} MB",
            f"{bss['seconds']:.1f} s ({sb3s['seconds'] / bss['seconds']:.1f}x), {bss['bytes'] / mb:,.1f} MB",
        ),
        (
            "load: time, bytes downloaded",
            f"{sb3l['seconds']:.1f} s, {sb3s['bytes'] / mb:,.0f} MB (the whole object)",
            f"{bsl['seconds']:.1f} s ({sb3l['seconds'] / bsl['seconds']:.1f}x), {bsl['read'] / mb:,.1f} MB "
            f"({bsl['requests']} ranged reads)",
        ),
        (
            "save +1,000 transitions, changes='ring'",
            f"as the save: {sb3s['bytes'] / mb:,.0f} MB",
            f"{ring['seconds']:.2f} s, {ring['written'] / mb:,.2f} MB uploaded",
        ),
    ]
    print_rows(rows, "SB3 through fsspec.open(s3://...)", "bucketsnap buffer_state / restore_buffer")


def ratio(theirs: dict[str, Any], ours: dict[str, Any], key: str) -> str:
    return f"({theirs[key] / ours[key]:.1f}x)"


def cpu_split(r: dict[str, Any]) -> str:
    return f"{r['cpu']:.2f} s ({r['cpu_user']:.2f} + {r['cpu_sys']:.2f})"


def print_rows(rows: list[tuple[str, str, str]], left: str, right: str) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"| {'':{width}} | {left} | {right} |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for label, a, b in rows:
        print(f"| {label:{width}} | {a} | {b} |")


if __name__ == "__main__":
    main()
