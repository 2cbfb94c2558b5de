"""The family phone: the client core (session + pipeline), the CLI and the Kivy app."""

import os

# gRPC's C core prints a multi-line log of its own for a failed TLS handshake beside the
# one clear error line a person gets; it reads this before grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
