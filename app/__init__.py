"""The dashboard's helpers: what the pages show, as plain functions over models/ (tests call them; pages render)."""
