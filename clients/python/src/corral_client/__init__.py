"""corral-client: talk to corral's node agent (``corrald``) from Python.

>>> from corral_client import Client
>>> with Client.unix() as c:                      # /run/corral/corral.sock
...     c.apply(open("web.toml").read())
...     print([s.name for s in c.list()])

``corral_client.pb`` holds the generated corral.v1 messages (``pb.ServiceSpec``, ...) and
``corral_client.pb_grpc`` the raw ``AgentStub``; :class:`Client` wraps them (see
:mod:`corral_client.client`).
"""

from .client import DEFAULT_SOCKET, Client, CorralError, RolloutFailed, Tls, enum_name
from .v1 import agent_pb2 as pb
from .v1 import agent_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_SOCKET",
    "Client",
    "CorralError",
    "RolloutFailed",
    "Tls",
    "enum_name",
    "pb",
    "pb_grpc",
]
