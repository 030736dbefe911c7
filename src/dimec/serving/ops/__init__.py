"""Operations: measuring the cost profile, offline planning of served policies, drift monitoring.
See serving/__init__.py."""
