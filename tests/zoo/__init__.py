"""The model zoo: third-party and corner-case models trained through pipepart against eager."""
