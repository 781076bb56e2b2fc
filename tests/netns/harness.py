"""The namespace tests drive the lab's harness; re-exported here for short imports."""

from lab.harness import BIN, ENV, REPO, LabEnv, Lbd

__all__ = ["BIN", "ENV", "REPO", "LabEnv", "Lbd"]
