"""Mutation testing of normfold's core modules with mutmut 3 (not run in CI: too slow).

    pip install -e '.[test,mutation]'
    python tests/mutation/run.py report passes/norms      # modules under normfold/, no .py
    python tests/mutation/run.py --all                    # every module in MODULES
    python tests/mutation/run.py --summary report         # counts of the last run, no new run

Each module runs in its own scratch copy of the repository (.mutation/<module>/, git-ignored), so
that mutmut's per-function test mapping is built from only the test files listed for that module in
MODULES (tests/test_corpus.py never: it is slow and re-checks what the unit tests check). mutmut
mutates every function of the module, runs the mapped tests once to learn which tests call which
function, then runs, per mutant, only the tests that called the mutated function (`-x`, in a forked
child). Results are cached in the scratch copy: a second run of an unchanged module is quick; pass
--fresh to start over.

The score counts a mutant as killed when a test failed or timed out with it applied. A survivor
listed as `equivalent` in tests/mutation/SURVIVORS.md (by its mutmut name) is left out of the
denominator: score = killed / (mutants - equivalent). Every other survivor is a missing test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRATCH = ROOT / ".mutation"
SURVIVORS_MD = Path(__file__).with_name("SURVIVORS.md")

PASS_TESTS = ["tests/test_norms.py", "tests/test_batchnorm.py", "tests/test_channel_affine.py", "tests/test_layernorm.py",
              "tests/test_rmsnorm.py", "tests/test_groupnorm.py", "tests/test_instance_affine.py"]
NORM_TESTS = ["tests/test_norms.py", "tests/test_layernorm.py", "tests/test_rmsnorm.py", "tests/test_groupnorm.py"]
BN_TESTS = ["tests/test_batchnorm.py", "tests/test_batchnorm_sites.py", "tests/test_linear.py", "tests/test_next_layer.py", "tests/test_channel_affine.py", "tests/test_prepare.py"]
VERIFY_TESTS = ["tests/test_verify_units.py", "tests/test_verify.py", "tests/test_verify_rules.py",
                "tests/test_verify_accuracy.py", "tests/test_verify_local.py"]
PIPELINE_TESTS = ["tests/test_cli.py", "tests/test_pipeline.py", "tests/test_robustness.py", "tests/test_prepare.py"]

# module (path under normfold/ without .py, or a package folder) -> the test files that exercise it
MODULES: dict[str, list[str]] = {
    "report": ["tests/test_contracts.py", "tests/test_cli.py", "tests/test_pipeline.py"],
    "exit_codes": ["tests/test_cli.py", "tests/test_pipeline.py", "tests/test_contracts.py"],
    "passes/_algebra": ["tests/test_algebra.py"] + NORM_TESTS,
    "passes/norms": NORM_TESTS,
    "passes/layernorm": ["tests/test_layernorm.py"],
    "passes/rmsnorm": ["tests/test_rmsnorm.py"],
    "passes/groupnorm": ["tests/test_groupnorm.py", "tests/test_instance_affine.py"],
    "passes/instance_affine": ["tests/test_instance_affine.py", "tests/test_groupnorm.py"],
    "passes/batchnorm": BN_TESTS,
    "passes/_linear": BN_TESTS,
    "passes/_next_layer": BN_TESTS,
    "passes/channel_affine": BN_TESTS + ["tests/test_channel_affine_fold_units.py", "tests/test_channel_pair_units.py"],
    "passes/_pattern": PASS_TESTS + ["tests/test_pattern.py"],
    # the driver: every pass test calls it, and a survivor re-ran all of them (90 s each); test_driver.py
    # tests it with stand-in rules, test_instance_affine.py through one small real rule
    "passes/__init__": ["tests/test_driver.py", "tests/test_instance_affine.py"],
    "verify": VERIFY_TESTS + ["tests/test_contracts.py", "tests/test_preload.py"],
    "accuracy": VERIFY_TESTS + ["tests/test_accuracy_units.py"],
    "verify_local": VERIFY_TESTS + ["tests/test_verify_local_units.py"],
    # io and api: only their unit tests. Every command-line test calls io's and api's functions, and
    # mutmut runs, per surviving mutant, every test that called the mutated function: with
    # PIPELINE_TESTS mapped (about 200 s of tests, 40 s of them one fuzz test) a run of io's 846
    # mutants took 15 minutes to map and then minutes per survivor. A survivor here may still be
    # killed by a command-line test; SURVIVORS.md says which were checked that way.
    "io": ["tests/test_io_units.py"],
    "api": ["tests/test_api_units.py"],
}

# Tests that run the installed `normfold` in a subprocess see the unmutated package, and under load
# their signal timing is flaky: left out of mutation runs.
DESELECT = ["tests/test_pipeline.py::test_interrupted_run_leaves_no_output",
            "tests/test_cli.py::test_console_script_and_module_entry_agree"]

KILLED = {1, 3, 36, -24, 24, 152, 255}  # a test failed, pytest errored, or it timed out
SURVIVED = {0}
NO_TESTS = {5, 33}  # no test calls the mutated function: a survivor too


def slug(module: str) -> str:
    return module.replace("/", ".")


def mutate_patterns(module: str) -> list[str]:
    path = ROOT / "normfold" / module
    if path.is_dir():
        return [f"normfold/{module}/*.py"]
    return [f"normfold/{module}.py"]


def prepare(module: str, fresh: bool) -> Path:
    work = SCRATCH / slug(module)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    # A fresh copy of the sources each run; mutmut re-mutates only files whose content changed.
    for name in ("normfold", "cli", "tests", "models"):
        src, dst = ROOT / name, work / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.folded.onnx", "mutation",
                                                                 ".hypothesis"))
    shutil.copy2(ROOT / "README.md", work / "README.md")  # tests compare README with the code
    tests = [t for t in MODULES[module] if (ROOT / t).exists()]
    config = {
        "source_paths": ["normfold"],
        "only_mutate": mutate_patterns(module),
        "also_copy": ["cli", "models", "README.md"],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-W", "ignore", "--hypothesis-seed=0"]
                               + [f"--deselect={t}" for t in DESELECT],
        "use_git_change_detection": False,
        "use_setproctitle": False,
    }
    lines = [(ROOT / "pyproject.toml").read_text(), "", "[tool.mutmut]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in config.items()]
    (work / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return work


def meta_results(work: Path) -> dict[str, int | None]:
    """mutant name -> mutmut exit code, from the .meta files of the scratch copy."""
    results: dict[str, int | None] = {}
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        results.update(json.loads(meta.read_text()).get("exit_code_by_key", {}))
    return results


def equivalent_names() -> set[str]:
    """Mutant names SURVIVORS.md marks as equivalent: table rows `| name | ... | equivalent | ...`."""
    if not SURVIVORS_MD.exists():
        return set()
    names = set()
    for line in SURVIVORS_MD.read_text().splitlines():
        # `\|` in a cell is a pipe of the mutated code (show_survivors escapes them), not a column
        cells = [c.strip().strip("`") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) >= 4 and cells[3].startswith("equivalent"):
            names.add(cells[0])
    return names


def summarise(module: str, work: Path) -> dict:
    results = meta_results(work)
    equivalent = equivalent_names()
    killed = sorted(n for n, c in results.items() if c in KILLED)
    survived = sorted(n for n, c in results.items() if c in SURVIVED | NO_TESTS)
    unchecked = sorted(n for n, c in results.items() if c is None)
    other = sorted(n for n, c in results.items() if c is not None and c not in KILLED | SURVIVED | NO_TESTS)
    equiv = sorted(n for n in survived if n in equivalent)
    live = [n for n in survived if n not in equivalent]
    denominator = len(results) - len(unchecked) - len(equiv)
    score = 100.0 * len(killed) / denominator if denominator else 100.0
    return {"module": module, "mutants": len(results), "unchecked": len(unchecked), "killed": len(killed),
            "survived": len(survived), "equivalent": len(equiv), "not_killed": live,
            "other": {n: results[n] for n in other}, "score": score}


def _where(work: Path, name: str, diff: str) -> tuple[str, str]:
    """file:line of a mutant and its one-line change, from `mutmut show`'s diff of the function."""
    module, _, function = name.rpartition("__mutmut_")[0].partition(".x")
    path = Path(*module.split(".")).with_suffix(".py")
    if not (work / path).exists():  # a package's __init__.py: mutmut names it after the package
        path = Path(*module.split(".")) / "__init__.py"
    function = function.lstrip("_").split("ǁ")[-1] if "ǁ" in function else function[1:]
    source = (work / path).read_text().splitlines()
    start = next((i for i, line in enumerate(source) if re.match(rf"\s*def {re.escape(function)}\(", line)), 0)
    offset, old, new, line_no = 0, "", "", None
    for line in diff.splitlines():
        hunk = re.match(r"@@ -(\d+)", line)
        if hunk:
            offset = int(hunk.group(1)) - 1
            continue
        if line.startswith(("---", "+++")) or offset is None:
            continue
        if line.startswith("-") and not old:
            old, line_no = line[1:].strip(), start + offset + 1
        elif line.startswith("+") and not new:
            new = line[1:].strip()
        if not line.startswith("+"):
            offset += 1
    return f"{path.as_posix()}:{line_no}", f"`{old}` -> `{new}`".replace("|", "\\|")


def show_survivors(work: Path, names: list[str], out: Path) -> None:
    """The diff of every survivor (mutmut show, run in the scratch copy), and SURVIVORS.md rows."""
    texts, rows = [], []
    for name in names:
        shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work,
                               capture_output=True, text=True).stdout.strip()
        texts.append(f"## {name}\n{shown}\n")
        where, change = _where(work, name, shown)
        rows.append(f"| `{name}` | {where} | {change} | open: no test kills it yet |")
    out.write_text("\n".join(texts))
    out.with_name("survivors.md").write_text("\n".join(rows) + "\n")


def run_bounded(command: list[str], cwd: Path, env: dict, out, minutes: float | None):
    """mutmut in its own process group, so that a time limit or Ctrl-C stops its workers too."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=minutes * 60 if minutes else None)
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if isinstance(exc, KeyboardInterrupt):
            raise
        print(f"   stopped after {minutes:g} minutes; unrun mutants stay unrun", flush=True)
        return subprocess.CompletedProcess(command, 0)
    return subprocess.CompletedProcess(command, proc.returncode)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"modules under normfold/: {', '.join(MODULES)}")
    parser.add_argument("--all", action="store_true", help="every module in MODULES")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once [2]")
    parser.add_argument("--fresh", action="store_true", help="forget cached results first")
    parser.add_argument("--summary", action="store_true", help="print the last run's counts only")
    parser.add_argument("--survivors", action="store_true",
                        help="run again only the mutants that survived last time (after adding tests)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop each module's run after this long; results so far are kept, the rest stay unrun")
    parser.add_argument("--only", metavar="GLOB", action="append", default=[],
                        help="mutmut names to run, e.g. 'normfold.passes.norms.x_fuse*' (repeatable)")
    args = parser.parse_args()
    modules = list(MODULES) if args.all else args.modules
    unknown = [m for m in modules if m not in MODULES]
    if unknown or not modules:
        parser.error(f"unknown or no module: {unknown}; choose from {', '.join(MODULES)}")
    rows = []
    for module in modules:
        work = SCRATCH / slug(module)
        if not args.summary:
            work = prepare(module, args.fresh)
            print(f"== {module}: tests {' '.join(MODULES[module])}", flush=True)
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
            names = list(args.only)
            if args.survivors and (work / "mutants").exists():
                names += summarise(module, work)["not_killed"]
                if not names:
                    print(f"== {module}: no survivors to run again")
            log = work / "mutmut.log"
            with log.open("w") as out:
                command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs)]
                if names or not (args.survivors or args.only):
                    run = run_bounded(command + names, work, env, out, args.minutes)
                else:
                    run = subprocess.CompletedProcess(command, 0)
            if run.returncode != 0:
                print(f"normfold mutation: mutmut failed on {module} (exit {run.returncode}); see {log}",
                      file=sys.stderr)
        row = summarise(module, work)
        rows.append(row)
        show_survivors(work, row["not_killed"], work / "survivors.txt")
    print(f"\n{'module':24} {'mutants':>8} {'unrun':>6} {'killed':>7} {'survived':>9} {'equiv':>6} {'score':>7}")
    for r in rows:
        print(f"{r['module']:24} {r['mutants']:8} {r['unchecked']:6} {r['killed']:7} {r['survived']:9} "
              f"{r['equivalent']:6} {r['score']:6.1f}%")
        for name in r["not_killed"]:
            print(f"    survived: {name}")
        for name, code in r["other"].items():
            print(f"    {name}: mutmut exit code {code}")
    total = {k: sum(r[k] for r in rows) for k in ("mutants", "unchecked", "killed", "survived", "equivalent")}
    denominator = total["mutants"] - total["unchecked"] - total["equivalent"]
    score = 100.0 * total["killed"] / denominator if denominator else 100.0
    print(f"{'total':24} {total['mutants']:8} {total['unchecked']:6} {total['killed']:7} {total['survived']:9} "
          f"{total['equivalent']:6} {score:6.1f}%")
    print("score = killed / (mutants - unrun - equivalent); a timeout counts as killed")
    print(f"diffs of the survivors: {SCRATCH}/<module>/survivors.txt, rows for SURVIVORS.md in survivors.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
