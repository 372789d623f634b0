"""Kinema's own nodes: the whole Pipeline as one node (the web page's workflows)."""
