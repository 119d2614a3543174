"""Export a fake-quantized model to the files runtimes load: GGUF (llama.cpp), compressed-tensors
(HF transformers, vLLM), torchao. Every exporter writes the integer codes of ``qat.convert``, never
re-quantized float weights, so the file holds exactly the numbers the model was trained with."""
from .io import ExportError

__all__ = ["ExportError", "export_gguf", "export_compressed_tensors", "export_torchao"]


def __getattr__(name):
    # Each exporter pulls in its own runtime package (gguf, compressed-tensors, torchao); import lazily.
    if name == "export_gguf":
        from .gguf import export_gguf
        return export_gguf
    if name == "export_compressed_tensors":
        from .compressed_tensors import export_compressed_tensors
        return export_compressed_tensors
    if name == "export_torchao":
        from .torchao import export_torchao
        return export_torchao
    raise AttributeError(name)
