"""Run the benchmark: `python bench/run_bench.py [options]` is `python -m tuner bench [options]`.

See bench/README.md for what it measures and the latest figures.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
