"""qat: quantization-aware training for PyTorch Lightning that exports exactly what it trained."""
from .formats import QTensor, QuantError, get_format
from .plan import LayerSpec, build_plan
from .prepare import (calibrate, convert, effective_state_dict, fake_quant_modules, freeze_observers, layer_errors,
                      prepare, set_fake_quant_enabled, unprepare)

__all__ = ["QATCallback", "prepare", "calibrate", "convert", "unprepare", "fake_quant_modules",
           "set_fake_quant_enabled",
           "freeze_observers", "layer_errors", "effective_state_dict", "build_plan", "LayerSpec", "QTensor",
           "QuantError", "get_format"]
__version__ = "0.1.0"


def __getattr__(name):
    # The callback imports Lightning; keep `import qat` light for plain-PyTorch users.
    if name == "QATCallback":
        from .callback import QATCallback
        return QATCallback
    raise AttributeError(name)
