"""edge_ms: reflective generative reasoning (MetaStone-S1) on device, through llama.cpp."""

import os

# llama.cpp's CPU backend uses OpenMP; its default busy-wait makes every decode step many
# times slower as soon as another process shares the cores (measured: 14-30x on 2 cores).
# Must be set before llama.cpp (and libgomp) is loaded; users can still override it.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

__version__ = "0.1.0"
__all__ = ["__version__"]
