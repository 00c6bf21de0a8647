"""Built-in analyses written against the plug-in protocol of :mod:`attnstore.abc.analysis`."""
