"""Memory and time of `normfold fold` with verification against its floor, on one large model.

    python bench/verify_memory.py MODEL.onnx [--target-opset 23] [--work DIR] [--repeat 1] [--no-floor] [--no-warmup] [--warm-gib G] [--fold-args '...']

Runs an untimed floor of the original first (so that every timed run reads the model from the
page cache; --no-warmup skips it), then, each in a fresh process and one after the other:
  floor (original): one onnxruntime session (optimizations off, as normfold verifies) + one run
  fold:             normfold fold MODEL -o DIR/folded.onnx [--target-opset N] (verification on)
  floor (result):   the same single session + run on the folded model
  floor (write):    a copy of the model's files into DIR (shutil.copyfile: copy_file_range, as the fold
                    writes unchanged tensors), timed only: the write that a fold cannot avoid
(--no-floor: only the fold, for a model whose one session would not fit in memory)
and prints the peak memory of each process tree (sum of PSS over the process and its children,
sampled every 20 ms: the fold's verification runs in child processes; PSS counts pages a fork
shares once) and the wall time, each command run twice: once timed with nothing sampling it,
right after touching --warm-gib of memory (see _warm: this VM charges the first touch of idle
memory to whoever touches it), once sampled for memory; then the ratios the issue asks for:
  memory: fold / max(floor original, floor result)         (target <= 1.15)
  time:   fold / (floor original + floor result)            (target <= 1.25)
  time with the write: fold / (floor original + floor result + floor write)
With --repeat N, also the median ratios over the runs (this VM's wall times vary by 2x with the
load of other jobs; the load average is printed with each run). Also printed: the fold's own timings (load, convert, fold, save, verify) from its JSON report.
Writes only inside --work (default: beside MODEL, in folder 'bench-verify'); deletes the folded
model afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

FLOOR = r"""
import sys, time
import numpy as np, onnxruntime as ort
t = time.perf_counter()
o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
o.intra_op_num_threads = 1; o.log_severity_level = 4
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
feeds = {}
for i in s.get_inputs():
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
    feeds[i.name] = np.zeros(shape, np.int64) if "int" in i.type else np.random.default_rng(0).standard_normal(shape).astype(np.float16 if "16" in i.type else np.float32)
s.run(None, feeds)
"""


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def measure(command: list[str], sample: bool = True) -> tuple[float, int, int]:
    """(wall seconds, peak tree PSS bytes, exit code) of a command. With `sample` False the peak
    is 0 and the wall time is clean: sampling /proc every 20 ms takes a core of this 2-core VM
    and stalls the page faults of the process it reads, which slows a fold (two busy processes:
    writing the result while the original runs) far more than a one-process floor."""
    t = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while sample and process.poll() is None:
        peak = max(peak, sum(_pss(p) for p in _tree(process.pid)))
        time.sleep(0.02)
    process.wait()
    wall = time.perf_counter() - t
    err = process.stderr.read().decode()
    if process.returncode:
        print(f"  {' '.join(command[:4])}...: exit {process.returncode}: {err.strip()[-300:]}", file=sys.stderr)
    return wall, peak, process.returncode


COPY = r"""
import shutil, sys
from pathlib import Path
dest = Path(sys.argv[1])
dest.mkdir(exist_ok=True)
for f in map(Path, sys.argv[2:]):
    shutil.copyfile(f, dest / f.name)
"""


def model_files(model: Path) -> list[Path]:
    """The model and its external data files (named after it, as bench/make_llama.py writes them)."""
    return sorted(model.parent.glob(model.name + "*"))


def floor_write(model: Path, work: Path) -> float:
    """Wall seconds of copying the model's files into work/copy (removed afterwards): the floor of
    any tool that writes the result, since a fold rewrites every tensor it keeps."""
    dest = work / "copy"
    _warm()
    wall, _, _ = measure([sys.executable, "-c", COPY, str(dest), *map(str, model_files(model))], sample=False)
    shutil.rmtree(dest, ignore_errors=True)
    return wall


WARM = r"""
import sys
import numpy as np
np.ones(int(float(sys.argv[1]) * 2**28), np.float32)  # GiB: 2**28 float32 each
"""
WARM_GIB = 0.0  # set from --warm-gib


def _warm() -> None:
    """Touch WARM_GIB of memory in a throw-away process. This VM (firecracker) pages out memory
    idle for a minute (DAMON) and hands free pages back to its host; the first touch of such a page
    costs about 1-3 s per GiB. A fold needs more fresh memory than a floor run (it also writes the
    result into the page cache), so without this the comparison measures the host, not the tool:
    the same fold took 1.0x-1.2x of its floor right after a warm-up and 1.7x-2.6x without."""
    if WARM_GIB > 0:
        subprocess.run([sys.executable, "-c", WARM, str(WARM_GIB)], check=True)


def _remove_outputs(work: Path) -> None:
    for f in work.glob("folded.onnx*"):
        f.unlink()


def _keep_timed_report(work: Path) -> None:
    """The fold's report of its timed run (the sampled run writes report.json again)."""
    if (work / "report.json").exists():
        (work / "report.json").replace(work / "timed-report.json")


def _timed_and_sampled(command: list[str], before=lambda: None, after=lambda: None) -> tuple[float, int, int]:
    """The command run twice: once timed alone, once with its memory sampled; (wall seconds of
    the first, peak PSS of the second, exit code). `before` runs before each (the fold removes
    the previous output, so that both runs write a new file), `after` after the timed one (the
    fold keeps the timed run's report); memory is warmed before each."""
    before()
    _warm()
    wall, _, code = measure(command, sample=False)
    after()
    before()
    _warm()
    _, peak, code2 = measure(command)
    return wall, peak, code or code2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--target-opset", type=int)
    parser.add_argument("--work")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-floor", action="store_true",
                        help="only the fold (a model one onnxruntime session of which would not fit in memory)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first run of the original")
    parser.add_argument("--warm-gib", type=float, default=None,
                        help="GiB of memory touched before each timed command [half of MemAvailable, at most 12; 0: none]")
    parser.add_argument("--fold-args", default="", help="more arguments for normfold fold, e.g. '--verify outputs'")
    args = parser.parse_args()
    global WARM_GIB
    WARM_GIB = min(12.0, _mem_available_gib() / 2) if args.warm_gib is None else args.warm_gib
    model = Path(args.model).resolve()
    work = Path(args.work or model.parent / "bench-verify")
    work.mkdir(parents=True, exist_ok=True)
    out = work / "folded.onnx"
    normfold = [str(Path(sys.executable).with_name("normfold"))]
    fold_cmd = normfold + ["fold", str(model), "-o", str(out), "--report", str(work / "report.json"), "-q"]
    if args.target_opset:
        fold_cmd += ["--target-opset", str(args.target_opset)]
    fold_cmd += args.fold_args.split()
    gib = 2**30
    print(f"{model}: {sum(f.stat().st_size for f in model_files(model)) / gib:.2f} GiB; "
          f"{platform.node()}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / gib:.1f} GiB, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {WARM_GIB:.1f} GiB touched before each timed command")
    rows, ratios = [], []
    if not args.no_floor and not args.no_warmup:
        # Untimed: the first read of a multi-GB file comes from disk, every later one from the
        # page cache; without this the first floor alone would pay for it.
        measure([sys.executable, "-c", FLOOR, str(model)])
    for r in range(args.repeat):
        _remove_outputs(work)
        skip = (float("nan"), 0, 0)
        floor_orig = skip if args.no_floor else _timed_and_sampled([sys.executable, "-c", FLOOR, str(model)])
        fold = _timed_and_sampled(fold_cmd, lambda: _remove_outputs(work), lambda: _keep_timed_report(work))
        floor_res = skip if args.no_floor or not out.exists() else _timed_and_sampled([sys.executable, "-c", FLOOR, str(out)])
        write = float("nan") if args.no_floor else floor_write(model, work)
        timed = work / "timed-report.json"  # the fold's own timings, from its timed run
        report = json.loads(timed.read_text())["models"][0] if timed.exists() else {}
        rows.append((floor_orig, fold, floor_res, report))
        print(f"run {r + 1} (load average {os.getloadavg()[0]:.1f}): floor original {floor_orig[0]:.1f} s / {floor_orig[1] / gib:.2f} GiB; "
              f"fold {fold[0]:.1f} s / {fold[1] / gib:.2f} GiB (exit {fold[2]}); "
              f"floor result {floor_res[0]:.1f} s / {floor_res[1] / gib:.2f} GiB; floor write {write:.1f} s")
        if report:
            v = report.get("verification") or {}
            print(f"  fold timings {report.get('timings')}; verification {v.get('status')} ({v.get('mode')}), "
                  f"sites {sum(s['status'] != 'left' for s in report.get('sites', []))}")
            for note in v.get("notes", []):
                print(f"  note: {note}")
        if args.no_floor:
            continue
        mem = fold[1] / max(floor_orig[1], floor_res[1])
        wall = fold[0] / (floor_orig[0] + floor_res[0])
        with_write = fold[0] / (floor_orig[0] + floor_res[0] + write)
        verify_time = report.get("timings", {}).get("verify", float("nan"))
        print(f"  ratios: memory {mem:.2f}x (target <= 1.15), time {wall:.2f}x (target <= 1.25); "
              f"verification phase alone {verify_time / (floor_orig[0] + floor_res[0]):.2f}x; "
              f"time against the runs and one write {with_write:.2f}x")
        ratios.append((mem, wall, with_write))
    if len(ratios) > 1:
        mems, walls, writes = (sorted(column) for column in zip(*ratios))
        print(f"median of {len(ratios)} runs: memory {mems[len(mems) // 2]:.2f}x, time {walls[len(walls) // 2]:.2f}x "
              f"(time range {walls[0]:.2f}x-{walls[-1]:.2f}x), time against the runs and one write "
              f"{writes[len(writes) // 2]:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
