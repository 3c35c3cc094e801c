"""Stored messages: every byte of them, in Redis (buffer) and MySQL (archive). ARCHITECTURE.md."""
