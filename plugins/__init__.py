"""resinspect's built-in analysis plugins (installed as the package ``resinspect_plugins``).

Each module is a plugin registered through the ``resinspect`` entry-point
group, exactly like a third-party plugin.
"""
