from calm_cli.cli import main

main()
