"""One session ticket key for a supervisor and all its workers.

A TLS client resumes a session by showing a ticket the server sealed with its
ticket key; OpenSSL makes a random key for each SSL_CTX. nginx makes its
contexts in the master before it forks, so every worker holds the same key and a
ticket from one worker opens a session on any other. Our workers are new
programs (proxycore/workers.py): each would make its own key, and with N workers
a client would resume on one connection in N. So the supervisor makes the key
(``new_keys``), hands it to each worker through an inherited pipe (never the
environment or the command line), and every server context made in any of them
gets it (``share``). It lives as long as the supervisor: a SIGUSR2 generation
keeps resuming the sessions of the one before; a restart makes a new key.

Python's ssl module has no call for OpenSSL's SSL_CTX_set_tlsext_ticket_keys, so
``share`` makes it through ctypes on the SSL_CTX the ssl.SSLContext wraps. It
checks first that it found the right one (OpenSSL's options for it are the
context's own, and the library is the one ssl was built on); when it cannot
tell, it says so once and leaves the context its own key.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import secrets
import ssl
import sys

log = logging.getLogger("proxycore.tls")

# OpenSSL's SSL_CTRL_SET_TLSEXT_TICKET_KEYS: a 16-byte key name, a 32-byte HMAC
# secret and a 32-byte AES key.
KEY_BYTES = 80
_SET_TICKET_KEYS = 59
_GET_TICKET_KEYS = 58


def new_keys() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


class _Libssl:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.restype = ctypes.c_uint64
        self.get_options.argtypes = [ctypes.c_void_p]
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.restype = ctypes.c_long
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]


@functools.cache
def _libssl() -> _Libssl | None:
    """The libssl the ssl module runs on, or None when this is not CPython on it."""
    if sys.implementation.name != "cpython":
        return None
    ssl_name, crypto_name = ctypes.util.find_library("ssl"), ctypes.util.find_library("crypto")
    if ssl_name is None or crypto_name is None:
        return None
    try:
        crypto = ctypes.CDLL(crypto_name)
        crypto.OpenSSL_version_num.restype = ctypes.c_ulong
        if crypto.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
            return None  # another OpenSSL than the one ssl uses
        return _Libssl(ctypes.CDLL(ssl_name))
    except (OSError, AttributeError):
        return None


def _ssl_ctx(context: ssl.SSLContext, lib: _Libssl) -> int | None:
    # CPython's PySSLContext: the object's header, then the SSL_CTX pointer.
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or lib.get_options(pointer) != context.options:
        return None
    return pointer


@functools.cache
def _unable(why: str) -> None:
    log.warning("TLS session tickets stay per worker: %s", why)


def share(context: ssl.SSLContext, keys: bytes) -> bool:
    """``context`` seals and opens tickets with ``keys`` (from ``new_keys``)."""
    if len(keys) != KEY_BYTES:
        raise ValueError(f"a ticket key is {KEY_BYTES} bytes, not {len(keys)}")
    lib = _libssl()
    if lib is None:
        _unable("the OpenSSL under Python's ssl module was not found")
        return False
    pointer = _ssl_ctx(context, lib)
    if pointer is None:
        _unable("this Python's SSLContext is not laid out as expected")
        return False
    return lib.ctrl(pointer, _SET_TICKET_KEYS, KEY_BYTES, keys) == 1


def keys_of(context: ssl.SSLContext) -> bytes | None:
    """The key ``context`` seals tickets with (tests: is it the shared one)."""
    lib = _libssl()
    pointer = None if lib is None else _ssl_ctx(context, lib)
    if lib is None or pointer is None:
        return None
    out = ctypes.create_string_buffer(KEY_BYTES)
    return out.raw if lib.ctrl(pointer, _GET_TICKET_KEYS, KEY_BYTES, out) == 1 else None
