"""Public path of the compressed checkpoint (README): `from fls_hf.compressed import save_compressed, load_compressed`.

The code lives in `fls_hf.export.compressed`."""

from .export.compressed import WEIGHTS_FILE, load_compressed, save_compressed

__all__ = ["WEIGHTS_FILE", "load_compressed", "save_compressed"]
