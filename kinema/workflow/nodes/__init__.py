"""The node sets. Importing this package registers every node in kinema.workflow.types.NODES."""

from kinema.workflow.nodes import comfy, kinema_nodes, vhs, wrapper  # noqa: F401  (registration)
