import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _corpus import ray_session, text_model  # noqa: E402,F401  (session fixtures: one Ray for all corpus tests)
