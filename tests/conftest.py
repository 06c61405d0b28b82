import sys
from pathlib import Path

# lets specs such as `toy_models:ResidualNet` name the small models in tests/toy_models.py
sys.path.insert(0, str(Path(__file__).parent))
