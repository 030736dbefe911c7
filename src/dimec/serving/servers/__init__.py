"""The edge and cloud servers: the HTTP app, its sources and priorities, scheduling and admission, and the
tier side of a plan (running the stages on this tier, forwarding the rest). See serving/__init__.py."""
