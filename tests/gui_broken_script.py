"""A script that fails to import, for the GUI test of the registry (its tab shows the error)."""
raise ImportError("this script is half-written")
