"""Candidate catalogues: scoring whole surveys (discover) and single files (classify)."""
