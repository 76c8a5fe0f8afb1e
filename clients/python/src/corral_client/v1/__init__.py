"""corral.v1, generated at build time from ``proto/proto/corral/v1/agent.proto``.

``agent_pb2`` holds the messages and ``agent_pb2_grpc`` the ``AgentStub``; neither is kept
in the source tree: installing the package (``pip install clients/python``) generates them.
"""
