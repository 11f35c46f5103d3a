"""Loaded by Python at start-up when this folder is on PYTHONPATH: refuse and record every connection to a host
outside this machine, so a test can assert that a run never reached the network."""

import os
import socket

_LOG = os.environ.get("NETGUARD_LOG")
_connect = socket.socket.connect
_getaddrinfo = socket.getaddrinfo


def _local(address) -> bool:
    if not isinstance(address, tuple):  # unix sockets
        return True
    host = str(address[0])
    return host in ("localhost", "::1") or host.startswith("127.")


def _refuse(what):
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {what!r}\n")
    raise OSError(f"netguard: {what!r} refused (tests must not reach the network)")


def _guarded_connect(self, address):
    if not _local(address):
        _refuse(address)
    return _connect(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _local((host if isinstance(host, str) else host.decode(), 0)) and host != "0.0.0.0":
        _refuse(("getaddrinfo", host))
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.getaddrinfo = _guarded_getaddrinfo
