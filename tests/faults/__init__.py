"""The fault suite (SPEC §10): its own PostgreSQL cluster, the server as a subprocess, retrying
clients and the ledger check after every scenario. `make faults` runs it all; `make test` runs the
quick cases (test_faults_quick.py). docs/faults.md describes the scenarios and their last results."""

import os

# The suite forks (pg_ctl, the server) from a process whose threads use gRPC: gRPC's fork handlers
# only print warnings there.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
