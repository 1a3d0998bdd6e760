"""Weight formats as data: GGML blocks, packing and exact dequantization."""
from edgellm.quant.formats import FORMATS, dequantize_blocks, quantize_rows
from edgellm.quant.tensor import QuantizedTensor, cat_rows, permute_rows

__all__ = ["FORMATS", "QuantizedTensor", "cat_rows", "dequantize_blocks", "permute_rows", "quantize_rows"]
