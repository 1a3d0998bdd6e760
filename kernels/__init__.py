"""Compute kernels: pure functions on tensors, no engine types."""
if __name__ == "kernels":  # the repository root on sys.path, not edgellm.kernels: see edgellm.shadowed
    import os

    from edgellm.shadowed import replace_with_installed

    replace_with_installed(__name__, os.path.dirname(__file__))
