"""FOMM networks (Siarohin et al. 2019) with a pixel-warping generator."""

from models.fomm.config import FommConfig
from models.fomm.model import MotionModel, SourceCache, kp_to_vector, vector_to_kp

__all__ = ["FommConfig", "MotionModel", "SourceCache", "kp_to_vector", "vector_to_kp"]
