from hallo3_cli.cli import main

main()
