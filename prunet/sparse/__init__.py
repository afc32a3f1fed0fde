"""Pruned models that are really smaller and faster: the compact file, export, loading, sparse inference.

* :func:`export`: a run folder or checkpoint -> a compact file (survivors and
  bit-packed relative indices), a baked dense safetensors file, or ONNX;
* :func:`save`: a model, masks included, as a checkpoint; :func:`load`: any of prunet's files
  -> a plain model with the pruned model's outputs; ``sparse=True`` runs pruned layers with sparse kernels where they are faster;
* :mod:`~prunet.sparse.compact` (the file format), :mod:`~prunet.sparse.codec`
  (relative indices), :mod:`~prunet.sparse.modules` (the sparse layers),
  :mod:`~prunet.sparse.native` (prunet's own sparse kernel, built by ``make native``;
  torch's CSR product stands in where it is not built).
"""

from prunet.sparse.compact import (
    VERSION,
    CompactFileError,
    read_compact,
    read_header,
    write_compact,
)
from prunet.sparse.export import (
    FORMATS,
    Exported,
    ExportError,
    Measurement,
    export,
    load,
    measure,
    save,
)
from prunet.sparse.modules import SparseConv2d, SparseLinear, SparseSequential, plan, sparsify

__all__ = [
    "FORMATS",
    "VERSION",
    "CompactFileError",
    "ExportError",
    "Exported",
    "Measurement",
    "SparseConv2d",
    "SparseLinear",
    "SparseSequential",
    "export",
    "load",
    "measure",
    "plan",
    "read_compact",
    "read_header",
    "save",
    "sparsify",
    "write_compact",
]
