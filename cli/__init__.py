"""The edgellm command line."""
