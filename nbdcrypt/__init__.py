"""nbdcrypt: an NBD server whose exports are device-mapper-style stacks with inline encryption."""

__version__ = "0.1.0"
