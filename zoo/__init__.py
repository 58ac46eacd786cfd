"""pathology-zoo: a registry of versioned WSI segmentation models, a streaming runner and format bridges."""

__version__ = "0.1.0"
