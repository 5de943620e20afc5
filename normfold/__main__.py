from normfold.cli.main import run

run()
