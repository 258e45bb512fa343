from steinpix._cli.main import main

main()
