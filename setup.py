"""Builds nbdcrypt's three optional C modules (the rest of the project is in pyproject.toml).

nbdcrypt/crypto/_units.c runs whole requests of data units through libcrypto without the GIL
(the per-unit loop, AES-XTS from ECB for small units, the IV blocks). nbdcrypt/server/_spin.c
busy-polls a connection's socket without the GIL (server/poll.py). nbdcrypt/server/_splice.c
splices a write payload from the socket to the file with the GIL let go once (server/splice.py).
They need a C compiler and Python's headers (Debian: gcc, libc6-dev, python3-dev); without
them the install still succeeds, the ciphers and splicing use their Python paths (slower, same
bytes) and busy polling is off.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nbdcrypt.crypto._units",
            ["nbdcrypt/crypto/_units.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "nbdcrypt.server._spin",
            ["nbdcrypt/server/_spin.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "nbdcrypt.server._splice",
            ["nbdcrypt/server/_splice.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)
