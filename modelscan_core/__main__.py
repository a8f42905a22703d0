from modelscan_core.cli import main

main()
