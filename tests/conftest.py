import sys
from pathlib import Path

# test helpers (fake_cifar, cache_faults, model_fixtures) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
