"""Limits on what ingest accepts, kept free of imports so the command's settings can name them at start-up."""

__all__ = ["DEFAULT_MAX_VOXELS"]

# Largest volume a reader decodes, in voxels (Z*Y*X, colour samples included): 256 B-scans of 1024x1024.
# Readers check it from the file's header before decoding, so a small compressed "bomb" is refused at once.
DEFAULT_MAX_VOXELS = 1 << 28
