from modelalloy.cli import main

main()
