"""Live control of a running server, like dmsetup: a unix socket in the server, `nbdcrypt ctl`.

protocol.py   the wire format (one JSON object per line each way) and request validation
commands.py   what each command does to the server's devices (no sockets)
server.py     the control socket in the server: 0600, bounded lines, idle timeout
client.py     `nbdcrypt ctl`: arguments -> one request -> the reply's output or error
"""
