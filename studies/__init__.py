"""Ready-made studies: specs (TOML) and their tasks (data and teacher)."""
