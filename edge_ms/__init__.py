"""edge_ms: reflective generative reasoning (MetaStone-S1) on device, through llama.cpp."""

__version__ = "0.1.0"
__all__ = ["__version__"]
