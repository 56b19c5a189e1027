//! Settings from `imagectl.toml`, the environment and flags (flags > env > file).
