from exoctl.cli.app import main

main()
