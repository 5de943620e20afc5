"""The `normfold` command line (installed as the package normfold.cli)."""
