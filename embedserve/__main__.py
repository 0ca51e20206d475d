from embedserve.cli import main

main()
