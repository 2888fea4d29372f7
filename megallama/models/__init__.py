"""The seed's ``training_infra.models`` face; the model itself lives in ``megallama.model``."""
