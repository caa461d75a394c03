"""tuner: turn a company's conversation logs into a chatbot that answers in its voice."""

import logging

__version__ = "0.1.0"

# bitsandbytes tries, on CPUs with AVX512-BF16, to fetch an optional 4-bit kernel from the Hub at import (through the
# `kernels` package), and both log a warning about publisher trust or offline mode when it may not (tuner never
# runs code from the Hub): lines in every training log that say nothing a user can act on. Errors still show.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)
