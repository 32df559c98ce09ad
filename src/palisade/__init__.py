"""Palisade: a hardened SMTP spam perimeter.

The package is split by job (see DESIGN.md section 4): ``smtp`` is the sans-I/O protocol core,
``policy`` turns facts into verdicts, ``spool`` keeps accepted mail durable, ``relay`` delivers it,
``server`` is the only asyncio glue, ``config`` loads the operator's TOML, ``obs`` writes log lines.
"""

__version__ = "0.4.0"
