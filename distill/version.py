"""The version of distill and its distribution name (one place: the package face, `distill --version`, every file
written, ``pyproject.toml``'s dynamic version and every install hint read them)."""
__version__ = "0.2.0.dev0"

#: The name distill is published under (``pip install diffusion-distill``; ``distill`` on PyPI is another project);
#: the import name and the command stay ``distill``. ``pyproject.toml``'s ``[project] name`` is the same
#: (tests/test_release.py).
DISTRIBUTION = "diffusion-distill"


def install_hint(extra: str) -> str:
    """The command that installs the pip extra ``extra`` of distill, e.g. ``install_hint("sd")`` ->
    ``pip install "diffusion-distill[sd]" (or pip install -e ".[sd]" in a checkout)``."""
    return f'pip install "{DISTRIBUTION}[{extra}]" (or pip install -e ".[{extra}]" in a checkout)'
