"""Device backends: one ``Backend`` per kind of hardware, chosen by ``registry.get_backend``."""
from edgellm.backends.base import AttentionMetadata, Backend, Capabilities
from edgellm.backends.registry import available_devices, get_backend

__all__ = ["AttentionMetadata", "Backend", "Capabilities", "available_devices", "get_backend"]
