from modelalloy.cli import entry

entry()
