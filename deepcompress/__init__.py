"""deepcompress: make trained PyTorch models small (Han et al., Deep Compression)."""

__version__ = "0.1.0"

from .errors import CompressError, DczError, DeepCompressError, ModelFileError  # noqa: E402
from .files import compress_file  # noqa: E402
from .io import export_program, load, load_state_dict, open_lazy, save  # noqa: E402
from .pipeline import CompressConfig, Report, compress  # noqa: E402

__all__ = ["CompressConfig", "CompressError", "DczError", "DeepCompressError", "ModelFileError",
           "Report", "__version__", "compress", "compress_file", "export_program", "load", "load_state_dict",
           "open_lazy", "save"]
