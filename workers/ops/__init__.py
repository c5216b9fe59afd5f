"""Operator tools: status, dead letters, trim, backup and restore, replay, Redis ACLs."""
