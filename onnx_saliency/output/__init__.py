"""What a run leaves behind: map post-processing and colouring (postprocess), atomic file writers (writers),
the per-image png/npy/json outputs and their provenance (sidecar), and the batch runner over many images that
writes them (batch)."""

from .batch import explain_images
from .postprocess import colorize, colorize_signed, minmax, overlay, resize_maps, scale_cam_image
from .sidecar import outputs_complete, sidecar, write_image_outputs
from .writers import write_bytes, write_json, write_npy, write_png

__all__ = ["explain_images", "colorize", "colorize_signed", "minmax", "overlay", "resize_maps", "scale_cam_image",
           "outputs_complete", "sidecar", "write_image_outputs", "write_bytes", "write_json", "write_npy",
           "write_png"]
