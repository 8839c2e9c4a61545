"""The benchmark suite runs end to end on tiny inputs (`python -m benchmarks --quick`).

Only that the code works: every pair produced numbers and the JSON report was written.
Benchmarks are never timed tests, so there are no timing assertions here.
"""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.hub_server import clean_environ


def test_quick_benchmark_runs_every_pair(tmp_path):
    work = tmp_path / "bench"
    env = clean_environ()  # no Hub settings of the test session: the benchmark is offline
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--workdir", str(work)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    listed = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--list"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env,
                            check=True).stdout.split()
    doc = json.loads((work / "results.json").read_text())
    pairs = {p["name"]: p for p in doc["pairs"]}
    assert sorted(pairs) == sorted(listed) and len(pairs) >= 11
    for name, p in pairs.items():
        assert p["error"] is None, (name, p["error"])
        assert p["mstore"]["n"] >= 1 and isinstance(p["mstore"]["median"], float), name
        assert p["target"], name
        if p["baseline"] is not None:
            assert isinstance(p["baseline"]["median"], float), name
            assert isinstance(p["ratio"], float), name
        if p["rule"][0] == "report":  # a figure the issue asks for, with no target
            assert p["passed"] is None, name
        else:
            assert p["passed"] in (True, False), name
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["machine"]["versions"]["torch"]
    assert not doc["runner_imported_torch"]
    # big files are gone; the report stays
    assert not (work / "stores").exists() and not (work / "model-tiny").exists()
    assert "pair" in proc.stdout and "ratio" in proc.stdout
