"""Configuration: the typed model, its validating loader, the list files and the policy builder.

Owns: reading and checking the operator's TOML (``loader``, ``model``), the list files named in
``[lists]`` and their reload on change (``lists``), and building the runtime policy from a loaded
config (``policy``: rules, lists, implied DATA rules and findings).
Must not touch: sockets, the spool, delivery, the server or the adapters: it binds, connects and
starts nothing (the composition root, ``palisade.server.generation``, builds the running parts
from a ``Config``).
Trust: the config file and list files are operator input, checked completely: every mistake is
one ``ConfigError`` naming the file, the key and the line, before the server starts or a reload is
accepted; nothing half-loaded is ever used.
"""

from palisade.config.loader import ConfigError, load_config, parse_config, parse_host_port
from palisade.config.model import Config

__all__ = ["Config", "ConfigError", "load_config", "parse_config", "parse_host_port"]
