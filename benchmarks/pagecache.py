"""What a new page of the page cache costs on this machine, and what the Hub import's two
copies of every downloaded byte cost against one (issue 16, target 3).

    python -m benchmarks.pagecache [--mb 300] [--repeats 5] [--idle 4] [--output PATH]

Each case writes `--mb` megabytes into a fresh file in 10 MB `pwrite`s (what
huggingface_hub's downloader does with its chunks) and reports the CPU time the kernel spent
(system time of this process), every case in its own subprocess, cases alternated:

- write, pages just freed: the page cache is dropped right before, so the kernel hands the
  writes pages it freed a moment ago;
- write, after idle: dropped, then `--idle` seconds of nothing first, as between two
  commands (time for a VM to hand freed memory back to its host, which it then gets back
  only by faulting it in again; on this project's machine the cost moved 10x between runs
  either way);
- write + copy: after idle, a second thread copies each range into a second file with
  copy_file_range as soon as it is written: the streamed Hub import's `.part` plus its
  objects;
- write + copy + punch: the same, each copied range then punched out of the first file
  (`fallocate(PUNCH_HOLE)`), so the copy reuses the pages the write just gave up.

Needs root (it drops the page cache). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report import machine_info, now_utc, write_json

CASES = {  # name: (idle before, copy, punch)
    "write, pages just freed": (False, False, False),
    "write, after idle": (True, False, False),
    "write + copy": (True, True, False),
    "write + copy + punch": (True, True, True),
}

CHILD = r"""
import ctypes, json, os, resource, sys, threading, time
path, total, copy, punch = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
CHUNK = 10 * 1024 * 1024
data = os.urandom(CHUNK)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
written, finished = 0, threading.Event()
def copier():
    out = os.open(path + ".copy", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    pos = 0
    while pos < total:
        end = written
        if end == pos:
            finished.wait(0.001)
            continue
        while pos < end:
            n = os.copy_file_range(fd, out, end - pos, pos)
            if punch:
                libc.fallocate(fd, 3, pos, n)  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            pos += n
    os.close(out)
    os.unlink(path + ".copy")
worker = threading.Thread(target=copier) if copy else None
t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
if worker:
    worker.start()
for off in range(0, total, CHUNK):
    written += os.pwrite(fd, data[: min(CHUNK, total - off)], off)
finished.set()
if worker:
    worker.join()
r1 = resource.getrusage(resource.RUSAGE_SELF)
os.close(fd)
os.unlink(path)
print(json.dumps({"wall_s": time.perf_counter() - t0, "sys_s": r1.ru_stime - r0.ru_stime,
                  "user_s": r1.ru_utime - r0.ru_utime}))
"""


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def run_case(folder: Path, total: int, idle_s: float, case: tuple[bool, bool, bool]) -> dict:
    idle, copy, punch = case
    drop_page_cache()
    if idle:
        time.sleep(idle_s)
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder / "part"), str(total),
                          "1" if copy else "0", "1" if punch else "0"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pagecache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=300, help="megabytes written per case")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--idle", type=float, default=4.0, help="seconds idle before the idle cases")
    ap.add_argument("--workdir", type=Path, default=None, help="where the files go (default a "
                    "temp folder under benchmarks/work/)")
    ap.add_argument("--output", type=Path, default=None)
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("error: needs root (drops the page cache)", file=sys.stderr)
        return 2
    base = Path(__file__).parent / "work"
    base.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.workdir or base) as tmp:
        runs: dict[str, list[dict]] = {name: [] for name in CASES}
        for _ in range(a.repeats):
            for name, case in CASES.items():
                runs[name].append(run_case(Path(tmp), a.mb << 20, a.idle, case))
    doc = {"when": now_utc(), "machine": machine_info(), "mb": a.mb, "idle_s": a.idle,
           "runs": runs,
           "median": {n: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "sys_s")}
                      for n, rs in runs.items()}}
    print(f"{'case':28s} {'kernel CPU (sys)':>17s} {'per GiB':>8s} {'wall':>8s}   n={a.repeats}")
    for name, m in doc["median"].items():
        print(f"{name:28s} {m['sys_s'] * 1e3:14.0f} ms {m['sys_s'] / (a.mb / 1024):6.2f} s "
              f"{m['wall_s'] * 1e3:6.0f} ms")
    out = a.output or (Path(__file__).parent / "results" /
                       f"{time.strftime('%Y-%m-%d')}-pagecache.json")
    write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
