"""Run the gpu-marked tests and record pass/fail counts per test file in bench/results/<gpu>.json
(section `gpu_tests`, with the commit), which `lowbit matrix` reads.

    python -m bench.gpu_tests [--out DIR] [pytest args...]
    python -m bench.gpu_tests --all [--out DIR] tests/kernels tests/layers tests/models

--all runs every test, not only the gpu-marked ones (section `gpu_tests_all`): the unmarked tests put their tensors
on the GPU when there is one (DEV = "cuda"), so there they check the kernels' GPU code as well; the format and
quantization tests need packages the device image lacks (compressed-tensors, llm-compressor, gguf), hence the paths.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict

from bench.common import save_section


def summarize(junit_path: str) -> dict[str, dict[str, int]]:
    files: dict[str, dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        path = case.get("classname", "").split(".")
        # classname is the dotted module path (+ class): tests.kernels.test_w4a16[.TestX]
        mod = [p for p in path if not p[:1].isupper()]
        test_file = "/".join(mod) + ".py"
        if case.find("failure") is not None or case.find("error") is not None:
            files[test_file]["failed"] += 1
        elif case.find("skipped") is not None:
            files[test_file]["skipped"] += 1
        else:
            files[test_file]["passed"] += 1
    return dict(files)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--all", action="store_true", help="every test, not only the gpu-marked ones")
    args, rest = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        marker = [] if args.all else ["-m", "gpu"]
        cmd = [sys.executable, "-m", "pytest", *marker, "-q", f"--junitxml={junit}", *(rest or ["tests"])]
        rc = subprocess.call(cmd)
        files = summarize(junit)
    totals = {k: sum(f[k] for f in files.values()) for k in ("passed", "failed", "skipped")}
    section = "gpu_tests_all" if args.all else "gpu_tests"
    path = save_section(section, {"files": files, "totals": totals, "pytest_exit": rc}, args.out)
    print(f"gpu tests: {totals} -> {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
