"""The pure core: money rules, limits and domain errors. No I/O, no SQLAlchemy, no grpc."""
