"""Configuration: the typed model and its validating loader."""

from palisade.config.loader import ConfigError, load_config, parse_config, parse_host_port
from palisade.config.model import Config

__all__ = ["Config", "ConfigError", "load_config", "parse_config", "parse_host_port"]
