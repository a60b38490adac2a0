"""Driver side of itm-study: CLI, study files, search, tracking, tables. Imports ``trainables``."""
