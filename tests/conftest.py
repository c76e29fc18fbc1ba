"""Tests import the repo's top-level modules (main, engine, deta, ...) and the fixtures beside them."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
