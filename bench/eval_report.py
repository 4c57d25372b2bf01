"""Re-render report.md and the PNG plots from an existing results.json.

    .venv/bin/python bench/eval_report.py bench/results/zsre_smollm2/results.json
"""

import json
import sys
from pathlib import Path

from app.eval import report

if __name__ == "__main__":
    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    md = report.render(results, path)
    report.write_json(results, path)
    print(md)
