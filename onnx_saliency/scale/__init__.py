"""Scale-out: explain a whole dataset on a Ray cluster (``explain_dataset``; Ray Data, one onnxruntime session
per actor, resumable per-image files or atomically committed Parquet shards), and a Triton model repository for
an explain graph (``write_triton_repository``). Ray and pyarrow (the ``[ray]`` extra) are imported only when a
run asks for them."""

from .. import lazy_names

_LAZY = {"explain_dataset": ".runner", "ScaleOutcome": ".runner", "init_ray": ".runner", "read_maps": ".parquet",
         "write_triton_repository": ".triton", "triton_config": ".triton"}

__getattr__ = lazy_names(__name__, _LAZY)

__all__ = list(_LAZY)
