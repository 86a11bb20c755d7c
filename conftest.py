# Root conftest of pytest-moeparity's own repository.
# The plugin itself is registered through the pytest11 entry point of the installed package;
# pytester drives the plugin in subprocess-free in-process test sessions.
pytest_plugins = ("pytester",)
