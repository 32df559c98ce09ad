"""Observability: log lines in exim's shape, queue ids. Owns no policy; escapes all client text."""
