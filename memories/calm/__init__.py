"""``calm`` memories: a frozen augmenting model composed into the frozen base (CALM, arXiv 2401.02412)."""
