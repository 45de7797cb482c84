from kd_cli.cli import main

main()
