"""
The C{pymaild.plugins} namespace: C{twisted.plugin.getPlugins(IPymaildPlugin, pymaild.plugins)}
finds every L{pymaild.pipeline.Plugin} object at module level of the modules here (pymaild's
built-ins), of C{pymaild/plugins/} directories of other distributions on C{sys.path} (without
an C{__init__.py}), and of the directories of C{[plugins] paths} (added at start-up).
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # noqa: F821 (a package's __path__)
__all__: list = []
