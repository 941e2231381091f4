"""resinspect: measure why a residual network works."""

__version__ = "0.1.0"
