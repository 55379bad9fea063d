"""Ray job entry point: prepare -> train -> evaluate -> score, each skipped when up to date.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --config jobs/config.example.yaml [--set SECTION.KEY=VALUE ...]

Options: `python jobs/pipeline.py --help`; the config: jobs/config.example.yaml; the logic:
ezsasrec_ray/pipeline.py. Exit code 0 on success, 2 for a bad config or input, 1 otherwise.
"""

import os
import sys

# With --working-dir ., the uploaded package next to jobs/ wins over an installed one.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "ezsasrec_ray")):
    sys.path.insert(0, _ROOT)

from ezsasrec_ray.pipeline import STAGES, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(stages=STAGES, prog="jobs/pipeline.py"))
