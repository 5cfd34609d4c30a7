"""idvault's test suite; mirrors the packages (tests/vault, tests/encoders, tests/web)."""
