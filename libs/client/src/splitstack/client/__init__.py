"""The splitstack client: the `splitstack` CLI and the local stack supervisor.

Like any client it speaks only gRPC and events; it never imports a service or the chassis, so a
user may install it alone.
"""
