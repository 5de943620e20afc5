import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


# CI runs the property tests on fixed examples, so that a landing does not depend on the seeds a run
# draws; developers' runs keep exploring (and .hypothesis/ replays what they found).
import os  # noqa: E402

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
